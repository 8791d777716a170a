"""Image and mask I/O shared by validation, preprocessing and the model's Predictor.

Every image comes back as a uint8 (H, W, 3) RGB array whatever it was stored as:

* PNG / JPEG / anything Pillow opens. 8-bit modes are converted to RGB; 16-bit and float modes (common for
  medical PNG/TIFF) are min-max scaled to uint8; alpha is dropped.
* DICOM (`.dcm`, `.dicom`, or any file with the `DICM` preamble): one frame (`slice_index`, default the middle
  one) through pydicom's Modality LUT and VOI LUT / window, per frame for enhanced multi-frame files
  (`medplib.data.dicom`).
* NIfTI (`.nii`, `.nii.gz`): one slice along an anatomical axis after reorientation to RAS, in the display
  convention of `medplib.data.display` (neurological view whatever the storage order), reading only that slice
  (`medplib.data.nifti`).
* A DICOM series (a folder, or a `.zip` of one) and NRRD/MHA (`.nrrd`, `.mha`, ...): read whole by
  `medplib.data.volume`, then one slice as for NIfTI.
* numpy arrays (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of any dtype: uint8 is kept, bool becomes 0/255,
  anything else is min-max scaled over the whole array (so colour balance is kept); alpha is dropped.
* PIL images: as for files.
* bytes: the content of any of the files above (an upload); DICOM, NIfTI (optionally gzipped) and zip are
  recognised by their magic bytes, anything else goes to Pillow.

The slice, axis and intensity window come from a `View` (or the `slice_index`, `axis`, `window` keywords). Headers
are checked against `ReadLimits` before any pixel is decoded.

Masks (`load_mask`) follow the MeCoVQA convention: any value >= 1 in any colour channel is foreground.

Every failure raises `ImageReadError`, which names the file and says what was wrong; its `problem` attribute
("missing", "empty", "unreadable", "unsupported", "too_large") lets callers map it to a rejection reason or an
HTTP status without parsing text.

Inside `with reusing(files)`, `load_mask` and `image_size` look a file up in `files` (a `DecodedFiles`) by path,
size and modification time before reading it: preprocessing validates a mask, then loads it as a target or a
region prompt, and several rows share one mask, yet each is opened and decoded once per process. Within one
such block `file_key` stats each path once.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from medplib.data.dicom import DICOM_SUFFIXES, number_of_frames, read_dicom, read_header
from medplib.data.display import View, Window, parse_axis, parse_window
from medplib.data.lru import BoundedCache
from medplib.data.nifti import (
    NIFTI_SUFFIXES,
    default_axis,
    load_nifti,
    orientation,
    plane_size,
    ras_shape,
    read_plane,
    sniff_nifti,
)
from medplib.data.reading import (
    ImageProblem,
    ImageReadError,
    ReadLimits,
    check_plane,
    gunzip_prefix,
    scale_to_uint8,
)
from medplib.data.volume import ITK_SUFFIXES, load_volume, read_volume_plane

logger = logging.getLogger(__name__)

__all__ = [
    "DICOM_SUFFIXES",
    "NIFTI_SUFFIXES",
    "DecodedFiles",
    "ImageProblem",
    "ImageReadError",
    "ImageSource",
    "ReadLimits",
    "depends_on_view",
    "file_key",
    "image_size",
    "load_image",
    "load_mask",
    "reusing",
    "scale_to_uint8",
    "slice_count",
]

ImageSource = str | Path | bytes | np.ndarray | Image.Image
FileKind = Literal["dicom", "nifti", "volume", "pillow"]

# Pillow modes that convert to RGB without losing information that matters for display.
_PIL_RGB_MODES = {
    "RGB",
    "L",
    "P",
    "PA",
    "RGBA",
    "RGBX",
    "RGBa",
    "LA",
    "La",
    "1",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
}


def _file_format(path: Path) -> FileKind:
    name = path.name.lower()
    if path.is_dir() or name.endswith(ITK_SUFFIXES + (".zip",)):
        return "volume"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    # DICOM files often carry no suffix; a Part-10 file has "DICM" after a 128-byte preamble.
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return "pillow"
    if len(head) == 132 and head[128:] == b"DICM":
        return "dicom"
    return "pillow"


def _check_file(path: Path) -> None:
    """Raise ImageReadError unless `path` is a non-empty regular file or a folder (a DICOM series)."""
    if not path.exists():
        raise ImageReadError(path, "missing", "file not found")
    if path.is_dir():
        return
    if not path.is_file():
        raise ImageReadError(path, "unreadable", "not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty", "file is empty (0 bytes)")


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """Turn an (H, W[, C]) array into uint8 (H, W, 3); `name` is used in error messages."""
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        if array.shape[2] == 4:
            array = array[:, :, :3]
    elif array.ndim != 2:
        raise ImageReadError(
            name, "unsupported", f"expected an (H, W) or (H, W, 1|3|4) array, got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(name, "empty", f"image has zero size {array.shape[:2]}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise ImageReadError(name, "unsupported", f"unsupported array dtype {array.dtype}")
        array = scale_to_uint8(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    if image.width == 0 or image.height == 0:
        raise ImageReadError(name, "empty", f"image has zero size {image.height}x{image.width}")
    if image.mode in _PIL_RGB_MODES:
        return np.asarray(image.convert("RGB"))
    # 16-bit integer and float modes ("I;16", "I", "F", ...): keep the full range and min-max scale it.
    return _array_to_rgb(np.asarray(image), name)


def _open_pil(source: Path | io.BytesIO, name: str | Path) -> Image.Image:
    """Open a Pillow-readable file, its header only (`_decode_pil` reads the pixels), mapping failures to
    ImageReadError."""
    try:
        image = Image.open(source)
    except UnidentifiedImageError as err:
        raise ImageReadError(
            name, "unreadable", "not a recognised image format (corrupt or unsupported)"
        ) from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(name, "too_large", f"image too large ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(name, "unreadable", f"corrupt image header ({err})") from err
    return image


def _decode_pil(image: Image.Image, name: str | Path) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt pixel data
        raise ImageReadError(name, "unreadable", f"corrupt image data ({err})") from err


def _read_pillow(source: Path | io.BytesIO, name: str | Path, limits: ReadLimits) -> np.ndarray:
    with _open_pil(source, name) as image:
        check_plane(name, image.height, image.width, limits)  # from the header: refused before decoding
        _decode_pil(image, name)
        return _pil_to_rgb(image, str(name))


def sniff_bytes(data: bytes) -> FileKind:
    """The format of an upload, from its magic bytes."""
    if data[128:132] == b"DICM":
        return "dicom"
    if data[:4] == b"PK\x03\x04":
        return "volume"
    head = data[:540]
    if data[:2] == b"\x1f\x8b":  # gzip: only NIfTI is expected gzipped; peek at the header
        try:
            head = gunzip_prefix(data, 540, "<bytes>")
        except ImageReadError:
            return "pillow"
    return "nifti" if sniff_nifti(head) else "pillow"


def _view(view: View | None, slice_index: int | None, axis: Any, window: Any) -> View:
    if view is not None:
        return view
    return View(
        slice_index=slice_index, axis=None if axis is None else parse_axis(axis), window=parse_window(window)
    )


def load_image(
    src: ImageSource,
    *,
    slice_index: int | None = None,
    axis: int | str | None = None,
    window: Window | str | None = None,
    view: View | None = None,
    limits: ReadLimits | None = None,
) -> np.ndarray:
    """Load `src` as uint8 (H, W, 3) RGB; see the module docstring for each format.

    `src` is a path (a file, or a DICOM series folder), the bytes of a file (an upload; the format is sniffed from
    the content), a numpy array or a PIL image. `view` (or `slice_index`, `axis`, `window`) picks the slice or
    frame and the intensity window of clinical formats. Raises ImageReadError naming the file for a missing,
    empty, corrupt, unsupported or too large input.
    """
    view = _view(view, slice_index, axis, window)
    limits = limits or ReadLimits()
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, "<array>")
    if isinstance(src, Image.Image):
        return _pil_to_rgb(src, getattr(src, "filename", "") or "<PIL image>")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageReadError("<bytes>", "empty", "no bytes")
        return _read(data, sniff_bytes(data), "<bytes>", view, limits)
    if not isinstance(src, (str, Path)):
        raise TypeError(
            f"load_image expects a path, bytes, numpy array or PIL image, got {type(src).__name__}"
        )
    path = Path(src)
    _check_file(path)
    return _read(path, _file_format(path), path, view, limits)


def _read(
    source: Path | bytes, kind: FileKind, name: str | Path, view: View, limits: ReadLimits
) -> np.ndarray:
    if kind == "dicom":
        return read_dicom(source, name, view.slice_index, view.window, limits)
    if kind == "nifti":
        image = load_nifti(source, name, limits)
        plane = read_plane(image, view.axis, view.slice_index, name, limits)
        low_high = view.window.low_high if view.window else (None, None)
        return _array_to_rgb(scale_to_uint8(plane, *low_high), str(name))
    if kind == "volume":
        volume = load_volume(source, limits, name=str(name))
        return read_volume_plane(volume, view.axis, view.slice_index, view.window, limits)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    return _read_pillow(stream, name, limits)


def depends_on_view(path: str | Path) -> bool:
    """True for DICOM, NIfTI and volumes: what `load_image` shows of them depends on the `View` (slice, window)."""
    path = Path(path)
    return path.exists() and _file_format(path) != "pillow"


class DecodedFiles:
    """Masks (bit-packed) and image sizes already read, by what they are and the file's `file_key`, the least
    recently used out past `max_bytes`; `masks_decoded` counts the masks actually decoded."""

    def __init__(self, max_bytes: int) -> None:
        self.entries: BoundedCache[Any] = BoundedCache(max_bytes)
        self.masks_decoded = 0
        self.keys: dict[str, tuple[str, int, int] | None] = {}  # `file_key` by path, for one `reusing` block


_REUSING: ContextVar[DecodedFiles | None] = ContextVar("medplib_decoded_files", default=None)


@contextmanager
def reusing(files: DecodedFiles) -> Iterator[DecodedFiles]:
    """Within the block, `load_mask` and `image_size` reuse what `files` holds and add what they read, and
    `file_key` stats a path once: make a block per batch of rows (preprocessing: a chunk), as the file system
    can change between batches."""
    files.keys = {}
    token = _REUSING.set(files)
    try:
        yield files
    finally:
        _REUSING.reset(token)


def file_key(path: Path) -> tuple[str, int, int] | None:
    """(path, size, modification time in ns) of a file, None when it cannot be stat'ed (the reader says why).
    Inside `reusing`, a path's first answer stands for the block: a MeCoVQA-mini row stats its image ~3 times
    and each mask ~3 times (the path check, the cache key, the reads), ~7 system calls a row."""
    files = _REUSING.get()
    text = str(path)
    if files is not None and text in files.keys:
        return files.keys[text]
    try:
        stat = os.stat(text)
    except OSError:
        key = None
    else:
        key = text, stat.st_size, stat.st_mtime_ns
    if files is not None:
        files.keys[text] = key
    return key


def load_mask(path: str | Path, *, limits: ReadLimits | None = None) -> np.ndarray:
    """Load a mask image as bool (H, W): foreground wherever any colour channel is >= 1 (MeCoVQA convention).

    Palette images are judged by their palette colours; an alpha channel is ignored. Only Pillow formats are
    supported (MeCoVQA and SA-Med2D-20M masks are PNG). A read checks the header against `limits` before decoding.
    """
    path = Path(path)
    limits = limits or ReadLimits()
    files = _REUSING.get()
    key = None if files is None else file_key(path)
    if key is None:
        return _read_mask(path, limits)
    if (hit := files.entries.get(("mask", *key))) is not None:
        # Limits bound what a read decodes: a mask decoded already (validation reads it under the data's own
        # `max_image_pixels`) is given to later callers, e.g. the encoder's region prompts, as it is.
        packed, shape = hit
        return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape).view(bool)
    mask = _read_mask(path, limits)
    files.masks_decoded += 1
    packed = np.packbits(mask)  # 1 bit a pixel: the same budget holds 8x more masks than bool arrays would
    files.entries.put(("mask", *key), (packed, mask.shape), packed.nbytes)
    return mask


def _read_mask(path: Path, limits: ReadLimits) -> np.ndarray:
    _check_file(path)
    kind = _file_format(path)
    if kind != "pillow":
        raise ImageReadError(
            path, "unsupported", f"masks must be an image Pillow reads (PNG), got {kind.upper()}"
        )
    with _open_pil(path, path) as image:
        if image.width == 0 or image.height == 0:
            raise ImageReadError(path, "empty", f"mask has zero size {image.height}x{image.width}")
        check_plane(path, image.height, image.width, limits)
        _decode_pil(image, path)
        if image.mode in ("P", "PA"):
            image = image.convert("RGB")
        elif image.mode in ("LA", "La"):
            image = image.convert("L")
        elif image.mode in ("RGBA", "RGBa", "RGBX"):
            image = image.convert("RGB")
        values = np.asarray(image)
    if values.ndim == 3:
        return (values >= 1).any(axis=2)
    return values >= 1


def image_size(
    path: str | Path, *, axis: int | str | None = None, limits: ReadLimits | None = None
) -> tuple[int, int]:
    """(height, width) of the image `load_image(path, axis=axis)` would return, reading headers only.

    Pillow formats read just the header (so a truncated file is not detected here: use `load_image` for that);
    DICOM reads the header without pixel data; NIfTI reads the header; a DICOM series or NRRD/MHA volume is read
    whole. Raises ImageReadError like `load_image`.
    """
    path = Path(path)
    limits = limits or ReadLimits()
    axis = None if axis is None else parse_axis(axis)
    files = _REUSING.get()
    key = None if files is None else file_key(path)
    if key is None:
        size = _read_image_size(path, axis, limits)
    elif (size := files.entries.get(("size", *key, axis))) is None:
        size = _read_image_size(path, axis, limits)
        files.entries.put(("size", *key, axis), size, 64)  # two ints and the key, roughly
    check_plane(path, *size, limits)  # a size read under looser limits is checked against these
    return size


def _read_image_size(path: Path, axis: int | None, limits: ReadLimits) -> tuple[int, int]:
    _check_file(path)
    kind = _file_format(path)
    if kind == "dicom":
        ds, _ = read_header(path, path, limits)
        height, width = int(ds.Rows), int(ds.Columns)
    elif kind == "nifti":
        height, width = plane_size(load_nifti(path, path, limits), axis)
    elif kind == "volume":
        height, width = load_image(path, axis=axis, limits=limits).shape[:2]
    else:
        with _open_pil(path, path) as image:
            width, height = image.size
    check_plane(path, height, width, limits)
    return height, width


def slice_count(
    src: str | Path | bytes, *, axis: int | str | None = None, limits: ReadLimits | None = None
) -> int:
    """How many slices `load_image(src, axis=axis)` picks from: the frames of a DICOM file, the slices along `axis`
    of a NIfTI or volume, 1 for anything else. Headers only, except a DICOM series or NRRD/MHA (read whole)."""
    limits = limits or ReadLimits()
    axis = None if axis is None else parse_axis(axis)
    if isinstance(src, (bytes, bytearray, memoryview)):
        source: Path | bytes = bytes(src)
        name: str | Path = "<bytes>"
        kind = sniff_bytes(source) if source else "pillow"
    else:
        source = name = Path(src)
        _check_file(source)
        kind = _file_format(source)
    if kind == "dicom":
        ds, _ = read_header(source, name, limits)
        return number_of_frames(ds)
    if kind == "nifti":
        image = load_nifti(source, name, limits)
        shape, ornt = tuple(int(n) for n in image.shape), orientation(image.affine)
        return ras_shape(shape, ornt)[default_axis(shape, ornt) if axis is None else axis]
    if kind == "volume":
        return load_volume(source, limits, name=str(name)).num_slices(2 if axis is None else axis)
    return 1
