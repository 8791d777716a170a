"""DICOM reading with pydicom's own pixel pipeline, header first.

One frame is decoded (`pydicom.pixels.pixel_array(..., index=k)`), never the whole multi-frame file, and only after
Rows x Columns and the declared size passed `ReadLimits`. A Deflated transfer syntax is inflated with a bound.
Monochrome frames go through the Modality LUT (rescale slope/intercept or Modality LUT Sequence) and then, unless
the caller gives a window, the file's VOI LUT Sequence or window with its VOILUTFunction (LINEAR, LINEAR_EXACT,
SIGMOID), all by `pydicom.pixels.apply_modality_lut` / `apply_voi_lut`. Enhanced multi-frame files keep these per
frame in the Shared and Per-frame Functional Groups; the frame's own values are used. The VOI output range (the
values the transform can produce) maps to 0..255; MONOCHROME1 (or Presentation LUT Shape INVERSE) is inverted so
that bright always means dense. Colour frames (RGB, YBR converted by pydicom, PALETTE COLOR) come back as RGB.

JPEG, JPEG-LS and JPEG 2000 need the decoder plugins of the `dicom` extra (pylibjpeg with its openjpeg and libjpeg
backends); without them such a file is refused with a message saying so.
"""

from __future__ import annotations

import io
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medplib.data.display import Window
from medplib.data.reading import (
    ImageReadError,
    ReadLimits,
    check_plane,
    gray_to_rgb,
    scale_to_uint8,
    too_large,
)

DICOM_SUFFIXES = (".dcm", ".dicom")
# Attributes of the functional groups that hold a frame's Modality LUT and VOI LUT values.
_FRAME_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}


def _open(source: Path | bytes) -> Any:
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _inflated(source: Path | bytes, name: str | Path, limits: ReadLimits) -> Path | bytes:
    """`source`, or for the Deflated Explicit VR transfer syntax the same file inflated (boundedly) and re-labelled
    Explicit VR Little Endian: pydicom itself would inflate it whole before reading a single tag."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    with open(source, "rb") if isinstance(source, Path) else io.BytesIO(source) as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return source
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        # Dataset elements besides the voxels are small; allow a generous margin for them.
        bound = limits.max_volume_bytes + 64 * 1024 * 1024
        body = inflater.decompress(fp.read(), bound)
    if inflater.unconsumed_tail:
        raise too_large(name, "the inflated DICOM dataset in bytes", bound + 1, bound, "max_volume_bytes")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    out.write(body)
    return out.getvalue()


def read_header(source: Path | bytes, name: str | Path, limits: ReadLimits) -> tuple[Any, Path | bytes]:
    """(dataset without pixel data, the source to decode frames from); raises ImageReadError for a file that is not
    DICOM, has no pixels or declares more than the limits."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        source = _inflated(source, name, limits)
        ds = pydicom.dcmread(_open(source), stop_before_pixels=True)
    except ImageReadError:
        raise
    except InvalidDicomError as err:
        raise ImageReadError(name, "unreadable", f"not a valid DICOM file ({err})") from err
    except Exception as err:  # truncated headers, bad VRs, ...
        raise ImageReadError(
            name, "unreadable", f"not a valid DICOM file ({type(err).__name__}: {err})"
        ) from err
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(name, "unreadable", "DICOM file has no pixel data (no Rows/Columns)")
    rows, cols = int(ds.Rows or 0), int(ds.Columns or 0)
    if rows == 0 or cols == 0:
        raise ImageReadError(name, "empty", f"DICOM Rows x Columns is {rows}x{cols}")
    check_plane(name, rows, cols, limits)
    frames = number_of_frames(ds)
    nbytes = (
        rows
        * cols
        * frames
        * int(ds.get("SamplesPerPixel", 1) or 1)
        * math.ceil(int(ds.get("BitsAllocated", 8) or 8) / 8)
    )
    if nbytes > limits.max_volume_bytes:
        raise too_large(
            name,
            f"declared pixel data ({frames} frames of {rows}x{cols}) in bytes",
            nbytes,
            limits.max_volume_bytes,
            "max_volume_bytes",
        )
    return ds, source


