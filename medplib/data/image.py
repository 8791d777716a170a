"""Image and mask I/O shared by validation, preprocessing and the model's Predictor.

Every image comes back as a uint8 (H, W, 3) RGB array whatever it was stored as:

* PNG / JPEG / anything Pillow opens. 8-bit modes are converted to RGB; 16-bit and float modes (common for
  medical PNG/TIFF) are min-max scaled to uint8; alpha is dropped.
* DICOM (`.dcm`, `.dicom`, or any file with the `DICM` preamble): rescale slope/intercept applied, then the
  file's first WindowCenter/WindowWidth if present, else min-max of the pixel data, to uint8. MONOCHROME1 is
  inverted so that bright means dense as in MONOCHROME2. Multi-frame files: `slice_index` picks the frame
  (default: the middle one).
* NIfTI (`.nii`, `.nii.gz`): the 2-D slice `slice_index` along voxel `axis` (default: the middle slice) of the
  first volume, min-max scaled, then `np.rot90` (90 degrees counter-clockwise). For a volume stored in RAS+
  voxel order (nibabel's canonical orientation) that puts anterior/superior at the top and the patient's left on
  the viewer's left: neurological view. The volume is not reoriented, so other storage orders show rotated or
  flipped, exactly as stored.
* numpy arrays (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of any dtype: uint8 is kept, bool becomes 0/255,
  anything else is min-max scaled over the whole array (so colour balance is kept); alpha is dropped.
* PIL images: as for files.
* bytes: the content of any of the files above (an upload); DICOM and NIfTI (optionally gzipped) are recognised by
  their magic bytes, anything else goes to Pillow.

Masks (`load_mask`) follow the MeCoVQA convention: any value >= 1 in any colour channel is foreground.

Every failure raises `ImageReadError`, which names the file and says what was wrong; its `problem` attribute
("missing", "empty", "unreadable", "unsupported") lets callers map it to a rejection reason without parsing text.

Inside `with reusing(files)`, `load_mask` and `image_size` look a file up in `files` (a `DecodedFiles`) by path,
size and modification time before reading it: preprocessing validates a mask, then loads it as a target or a
region prompt, and several rows share one mask, yet each is decoded once per process.
"""

from __future__ import annotations

import gzip
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from medplib.data.lru import BoundedCache

logger = logging.getLogger(__name__)

ImageProblem = Literal["missing", "empty", "unreadable", "unsupported"]
ImageSource = str | Path | bytes | np.ndarray | Image.Image

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")

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


class ImageReadError(ValueError):
    """An image or mask could not be read. The message names the file; `problem` classifies the failure."""

    def __init__(self, source: str | Path, problem: ImageProblem, detail: str) -> None:
        self.source = str(source)
        self.problem: ImageProblem = problem
        self.detail = detail
        super().__init__(f"{source}: {detail}")


def _file_format(path: Path) -> Literal["dicom", "nifti", "pillow"]:
    name = path.name.lower()
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
    """Raise ImageReadError unless `path` is a non-empty regular file."""
    if not path.exists():
        raise ImageReadError(path, "missing", "file not found")
    if not path.is_file():
        raise ImageReadError(path, "unreadable", "not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty", "file is empty (0 bytes)")


