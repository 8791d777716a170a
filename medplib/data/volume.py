"""Whole volumes: a NIfTI file, a DICOM series (a folder, or a zip of one) or an NRRD/MHA file, read into one
`Volume` (voxels as stored plus the voxel -> RAS+ mm affine), and back: a mask made on displayed slices returned to
the stored voxel order so it overlays the input in any viewer.

DICOM series, NRRD and MHA are read by SimpleITK (the `volumes` extra); every DICOM file's header is read first
(pydicom, no pixels) so that a series of mixed sizes, several series in one folder, or more voxels than
`ReadLimits` allow are refused before any pixel is decoded. A zip is checked member by member: a name that is
absolute, climbs out with `..` or is a symlink is refused, and no more than the declared sizes are inflated.
"""

from __future__ import annotations

import io
import math
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from medplib.data.display import Window
from medplib.data.nifti import (
    NIFTI_SUFFIXES,
    display_plane,
    load_nifti,
    orientation,
    read_voxels,
    slice_index,
)
from medplib.data.reading import (
    ImageReadError,
    ReadLimits,
    check_plane,
    gray_to_rgb,
    scale_to_uint8,
    too_large,
)

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
# Per DICOM file, bytes besides the voxels that a zip member may hold.
_DICOM_HEADER_ALLOWANCE = 256 * 1024
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """Voxels as stored (3-D, the image's own units: HU for CT) and the voxel -> RAS+ mm affine (NIfTI's)."""

    data: np.ndarray
    affine: np.ndarray
    name: str
    # DICOM input: the series' headers (no pixels), one per slice of the stored third axis, in that order.
    dicom_headers: list[Any] = field(default_factory=list)
    window: Window | None = None  # the series' own display window (DICOM), used when the caller gives none

    @property
    def ornt(self) -> np.ndarray:
        return orientation(self.affine)

    def ras(self) -> np.ndarray:
        """The voxels reoriented to RAS+ (a view: flips and transposes, no copy)."""
        from nibabel.orientations import apply_orientation

        return apply_orientation(self.data, self.ornt)

    def ras_shape(self) -> tuple[int, ...]:
        return self.ras().shape

    def num_slices(self, axis: int) -> int:
        return int(self.ras_shape()[axis])

    def display_slice(self, axis: int, index: int, window: Window | None = None) -> np.ndarray:
        """Slice `index` along RAS `axis` as uint8 (H, W, 3) in the display convention."""
        index = slice_index(index, self.num_slices(axis), axis, self.name)
        plane = display_plane(np.take(self.ras(), index, axis=axis))
        window = window or self.window
        return gray_to_rgb(scale_to_uint8(plane, *window.low_high) if window else scale_to_uint8(plane))

    def put_display_mask(self, ras_mask: np.ndarray, axis: int, index: int, mask: np.ndarray) -> None:
        """Write a displayed slice's mask (H, W) into a RAS-shaped volume mask."""
        plane = np.rot90(mask, k=-1)  # undo display_plane
        key: list[Any] = [slice(None)] * 3
        key[axis] = index
        ras_mask[tuple(key)] = plane

    def to_stored(self, ras_array: np.ndarray) -> np.ndarray:
        """A RAS-ordered array back in the stored voxel order (shape of `data`), for saving with `affine`."""
        from nibabel.orientations import apply_orientation, ornt_transform

        return np.ascontiguousarray(
            apply_orientation(ras_array, ornt_transform([[0, 1], [1, 1], [2, 1]], self.ornt))
        )


def is_volume_path(path: Path) -> bool:
    name = path.name.lower()
    return path.is_dir() or name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES + (".zip",))


