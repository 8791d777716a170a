"""Binary masks on the wire: COCO run-length encoding (both forms) and base64 PNG.

COCO RLE (the format of pycocotools' `mask.encode`, written here without the C extension):

* `size` is `[height, width]`; `counts` are run lengths over the mask flattened in **column-major** (Fortran)
  order, starting with a run of zeros (which may be 0 when the first pixel is set).
* Uncompressed form: `{"size": [h, w], "counts": [int, ...]}` (what COCO annotation files use for crowds).
* Compressed form: `counts` is a string. Each count (from the third on, minus the count two before it) is written
  as 5-bit groups, least significant first, in characters `chr(48 + group | 0x20 if more follow)`, a LEB128-like
  code with 6 bits a character (pycocotools `rleToString` / `rleFrString`).

Every decoding failure raises `MaskFormatError` (a ValueError) saying what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError


class MaskFormatError(ValueError):
    """A mask on the wire (RLE or PNG) could not be decoded; the message says why."""


def _runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths of a bool (H, W) mask, starting with zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return counts


def counts_to_string(counts: list[int]) -> str:
    """pycocotools' `rleToString`: run lengths -> the compressed COCO string."""
    out: list[str] = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as in C for a signed long
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def string_to_counts(text: str) -> list[int]:
    """pycocotools' `rleFrString`: the compressed COCO string -> run lengths. Raises MaskFormatError."""
    counts: list[int] = []
    p, n = 0, len(text)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise MaskFormatError("RLE counts string ends in the middle of a number")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise MaskFormatError(
                    f"RLE counts string has {text[p]!r} at position {p}; COCO RLE uses only '0' to 'o'"
                )
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode_rle(mask: np.ndarray, compressed: bool = True) -> dict[str, Any]:
    """A bool (H, W) mask -> COCO RLE `{"size": [h, w], "counts": str | list[int]}`."""
    if mask.ndim != 2:
        raise ValueError(f"encode_rle takes an (H, W) mask, got shape {mask.shape}")
    counts = _runs(mask)
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": counts_to_string(counts) if compressed else counts}


def check_rle(rle: dict[str, Any]) -> tuple[int, int, list[int]]:
    """Validate a COCO RLE (either form) -> (h, w, counts). Raises MaskFormatError naming the problem."""
    if not isinstance(rle, dict):
        raise MaskFormatError(f"RLE must be an object with 'size' and 'counts', got {type(rle).__name__}")
    size = rle.get("size")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise MaskFormatError(f"RLE 'size' must be [height, width] with positive integers, got {size!r}")
    h, w = int(size[0]), int(size[1])
    raw = rle.get("counts")
    if isinstance(raw, str):
        counts = string_to_counts(raw)
    elif isinstance(raw, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            raise MaskFormatError("RLE 'counts' list must hold integers only")
        counts = [int(v) for v in raw]
    else:
        raise MaskFormatError(
            f"RLE 'counts' must be a list of run lengths or a compressed COCO string, got {type(raw).__name__}"
        )
    if any(c < 0 for c in counts):
        raise MaskFormatError("RLE 'counts' has a negative run length")
    total = sum(counts)
    if total != h * w:
        raise MaskFormatError(f"RLE run lengths sum to {total}, but size {h}x{w} needs {h * w}")
    return h, w, counts


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (either form) -> bool (H, W). Raises MaskFormatError for a malformed RLE."""
    h, w, counts = check_rle(rle)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy()


def png_encode(mask: np.ndarray) -> bytes:
    """bool (H, W) -> 8-bit grayscale PNG, 0 and 255."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).save(
        buf, format="PNG", compress_level=1
    )
    return buf.getvalue()


def png_decode(data: bytes) -> np.ndarray:
    """A mask image (PNG or anything Pillow reads) -> bool (H, W): any channel >= 1 is foreground (MeCoVQA)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in ("P", "PA", "RGBA", "RGBa", "RGBX"):
                image = image.convert("RGB")
            elif image.mode in ("LA", "La"):
                image = image.convert("L")
            values = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MaskFormatError(f"not a readable PNG mask ({err})") from err
    if values.ndim == 3:
        return (values >= 1).any(axis=2)
    return values >= 1


def b64decode(text: str, what: str) -> bytes:
    """Strict base64 (whitespace ignored) -> bytes; MaskFormatError names `what` otherwise."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise MaskFormatError(f"{what} is not valid base64 ({err})") from err


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