def scale_to_uint8(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Linearly map [low, high] (default: the array's finite min and max) to [0, 255] as uint8, clipping outside.

    NaN and infinities become `low`. A constant array maps to all zeros.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if low is None or high is None:
        if not finite.any():
            return np.zeros(values.shape, dtype=np.uint8)
        low = float(values[finite].min()) if low is None else low
        high = float(values[finite].max()) if high is None else high
    values = np.where(finite, values, low)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


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


def _open_pil(source: Path | io.BytesIO, name: str | Path, *, decode: bool = True) -> Image.Image:
    """Open a Pillow-readable file (fully decoded unless `decode=False`), mapping failures to ImageReadError."""
    try:
        image = Image.open(source)
    except UnidentifiedImageError as err:
        raise ImageReadError(
            name, "unreadable", "not a recognised image format (corrupt or unsupported)"
        ) from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(name, "unreadable", f"image too large ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(name, "unreadable", f"corrupt image header ({err})") from err
    if not decode:
        return image
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt pixel data
        image.close()
        raise ImageReadError(name, "unreadable", f"corrupt image data ({err})") from err
    return image


def _middle_or(index: int | None, length: int, name: str | Path, what: str) -> int:
    if index is None:
        return length // 2
    if not -length <= index < length:
        raise ImageReadError(name, "unsupported", f"{what} {index} out of range for {length} slices")
    return index % length


def _read_dicom(source: Path | io.BytesIO, name: str | Path, slice_index: int | None) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.multival import MultiValue

    try:
        ds = pydicom.dcmread(source)
        pixels = ds.pixel_array
    except InvalidDicomError as err:
        raise ImageReadError(name, "unreadable", f"not a valid DICOM file ({err})") from err
    except AttributeError as err:  # no PixelData element
        raise ImageReadError(name, "unreadable", "DICOM file has no pixel data") from err
    except Exception as err:  # pydicom raises many types for bad or unsupported compressed data
        raise ImageReadError(
            name, "unreadable", f"cannot decode DICOM pixel data ({type(err).__name__}: {err})"
        ) from err

    samples_per_pixel = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[_middle_or(slice_index, pixels.shape[0], name, "frame")]
    if samples_per_pixel != 1:  # colour DICOM (pydicom already converted YBR to RGB)
        return _array_to_rgb(pixels, str(name))

    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = pixels.astype(np.float64) * slope + intercept
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, MultiValue) else center)
        width = float(width[0] if isinstance(width, MultiValue) else width)
    if center is not None and width is not None and width > 0:
        gray = scale_to_uint8(values, center - width / 2, center + width / 2)
    else:
        gray = scale_to_uint8(values)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        gray = 255 - gray
    return _array_to_rgb(gray, str(name))


def _load_nifti(source: Path | bytes, name: str | Path):  # -> nibabel.Nifti1Image | Nifti2Image
    import nibabel as nib

    try:
        if isinstance(source, bytes):
            if source[:2] == b"\x1f\x8b":
                source = gzip.decompress(source)
            header_size = int.from_bytes(source[:4], "little")
            if header_size not in (348, 540):
                header_size = int.from_bytes(source[:4], "big")
            image_class = nib.Nifti2Image if header_size == 540 else nib.Nifti1Image
            return image_class.from_bytes(source)
        return nib.load(source)
    except Exception as err:  # nibabel raises ImageFileError, EOFError, gzip errors, ...
        raise ImageReadError(
            name, "unreadable", f"not a readable NIfTI file ({type(err).__name__}: {err})"
        ) from err


def _nifti_slice_spec(shape: tuple[int, ...], slice_index: int | None, axis: int, name: str | Path) -> tuple:
    """Index tuple selecting one 2-D slice of the first volume."""
    if len(shape) == 2:
        return (slice(None), slice(None))
    if len(shape) < 2 or 0 in shape[:3]:
        raise ImageReadError(name, "empty", f"NIfTI volume has unusable shape {shape}")
    if axis not in (0, 1, 2):
        raise ImageReadError(name, "unsupported", f"axis must be 0, 1 or 2, got {axis}")
    index: list = [slice(None)] * 3 + [0] * (len(shape) - 3)  # extra dims (time, ...): first volume
    index[axis] = _middle_or(slice_index, shape[axis], name, f"slice_index along axis {axis}")
    return tuple(index)


def _read_nifti(source: Path | bytes, name: str | Path, slice_index: int | None, axis: int) -> np.ndarray:
    image = _load_nifti(source, name)
    index = _nifti_slice_spec(tuple(image.shape), slice_index, axis, name)
    try:
        plane = np.asarray(
            image.dataobj[index], dtype=np.float64
        )  # reads only this slice; applies scl_slope/inter
    except Exception as err:
        raise ImageReadError(
            name, "unreadable", f"cannot read NIfTI voxel data ({type(err).__name__}: {err})"
        ) from err
    return _array_to_rgb(np.rot90(scale_to_uint8(plane)), str(name))


def _sniff_bytes(data: bytes) -> Literal["dicom", "nifti", "pillow"]:
    if data[128:132] == b"DICM":
        return "dicom"
    head = data
    if data[:2] == b"\x1f\x8b":  # gzip: only NIfTI is expected gzipped; peek at the header
        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(data)).read(348)
        except (OSError, EOFError):
            return "pillow"
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1", b"n+2", b"ni2"):
        return "nifti"
    if len(head) >= 540 and head[4:7] in (b"n+2", b"ni2"):  # NIfTI-2 keeps its magic at byte 4
        return "nifti"
    return "pillow"


def _load_bytes(data: bytes, slice_index: int | None, axis: int) -> np.ndarray:
    name = "<bytes>"
    if not data:
        raise ImageReadError(name, "empty", "no bytes")
    kind = _sniff_bytes(data)
    if kind == "dicom":
        return _read_dicom(io.BytesIO(data), name, slice_index)
    if kind == "nifti":
        return _read_nifti(data, name, slice_index, axis)
    with _open_pil(io.BytesIO(data), name) as image:
        return _pil_to_rgb(image, name)