def number_of_frames(ds: Any) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def frame_dataset(ds: Any, index: int) -> Any:
    """A shallow copy of `ds` whose top-level rescale and window values are frame `index`'s (enhanced multi-frame
    files keep them in the Shared and Per-frame Functional Groups, where pydicom's LUT helpers do not look)."""
    groups = [seq[0] for seq in [ds.get("SharedFunctionalGroupsSequence")] if seq]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    if not groups:
        return ds
    out = ds.copy()
    for group in groups:  # per-frame values override the shared ones
        for sequence, keywords in _FRAME_GROUPS.items():
            items = group.get(sequence)
            if not items:
                continue
            for keyword in keywords:
                if keyword in items[0]:
                    setattr(out, keyword, items[0][keyword].value)
    return out


def decode_frame(source: Path | bytes, ds: Any, index: int, name: str | Path) -> np.ndarray:
    """Frame `index` only, decoded by pydicom (with the `dicom` extra's plugins for compressed syntaxes)."""
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(_open(source), index=index)
    except Exception as err:  # pydicom raises many types for bad or unsupported compressed data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = ""
        if syntax is not None and syntax.is_compressed:
            hint = f" (transfer syntax {syntax.name}: the decoders come with `pip install 'medplib[dicom]'`)"
        raise ImageReadError(
            name, "unreadable", f"cannot decode DICOM pixel data{hint} ({type(err).__name__}: {err})"
        ) from err


def _voi_range(values: np.ndarray, fds: Any) -> tuple[float, float] | None:
    """What the frame's VOI transform (pydicom's choice: VOI LUT Sequence first, then the window) can output, or
    None when it has neither."""
    from pydicom.pixels import apply_voi_lut

    lut = fds.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") and lut[0].get("LUTData") is not None:
        entries, first, _ = (int(v) for v in lut[0].LUTDescriptor)
        out = apply_voi_lut(np.arange(first, first + (entries or 2**16)), fds)
        return float(out.min()), float(out.max())
    if fds.get("WindowCenter") is not None and fds.get("WindowWidth") is not None:
        with np.errstate(over="ignore"):
            out = apply_voi_lut(np.array([-1e30, 1e30]), fds)
        return float(out[0]), float(out[1])
    return None


def render_frame(
    pixels: np.ndarray, ds: Any, index: int, window: Window | None, name: str | Path
) -> np.ndarray:
    """A decoded frame as uint8 (H, W, 3) (see the module docstring)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        return scale_to_uint8(rgb, 0, 255 if rgb.dtype == np.uint8 else 65535)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:  # RGB, or YBR that pydicom already converted to RGB
        if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
            raise ImageReadError(name, "unsupported", f"unexpected colour frame shape {pixels.shape}")
        top = 255 if pixels.dtype == np.uint8 else 2 ** int(ds.get("BitsStored", 16)) - 1
        return np.ascontiguousarray(scale_to_uint8(pixels[:, :, :3], 0, top))
    fds = frame_dataset(ds, index)
    try:
        values = apply_modality_lut(pixels, fds)
        if window is not None:
            gray = scale_to_uint8(values, *window.low_high)
        else:
            voi_range = _voi_range(values, fds)
            if voi_range is None:
                gray = scale_to_uint8(values)
            else:
                if fds.get("VOILUTSequence") and np.issubdtype(values.dtype, np.floating):
                    values = np.rint(values).astype(np.int64)  # the LUT is indexed by stored integers
                gray = scale_to_uint8(apply_voi_lut(values, fds), *voi_range)
    except (ValueError, TypeError, AttributeError, IndexError, NotImplementedError) as err:
        raise ImageReadError(
            name, "unreadable", f"bad DICOM LUT or window ({type(err).__name__}: {err})"
        ) from err
    inverse = str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
    if photometric == "MONOCHROME1" or inverse:
        gray = 255 - gray
    return gray_to_rgb(gray)


def frame_index(ds: Any, index: int | None, name: str | Path) -> int:
    frames = number_of_frames(ds)
    if index is None:
        return frames // 2
    if not -frames <= index < frames:
        raise ImageReadError(name, "unsupported", f"frame {index} out of range for {frames} frames")
    return index % frames


def read_dicom(
    source: Path | bytes, name: str | Path, index: int | None, window: Window | None, limits: ReadLimits
) -> np.ndarray:
    """Frame `index` (default: the middle one) of a DICOM file as uint8 (H, W, 3)."""
    ds, source = read_header(source, name, limits)
    k = frame_index(ds, index, name)
    return render_frame(decode_frame(source, ds, k, name), ds, k, window, name)
