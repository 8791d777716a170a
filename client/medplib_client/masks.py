"""Binary masks on the wire: COCO run-length encoding (both forms) and base64 PNG.

COCO RLE (the format of pycocotools' `mask.encode`, written here without the C extension):

* `size` is `[height, width]`; `counts` are run lengths over the mask flattened in **column-major** (Fortran)
  order, starting with a run of zeros (which may be 0 when the first pixel is set).
* Uncompressed form: `{"size": [h, w], "counts": [int, ...]}` (what COCO annotation files use for crowds).
* Compressed form: `counts` is a string. Each count (from the third on, minus the count two before it) is written
  as 5-bit groups, least significant first, in characters `chr(48 + group | 0x20 if more follow)`, a LEB128-like
  code with 6 bits a character (pycocotools `rleToString` / `rleFrString`).

Every decoding failure raises `MaskFormatError` (a ValueError) saying what was wrong. Decoding is linear in the
mask's pixels and the encoding's length, and checks a mask's declared size before allocating it.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError


class MaskFormatError(ValueError):
    """A mask on the wire (RLE or PNG) could not be decoded; the message says why."""


class MaskTooLarge(MaskFormatError):
    """A mask over a limit, refused before it is decoded; `limit` says which: "pixels" or "runs"."""

    def __init__(self, message: str, limit: Literal["pixels", "runs"]) -> None:
        super().__init__(message)
        self.limit = limit


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


# A run length needs at most 9 characters for any image up to 2^40 pixels; pycocotools writes at most 13 (a 64-bit
# long). 12 keeps every shift below 64 bits, and bounds the work per character, where an unbounded number made
# decoding quadratic in its length.
MAX_COUNT_CHARS = 12
_CHUNK_CHARS = (
    1 << 18
)  # characters decoded at once: bounds the temporaries (~10 MB) whatever the string's length


def _string_deltas(text: str) -> Iterator[np.ndarray]:
    """The numbers of a compressed COCO string (before undoing the delta coding), int64, a chunk at a time."""
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError as err:
        raise MaskFormatError(
            f"RLE counts string has {text[err.start]!r} at position {err.start}; COCO RLE uses only '0' to 'o'"
        ) from err
    codes = np.frombuffer(data, dtype=np.uint8)
    start = 0
    while start < len(codes):
        chunk = codes[start : start + _CHUNK_CHARS] - np.uint8(48)  # below '0' wraps around to > 63
        if chunk.max() > 63:
            p = start + int(np.argmax(chunk > 63))
            raise MaskFormatError(
                f"RLE counts string has {text[p]!r} at position {p}; COCO RLE uses only '0' to 'o'"
            )
        ends = np.flatnonzero(chunk < 32)  # no continuation bit (0x20): the character ends a number
        if start + len(chunk) == len(codes) and (ends.size == 0 or ends[-1] != len(chunk) - 1):
            raise MaskFormatError("RLE counts string ends in the middle of a number")
        if ends.size == 0:
            raise MaskFormatError(
                f"RLE counts string has a number longer than {MAX_COUNT_CHARS} characters at position {start}"
            )
        chunk = chunk[: ends[-1] + 1]  # a number cut by the chunk's end starts the next chunk
        lengths = np.diff(ends, prepend=-1)
        longest = int(lengths.max())
        if longest > MAX_COUNT_CHARS:
            k = int(np.argmax(lengths > MAX_COUNT_CHARS))
            raise MaskFormatError(
                f"RLE counts string has a number of {int(lengths[k])} characters at position "
                f"{start + int(ends[k] - lengths[k] + 1)}; a run length takes at most {MAX_COUNT_CHARS}"
            )
        groups = (chunk & 0x1F).astype(np.int64)
        if longest == 1:  # one character a number, the common case: no shifting needed
            values = groups
        else:
            starts = ends - lengths + 1
            digit = np.arange(len(chunk)) - np.repeat(starts, lengths)  # each character's place in its number
            values = np.add.reduceat(groups << (5 * digit), starts)
        # Sign extension, as pycocotools does: a last group with bit 0x10 makes the number negative.
        negative = (chunk[ends] & 0x10) != 0
        values -= negative * np.left_shift(np.int64(1), 5 * lengths)
        yield values
        start += len(chunk)


def _undelta(chunks: Iterator[np.ndarray], total: int | None) -> Iterator[np.ndarray]:
    """pycocotools' delta coding undone: from the fourth number on, each adds the run length two before it."""
    index, last = 0, [0, 0]  # numbers so far; the last run length at an even and at an odd position
    for x in chunks:
        if total is not None and x.size and np.abs(x).max() > total:
            raise MaskFormatError(f"RLE counts string holds a run length beyond the mask's {total} pixels")
        counts = x.copy()
        for parity in (0, 1):
            first = (parity - index) % 2  # offset of this parity's first number in the chunk
            if index + first == 0:
                first += 2  # position 0 stands alone; the even chain starts at 2, the odd one at 1
            chain = slice(first, None, 2)
            if first < len(x):
                counts[chain] = last[parity] + np.cumsum(x[chain])
                last[parity] = int(counts[chain][-1])
        index += len(x)
        yield counts