def load_volume(
    source: str | Path | bytes, limits: ReadLimits | None = None, name: str | None = None
) -> Volume:
    """A NIfTI (path or bytes), a DICOM series (folder, zip path or zip bytes) or an NRRD/MHA file as a `Volume`."""
    limits = limits or ReadLimits()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "<bytes>"
        if not data:
            raise ImageReadError(label, "empty", "no bytes")
        if data[:4] == b"PK\x03\x04":
            return _zip_series(data, label, limits)
        if data[128:132] == b"DICM":
            raise ImageReadError(
                label,
                "unsupported",
                "one DICOM file is not a volume: send the series as a zip (or one frame as an image)",
            )
        return _nifti_volume(data, label, limits)
    path = Path(source)
    label = name or str(path)
    if not path.exists():
        raise ImageReadError(label, "missing", "file or folder not found")
    if path.is_dir():
        return read_dicom_series(sorted(p for p in path.iterdir() if p.is_file()), label, limits)
    lower = path.name.lower()
    if lower.endswith(".zip"):
        return _zip_series(path, label, limits)
    if lower.endswith(ITK_SUFFIXES):
        return _itk_volume(path, label, limits)
    if lower.endswith(NIFTI_SUFFIXES):
        return _nifti_volume(path, label, limits)
    raise ImageReadError(
        label,
        "unsupported",
        "not a volume: expected .nii/.nii.gz, a DICOM series folder or .zip, .nrrd or .mha",
    )


def _nifti_volume(source: Path | bytes, name: str, limits: ReadLimits) -> Volume:
    image = load_nifti(source, name, limits)
    voxels = math.prod(int(n) for n in image.shape[:3])
    if voxels * 4 > limits.max_volume_bytes:  # held whole as float32, whatever the stored type
        raise too_large(
            name,
            f"the volume {tuple(image.shape)} as float32 in bytes",
            voxels * 4,
            limits.max_volume_bytes,
            "max_volume_bytes",
        )
    data = read_voxels(
        image,
        (slice(None),) * min(3, len(image.shape)) + (0,) * max(0, len(image.shape) - 3),
        name,
        np.float32,
    )
    if data.ndim == 2:
        data = data[:, :, None]
    return Volume(data=data, affine=np.asarray(image.affine, dtype=np.float64), name=name)


def _itk_image_to_volume(
    image: Any, name: str, headers: list[Any] | None = None, window: Window | None = None
) -> Volume:
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise ImageReadError(name, "unsupported", f"expected a 3-D image, got {image.GetDimension()}-D")
    data = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    if data.ndim != 3:
        raise ImageReadError(name, "unsupported", f"expected one value per voxel, got shape {data.shape}")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    return Volume(data=data, affine=_LPS_TO_RAS @ lps, name=name, dicom_headers=headers or [], window=window)


def _itk_volume(path: Path, name: str, limits: ReadLimits) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ImageReadError(
            name, "unreadable", f"not a readable image ({str(err).strip().splitlines()[-1]})"
        ) from err
    size = reader.GetSize()
    if any(n == 0 for n in size):
        raise ImageReadError(name, "empty", f"image size {size} has an empty dimension")
    nbytes = int(np.prod(size)) * reader.GetNumberOfComponents() * 4
    if nbytes > limits.max_volume_bytes:
        raise too_large(
            name, f"declared voxel data {size} in bytes", nbytes, limits.max_volume_bytes, "max_volume_bytes"
        )
    try:
        return _itk_image_to_volume(reader.Execute(), name)
    except RuntimeError as err:
        raise ImageReadError(
            name, "unreadable", f"cannot read voxel data ({str(err).strip().splitlines()[-1]})"
        ) from err


def _slice_position(ds: Any) -> float:
    """Position along the slice normal (ImagePositionPatient on the cross product of ImageOrientationPatient)."""
    orient = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    return float(np.dot(np.cross(orient[:3], orient[3:]), [float(v) for v in ds.ImagePositionPatient]))


