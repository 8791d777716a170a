"""NIfTI-1/-2 reading, header first: the declared shape is checked (no zero-size dimension, within `ReadLimits`)
before any voxel is read, gzip is inflated no further than the header declares, and one displayed slice reads one
stored slice (nibabel's `dataobj` slicing), reoriented to the display convention of `medplib.data.display`."""

from __future__ import annotations

import gzip
import io
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medplib.data.reading import (
    ImageReadError,
    ReadLimits,
    check_plane,
    gunzip_prefix,
    too_large,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_MAGICS_1 = (b"n+1", b"ni1")
_MAGICS_2 = (b"n+2", b"ni2")


def sniff_nifti(head: bytes) -> bool:
    """True when `head` (the first 540 inflated bytes) is a NIfTI-1 or NIfTI-2 header."""
    return (len(head) >= 348 and head[344:347] in _MAGICS_1) or (len(head) >= 540 and head[4:7] in _MAGICS_2)


def _header_class(head: bytes) -> tuple[Any, Any]:
    import nibabel as nib

    if len(head) >= 540 and head[4:7] in _MAGICS_2:
        return nib.Nifti2Header, nib.Nifti2Image
    return nib.Nifti1Header, nib.Nifti1Image


def check_shape(shape: tuple[int, ...], itemsize: int, name: str | Path, limits: ReadLimits) -> None:
    """Refuse a declared shape with a zero-size dimension, or one whose voxel data exceed the limits."""
    if len(shape) < 2:
        raise ImageReadError(
            name, "unsupported", f"NIfTI header field dim declares {len(shape)} dimension(s)"
        )
    for i, n in enumerate(shape):
        if n <= 0:
            raise ImageReadError(
                name,
                "empty",
                f"NIfTI header field dim[{i + 1}] is {n}: dimension {i + 1} of shape {shape} is empty",
            )
    nbytes = math.prod(shape) * itemsize
    if nbytes > limits.max_volume_bytes:
        raise too_large(
            name, f"declared voxel data {shape} in bytes", nbytes, limits.max_volume_bytes, "max_volume_bytes"
        )


def load_nifti(
    source: Path | bytes, name: str | Path, limits: ReadLimits
):  # -> nib.Nifti1Image | Nifti2Image
    """The image with its header checked; voxel data stay on disk (a path) or are inflated only as far as the
    header declares (bytes)."""
    import nibabel as nib

    try:
        if isinstance(source, bytes):
            gzipped = source[:2] == b"\x1f\x8b"
            head = gunzip_prefix(source, 540, name) if gzipped else source[:540]
            header_class, image_class = _header_class(head)
            header = header_class.from_fileobj(io.BytesIO(head))
            shape, itemsize = tuple(int(n) for n in header.get_data_shape()), header.get_data_dtype().itemsize
            check_shape(shape, itemsize, name, limits)
            needed = int(header.get_data_offset()) + math.prod(shape) * itemsize
            # Never inflated past what the header declares (checked against the limits above).
            data = gunzip_prefix(source, needed, name) if gzipped else source
            if len(data) < needed:
                raise ImageReadError(
                    name, "unreadable", f"truncated NIfTI: {len(data)} bytes, the header declares {needed}"
                )
            return image_class.from_bytes(data[:needed])
        image = nib.load(source)
    except ImageReadError:
        raise
    except Exception as err:  # nibabel raises ImageFileError, HeaderDataError, EOFError, ...
        raise ImageReadError(
            name, "unreadable", f"not a readable NIfTI file ({type(err).__name__}: {err})"
        ) from err
    check_shape(tuple(int(n) for n in image.shape), image.get_data_dtype().itemsize, name, limits)
    return image


def orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel's (stored axis -> (RAS axis, flip)) table of the closest canonical orientation."""
    from nibabel.orientations import io_orientation

    return io_orientation(affine)


def spatial_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The three spatial dimensions (a 2-D image has one slice along the third)."""
    dims = list(shape[:3]) + [1] * (3 - min(3, len(shape)))
    return dims[0], dims[1], dims[2]


def ras_shape(shape: tuple[int, ...], ornt: np.ndarray) -> tuple[int, int, int]:
    spatial = spatial_shape(shape)
    out = [0, 0, 0]
    for stored, (ras, _) in enumerate(ornt):
        out[int(ras)] = spatial[stored]
    return out[0], out[1], out[2]


def default_axis(shape: tuple[int, ...], ornt: np.ndarray) -> int:
    """Axial, except for a 2-D image: the axis its one slice is taken along."""
    return int(ornt[2, 0]) if len(shape) == 2 else 2


def slice_index(index: int | None, length: int, axis: int, name: str | Path) -> int:
    if index is None:
        return length // 2
    if not -length <= index < length:
        raise ImageReadError(
            name, "unsupported", f"slice_index {index} out of range for {length} slices along axis {axis}"
        )
    return index % length


def read_voxels(image: Any, key: tuple, name: str | Path, dtype: Any) -> np.ndarray:
    """`image.dataobj[key]` (scl_slope/scl_inter applied), its failures as ImageReadError."""
    try:
        return np.asarray(image.dataobj[key], dtype=dtype)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:  # a cut or damaged .nii.gz
        raise ImageReadError(name, "unreadable", f"truncated or corrupt gzip data ({err})") from err
    except Exception as err:  # nibabel: ValueError and friends for bad offsets, dtypes, ...
        raise ImageReadError(
            name, "unreadable", f"cannot read NIfTI voxel data ({type(err).__name__}: {err})"
        ) from err


def display_plane(ras_plane: np.ndarray) -> np.ndarray:
    """A slice of a RAS volume (its two remaining axes in RAS order) in display orientation."""
    return np.rot90(ras_plane)


def read_plane(
    image: Any, axis: int | None, index: int | None, name: str | Path, limits: ReadLimits
) -> np.ndarray:
    """One slice (float64, display orientation) along RAS `axis`, reading only that stored slice."""
    shape = tuple(int(n) for n in image.shape)
    ornt = orientation(image.affine)
    axis = default_axis(shape, ornt) if axis is None else axis
    spatial = spatial_shape(shape)
    stored_axis = int(np.nonzero(ornt[:, 0] == axis)[0][0])
    k = slice_index(index, spatial[stored_axis], axis, name)
    stored_k = spatial[stored_axis] - 1 - k if ornt[stored_axis, 1] < 0 else k
    ndim = len(shape)
    key: list[Any] = [slice(None)] * min(ndim, 3) + [0] * max(0, ndim - 3)  # extra dims: the first volume
    if stored_axis < ndim:
        key[stored_axis] = stored_k
    check_plane(name, *[spatial[a] for a in range(3) if a != stored_axis], limits)
    plane = read_voxels(image, tuple(key), name, np.float64)
    remaining = [a for a in range(3) if a != stored_axis]
    plane = plane.reshape([spatial[a] for a in remaining])
    for position, stored in enumerate(remaining):
        if ornt[stored, 1] < 0:
            plane = np.flip(plane, position)
    if ornt[remaining[0], 0] > ornt[remaining[1], 0]:
        plane = plane.T
    return display_plane(plane)


def plane_size(image: Any, axis: int | None) -> tuple[int, int]:
    """(height, width) of `read_plane`'s result, from the header."""
    shape = tuple(int(n) for n in image.shape)
    ornt = orientation(image.affine)
    axis = default_axis(shape, ornt) if axis is None else axis
    dims = [n for a, n in enumerate(ras_shape(shape, ornt)) if a != axis]
    return dims[1], dims[0]  # np.rot90 swaps the two in-plane axes