def _count_chunks(counts: str | list[int], total: int) -> Iterator[np.ndarray]:
    """Run lengths (int64, never negative, each at most `total`) a chunk at a time, from either RLE form."""
    if isinstance(counts, str):
        chunks = _undelta(_string_deltas(counts), total)
    else:
        if counts and (min(counts) < 0 or max(counts) > total):
            what = "a negative run length" if min(counts) < 0 else f"a run length beyond {total} pixels"
            raise MaskFormatError(f"RLE 'counts' has {what}")
        chunks = (
            np.asarray(counts[i : i + _CHUNK_CHARS], dtype=np.int64)
            for i in range(0, len(counts), _CHUNK_CHARS)
        )
    for chunk in chunks:
        if chunk.size and chunk.min() < 0:
            raise MaskFormatError("RLE 'counts' has a negative run length")
        yield chunk


def string_to_counts(text: str) -> list[int]:
    """pycocotools' `rleFrString`: the compressed COCO string -> run lengths. Raises MaskFormatError."""
    return [int(c) for chunk in _undelta(_string_deltas(text), None) for c in chunk]


def encode_rle(mask: np.ndarray, compressed: bool = True) -> dict[str, Any]:
    """A bool (H, W) mask -> COCO RLE `{"size": [h, w], "counts": str | list[int]}`."""
    if mask.ndim != 2:
        raise ValueError(f"encode_rle takes an (H, W) mask, got shape {mask.shape}")
    counts = _runs(mask)
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": counts_to_string(counts) if compressed else counts}