def read_dicom_series(files: list[Path], name: str, limits: ReadLimits) -> Volume:
    """The one DICOM series among `files` (non-DICOM files are ignored), sorted along its slice normal."""
    import pydicom
    import SimpleITK as sitk

    if len(files) > limits.max_files:
        raise too_large(name, "the number of files", len(files), limits.max_files, "max_files")
    headers: list[tuple[Path, Any]] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - README, DICOMDIR-less junk: not part of the series
            continue
        if "Rows" in ds and "Columns" in ds:
            headers.append((path, ds))
    if not headers:
        raise ImageReadError(name, "unreadable", "no DICOM image file in the series folder")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in headers})
    if len(series) > 1:
        raise ImageReadError(
            name, "unsupported", f"{len(series)} DICOM series in one folder ({', '.join(series)}); give one"
        )
    first_path, first = headers[0]
    rows, cols = int(first.Rows or 0), int(first.Columns or 0)
    check_plane(name, rows, cols, limits)
    for path, ds in headers[1:]:
        if (int(ds.Rows or 0), int(ds.Columns or 0)) != (rows, cols):
            raise ImageReadError(
                name,
                "unsupported",
                f"the series mixes slice sizes: {first_path.name} is {rows}x{cols}, {path.name} is {ds.Rows}x{ds.Columns} "
                "(Rows x Columns)",
            )
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in headers):
        raise ImageReadError(
            name, "unsupported", "a multi-frame file in a series folder; give the file itself"
        )
    nbytes = rows * cols * len(headers) * 4
    if nbytes > limits.max_volume_bytes:
        raise too_large(
            name,
            f"the series ({len(headers)} slices of {rows}x{cols}) in bytes",
            nbytes,
            limits.max_volume_bytes,
            "max_volume_bytes",
        )
    try:
        headers.sort(key=lambda item: _slice_position(item[1]))
    except (AttributeError, TypeError, ValueError) as err:
        raise ImageReadError(
            name, "unsupported", f"a slice lacks ImagePositionPatient/ImageOrientationPatient ({err})"
        ) from err
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(path) for path, _ in headers])  # kept in this order: slice k is headers[k]
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise ImageReadError(
            name, "unreadable", f"cannot read the series ({str(err).strip().splitlines()[-1]})"
        ) from err
    window = None
    center, width = first.get("WindowCenter"), first.get("WindowWidth")
    if center is not None and width is not None:
        center = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
        width = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
        if float(width) > 0:
            window = Window(center=float(center), width=float(width))
    return _itk_image_to_volume(image, name, [ds for _, ds in headers], window)


def safe_member_name(info: zipfile.ZipInfo) -> bool:
    """False for a zip member that is a symlink or whose name is absolute or climbs out of the archive."""
    raw = info.filename
    pure = PurePosixPath(raw.replace("\\", "/"))
    mode = info.external_attr >> 16
    return not (
        pure.is_absolute() or ".." in pure.parts or (len(raw) > 1 and raw[1] == ":") or stat.S_ISLNK(mode)
    )


def _zip_series(source: Path | bytes, name: str, limits: ReadLimits) -> Volume:
    try:
        archive = zipfile.ZipFile(source if isinstance(source, Path) else io.BytesIO(source))
    except (zipfile.BadZipFile, OSError) as err:
        raise ImageReadError(name, "unreadable", f"not a readable zip archive ({err})") from err
    with archive, tempfile.TemporaryDirectory(prefix="medplib-series-") as folder:
        members = [info for info in archive.infolist() if not info.is_dir()]
        for info in archive.infolist():
            if not safe_member_name(info):
                raise ImageReadError(
                    name, "unsupported", f"zip member {info.filename!r} points outside the archive"
                )
        if len(members) > limits.max_files:
            raise too_large(
                name, "the number of files in the zip", len(members), limits.max_files, "max_files"
            )
        bound = limits.max_volume_bytes + _DICOM_HEADER_ALLOWANCE * len(members)
        declared = sum(info.file_size for info in members)
        if declared > bound:
            raise too_large(name, "the zip's uncompressed size in bytes", declared, bound, "max_volume_bytes")
        files = []
        for k, info in enumerate(members):
            # Written under a name of our own: nothing in the archive decides where a file lands.
            target = Path(folder) / f"{k:05d}.dcm"
            try:
                with archive.open(info) as src, target.open("wb") as dst:
                    # ZipExtFile stops at the member's declared size and checks its CRC.
                    while chunk := src.read(1024 * 1024):
                        dst.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
                raise ImageReadError(
                    name, "unreadable", f"zip member {info.filename!r} is corrupt ({err})"
                ) from err
            files.append(target)
        return read_dicom_series(files, name, limits)


def read_volume_plane(
    volume: Volume, axis: int | None, index: int | None, window: Window | None, limits: ReadLimits
) -> np.ndarray:
    """One displayed slice of a volume read whole (a DICOM series, NRRD/MHA) as uint8 (H, W, 3)."""
    axis = 2 if axis is None else axis
    h, w = [n for a, n in enumerate(volume.ras_shape()) if a != axis][::-1]
    check_plane(volume.name, h, w, limits)
    k = slice_index(index, volume.num_slices(axis), axis, volume.name)
    return volume.display_slice(axis, k, window)