def load_image(src: ImageSource, *, slice_index: int | None = None, axis: int = 2) -> np.ndarray:
    """Load `src` as uint8 (H, W, 3) RGB; see the module docstring for each format.

    `src` is a path, the bytes of a file (an upload; the format is sniffed from the content), a numpy array or a
    PIL image. `slice_index` picks the NIfTI slice along `axis` or the frame of a multi-frame DICOM (default: the
    middle one). Raises ImageReadError naming the file for a missing, empty, corrupt or unsupported input.
    """
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, "<array>")
    if isinstance(src, Image.Image):
        return _pil_to_rgb(src, getattr(src, "filename", "") or "<PIL image>")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _load_bytes(bytes(src), slice_index, axis)
    if not isinstance(src, (str, Path)):
        raise TypeError(
            f"load_image expects a path, bytes, numpy array or PIL image, got {type(src).__name__}"
        )
    path = Path(src)
    _check_file(path)
    kind = _file_format(path)
    if kind == "dicom":
        return _read_dicom(path, path, slice_index)
    if kind == "nifti":
        return _read_nifti(path, path, slice_index, axis)
    with _open_pil(path, path) as image:
        return _pil_to_rgb(image, str(path))


class DecodedFiles:
    """Masks (bit-packed) and image sizes already read, by what they are and the file's `file_key`, the least
    recently used out past `max_bytes`; `masks_decoded` counts the masks actually decoded."""

    def __init__(self, max_bytes: int) -> None:
        self.entries: BoundedCache[Any] = BoundedCache(max_bytes)
        self.masks_decoded = 0


_REUSING: ContextVar[DecodedFiles | None] = ContextVar("medplib_decoded_files", default=None)


@contextmanager
def reusing(files: DecodedFiles) -> Iterator[DecodedFiles]:
    """Within the block, `load_mask` and `image_size` reuse what `files` holds and add what they read."""
    token = _REUSING.set(files)
    try:
        yield files
    finally:
        _REUSING.reset(token)


def file_key(path: Path) -> tuple[str, int, int] | None:
    """(path, size, modification time in ns) of a file, None when it cannot be stat'ed (the reader says why)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path), stat.st_size, stat.st_mtime_ns


def load_mask(path: str | Path) -> np.ndarray:
    """Load a mask image as bool (H, W): foreground wherever any colour channel is >= 1 (MeCoVQA convention).

    Palette images are judged by their palette colours; an alpha channel is ignored. Only Pillow formats are
    supported (MeCoVQA and SA-Med2D-20M masks are PNG).
    """
    path = Path(path)
    files = _REUSING.get()
    key = None if files is None else file_key(path)
    if key is None:
        return _read_mask(path)
    if (hit := files.entries.get(("mask", *key))) is not None:
        packed, shape = hit
        return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape).view(bool)
    mask = _read_mask(path)
    files.masks_decoded += 1
    packed = np.packbits(mask)  # 1 bit a pixel: the same budget holds 8x more masks than bool arrays would
    files.entries.put(("mask", *key), (packed, mask.shape), packed.nbytes)
    return mask


def _read_mask(path: Path) -> np.ndarray:
    _check_file(path)
    kind = _file_format(path)
    if kind != "pillow":
        raise ImageReadError(
            path, "unsupported", f"masks must be an image Pillow reads (PNG), got {kind.upper()}"
        )
    with _open_pil(path, path) as image:
        if image.width == 0 or image.height == 0:
            raise ImageReadError(path, "empty", f"mask has zero size {image.height}x{image.width}")
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


def image_size(path: str | Path, *, axis: int = 2) -> tuple[int, int]:
    """(height, width) of the image `load_image(path, axis=axis)` would return, reading headers only.

    Pillow formats read just the header (so a truncated file is not detected here: use `load_image` for that);
    DICOM reads the header without pixel data; NIfTI reads the header. Raises ImageReadError like `load_image`.
    """
    path = Path(path)
    files = _REUSING.get()
    key = None if files is None else file_key(path)
    if key is None:
        return _read_image_size(path, axis)
    if (size := files.entries.get(("size", *key, axis))) is None:
        size = _read_image_size(path, axis)
        files.entries.put(("size", *key, axis), size, 64)  # two ints and the key, roughly
    return size


def _read_image_size(path: Path, axis: int) -> tuple[int, int]:
    _check_file(path)
    kind = _file_format(path)
    if kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            height, width = int(ds.Rows), int(ds.Columns)
        except Exception as err:
            raise ImageReadError(
                path, "unreadable", f"not a valid DICOM file ({type(err).__name__}: {err})"
            ) from err
    elif kind == "nifti":
        shape = tuple(_load_nifti(path, path).shape)
        index = _nifti_slice_spec(shape, None, axis, path)
        plane_dims = [n for n, i in zip(shape, index, strict=True) if isinstance(i, slice)]
        height, width = plane_dims[1], plane_dims[0]  # np.rot90 swaps the two in-plane axes
    else:
        with _open_pil(path, path, decode=False) as image:
            width, height = image.size
    if height == 0 or width == 0:
        raise ImageReadError(path, "empty", f"image has zero size {height}x{width}")
    return height, width