def rle_size(rle: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of a COCO RLE, checking only its form (cheap; `decode_rle` checks the runs)."""
    if not isinstance(rle, dict):
        raise MaskFormatError(f"RLE must be an object with 'size' and 'counts', got {type(rle).__name__}")
    size = rle.get("size")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise MaskFormatError(f"RLE 'size' must be [height, width] with positive integers, got {size!r}")
    counts = rle.get("counts")
    if not isinstance(counts, (str, list, tuple)):
        raise MaskFormatError(
            f"RLE 'counts' must be a list of run lengths or a compressed COCO string, got {type(counts).__name__}"
        )
    if not isinstance(counts, str) and not all(
        isinstance(v, int) and not isinstance(v, bool) for v in counts
    ):
        raise MaskFormatError("RLE 'counts' list must hold integers only")
    return int(size[0]), int(size[1])


def decode_rle(
    rle: dict[str, Any],
    expected_hw: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    max_runs: int | None = None,
) -> np.ndarray:
    """COCO RLE (either form) -> bool (H, W). Raises MaskFormatError for a malformed RLE or one whose size is not
    `expected_hw`, MaskTooLarge for one over `max_pixels` or `max_runs`; the size is checked before anything is
    allocated. Time and memory are linear in the mask's pixels plus the counts' length."""
    h, w = rle_size(rle)
    if expected_hw is not None and (h, w) != tuple(expected_hw):
        raise MaskFormatError(
            f"RLE size [{h}, {w}] does not match the image, which is [{expected_hw[0]}, {expected_hw[1]}] "
            "(height, width)"
        )
    if max_pixels is not None and h * w > max_pixels:
        raise MaskTooLarge(f"RLE size [{h}, {w}] is {h * w} pixels; at most {max_pixels}", "pixels")
    runs_cap = max_runs if max_runs is not None else h * w + 1
    if not isinstance(rle["counts"], str) and len(rle["counts"]) > runs_cap:
        raise MaskTooLarge(f"RLE has {len(rle['counts'])} run lengths; at most {runs_cap}", "runs")
    total = h * w
    flat = np.zeros(total, dtype=bool)
    pos = index = 0
    for counts in _count_chunks(rle["counts"], total):
        if index + len(counts) > runs_cap:
            raise MaskTooLarge(f"RLE has more than {runs_cap} run lengths", "runs")
        end = pos + int(counts.sum())
        if end > total:
            raise MaskFormatError(f"RLE run lengths sum to more than size {h}x{w} needs ({total})")
        ones = np.zeros(len(counts), dtype=bool)
        ones[(1 - index) % 2 :: 2] = True  # runs alternate, zeros first
        flat[pos:end] = np.repeat(ones, counts)
        pos, index = end, index + len(counts)
    if pos != total:
        raise MaskFormatError(f"RLE run lengths sum to {pos}, but size {h}x{w} needs {total}")
    return flat.reshape((w, h)).T.copy()


def png_encode(mask: np.ndarray) -> bytes:
    """bool (H, W) -> 8-bit grayscale PNG, 0 and 255."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).save(
        buf, format="PNG", compress_level=1
    )
    return buf.getvalue()


def png_decode(data: bytes, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """A mask image (PNG or anything Pillow reads) -> bool (H, W): any channel >= 1 is foreground (MeCoVQA).

    With `expected_hw` a mask of another size is refused from its header, before its pixels are decoded (a small
    file can declare a huge picture)."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise MaskTooLarge(f"mask image too large to decode ({err})", "pixels") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MaskFormatError(f"not a readable PNG mask ({err})") from err
    with image:
        if expected_hw is not None and (image.height, image.width) != tuple(expected_hw):
            raise MaskFormatError(
                f"mask image is {image.height}x{image.width} (HxW), the image is {expected_hw[0]}x{expected_hw[1]}"
            )
        try:
            image.load()
            if image.mode in ("P", "PA", "RGBA", "RGBa", "RGBX"):
                image = image.convert("RGB")
            elif image.mode in ("LA", "La"):
                image = image.convert("L")
            values = np.asarray(image)
        except (OSError, SyntaxError, ValueError) as err:
            raise MaskFormatError(f"not a readable PNG mask ({err})") from err
    if values.ndim == 3:
        return (values >= 1).any(axis=2)
    return values >= 1


def b64decode(text: str, what: str) -> bytes:
    """Strict base64 (ASCII whitespace ignored) -> bytes; MaskFormatError names `what` otherwise."""
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError as err:
        raise MaskFormatError(f"{what} is not valid base64 (non-ASCII character at {err.start})") from err
    try:
        # bytes.translate deletes whitespace without splitting the text into a list of pieces
        return base64.b64decode(data.translate(None, b" \t\r\n\v\f"), validate=True)
    except (binascii.Error, ValueError) as err:
        raise MaskFormatError(f"{what} is not valid base64 ({err})") from err


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
