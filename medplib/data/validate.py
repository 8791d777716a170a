"""Row-by-row validation of MeCoVQA-style JSON/JSONL files that never crashes and explains every rejection.

Each row becomes either an `Accepted` (a checked `Sample` plus where it came from) or a `Rejection` (source file,
line, a `Reason` code, a message naming the field/file, and the raw row). Checks, in order:

1. the line is JSON (`malformed_json`) and the row parses (`missing_field`, `invalid_field`, `seg_without_mask`,
   `mask_without_seg`, `region_count_mismatch`; see `medplib.data.parse`);
2. limits: at most `Limits.max_masks` `<SEG>` targets and `Limits.max_regions` region prompts (`too_many_tags`);
3. ids are unique among accepted rows (`duplicate_id`; the first accepted row with an id wins);
4. every path stays inside the data root: no absolute paths, no `..`, no symlink resolving outside
   (`path_escapes_root`), and fits the file system (`path_too_long`);
5. the image exists, its header declares at most `Limits.max_image_pixels` (`image_too_large`, checked before
   any pixel is decoded) and it decodes to a non-empty picture (`image_missing`, `image_unreadable`,
   `image_empty`); a volume, DICOM series or multi-frame image is read at the row's `view`;
6. every target mask and region mask exists, matches the image size (from its header), decodes and has
   foreground (`mask_missing`, `mask_unreadable`, `mask_empty`, `mask_size_mismatch`);
7. point/box prompts lie inside the image (`region_out_of_bounds`).

A path without the `.png` suffix whose `path + ".png"` exists (a known MeCoVQA defect) is repaired in the
`Sample`, listed in `Accepted.fixed_suffix` and counted in `ValidationSummary.fixed_suffix`, not rejected.

An annotation file in an input folder obeys the same containment rule: one that resolves outside the folder (a
symlink out) is not read, and is reported as one `path_escapes_root` rejection with line 0 (`annotation_files`).

Line numbers: `line` is the 1-based line number in a JSONL file and the 0-based element index in a JSON-array
file (matching the default ids "<stem>:<line>" / "<stem>:<index>").
"""

from __future__ import annotations

import functools
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, Field

from medplib.data.image import ImageReadError, ReadLimits, file_key, image_size, load_image, load_mask
from medplib.data.parse import ParseError, parse_row
from medplib.data.schema import Box, MaskRef, Point, Sample

logger = logging.getLogger(__name__)

RAW_PREVIEW_CHARS = 2000  # raw text kept for a whole-file failure (a broken JSON array)


class Reason(str, Enum):
    """Why a row was rejected. Values are the codes written to quarantine files."""

    MALFORMED_JSON = "malformed_json"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    IMAGE_MISSING = "image_missing"
    IMAGE_UNREADABLE = "image_unreadable"
    IMAGE_EMPTY = "image_empty"
    IMAGE_TOO_LARGE = "image_too_large"
    MASK_MISSING = "mask_missing"
    MASK_UNREADABLE = "mask_unreadable"
    MASK_EMPTY = "mask_empty"
    MASK_SIZE_MISMATCH = "mask_size_mismatch"
    SEG_WITHOUT_MASK = "seg_without_mask"
    MASK_WITHOUT_SEG = "mask_without_seg"
    REGION_COUNT_MISMATCH = "region_count_mismatch"
    TOO_MANY_TAGS = "too_many_tags"
    PATH_ESCAPES_ROOT = "path_escapes_root"
    PATH_TOO_LONG = "path_too_long"
    ANSWER_TRUNCATED = "answer_truncated"  # set by preprocessing: max_length cuts the answer away entirely
    DUPLICATE_ID = "duplicate_id"
    REGION_OUT_OF_BOUNDS = "region_out_of_bounds"
    UNEXPECTED_ERROR = "unexpected_error"  # a bug in a reader, not in the row: logged with its traceback


class Limits(BaseModel):
    """Per-sample limits and validation switches."""

    max_masks: int = Field(4, ge=0, description="most `<SEG>` targets (masks) one sample may have")
    max_regions: int = Field(4, ge=0, description="most region prompts one sample may have")
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="most pixels (height x width) an image may declare; more is image_too_large, refused from "
        "the header before decoding (a 140 KB PNG can declare 12,000 x 12,000 and cost 1.7 GB to encode)",
    )
    decode_images: bool = Field(
        True,
        description="fully decode every image (catches truncated files); False reads only headers for the size",
    )
    fix_missing_suffix: bool = Field(
        True, description="repair a path lacking '.png' when path + '.png' exists"
    )


class Accepted(BaseModel):
    """A row that passed every check."""

    sample: Sample
    source: str = Field(description="the JSON/JSONL file the row came from")
    line: int = Field(description="1-based JSONL line number or 0-based JSON array index")
    fixed_suffix: list[str] = Field(
        default_factory=list, description="paths as written in the row that were repaired by appending '.png'"
    )


class Rejection(BaseModel):
    """A row that failed a check, with everything needed to find and fix it."""

    source: str = Field(description="the JSON/JSONL file the row came from")
    line: int = Field(description="1-based JSONL line number or 0-based JSON array index")
    reason: Reason
    message: str = Field(description="what was wrong, naming the field, turn or file")
    raw: str = Field(description="the row as it appears in the source (the line for JSONL)")

    def to_record(self) -> dict[str, Any]:
        """The quarantine JSONL record `{source, line, reason, message, raw}`."""
        return {
            "source": self.source,
            "line": self.line,
            "reason": self.reason.value,
            "message": self.message,
            "raw": self.raw,
        }


class ValidationSummary(BaseModel):
    """Running counts over validation results; `add` each result while streaming."""

    total: int = 0
    accepted: int = 0
    rejected: int = 0
    fixed_suffix: int = Field(
        0, description="accepted rows with at least one path repaired by appending '.png'"
    )
    by_reason: dict[str, int] = Field(default_factory=dict, description="rejections per Reason value")

    def add(self, result: Accepted | Rejection) -> None:
        """Count one result."""
        self.total += 1
        if isinstance(result, Rejection):
            self.rejected += 1
            self.by_reason[result.reason.value] = self.by_reason.get(result.reason.value, 0) + 1
        else:
            self.accepted += 1
            self.fixed_suffix += bool(result.fixed_suffix)


def summarize(results: Iterable[Accepted | Rejection]) -> ValidationSummary:
    """Count a (finite) stream of results."""
    summary = ValidationSummary()
    for result in results:
        summary.add(result)
    return summary


def count_reasons(rejections: Iterable[Rejection]) -> Counter[str]:
    """Rejections per reason code."""
    return Counter(r.reason.value for r in rejections)


def image_reason(err: ImageReadError) -> Reason:
    """The quarantine reason for an image that could not be read."""
    return {
        "missing": Reason.IMAGE_MISSING,
        "empty": Reason.IMAGE_EMPTY,
        "too_large": Reason.IMAGE_TOO_LARGE,
    }.get(err.problem, Reason.IMAGE_UNREADABLE)


class _Reject(Exception):
    """Internal: aborts the checks of one row."""

    def __init__(self, reason: Reason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(message)


@functools.lru_cache(maxsize=64)  # a syscall pair per RootPaths otherwise, i.e. per row validated alone
def _name_limits(root: Path) -> tuple[int, int]:
    """(longest path, longest file name) in bytes that the file system under `root` takes."""
    try:
        return os.pathconf(root, "PC_PATH_MAX"), os.pathconf(root, "PC_NAME_MAX")
    except (
        OSError,
        ValueError,
        AttributeError,
    ):  # no pathconf (Windows) or the root is gone: POSIX's usual values
        return 4096, 255


class RootPaths:
    """Path checks against one data root, keeping each directory it resolved: rows share a few directories
    (images/, masks/), and resolving a whole path costs a system call per component of the root and the path
    (validating a MeCoVQA-mini row: 550 -> 290 us, 2026-12-01). What it keeps is the file system as it was
    when it looked, so make one per batch of rows, not one for a run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = str(root.resolve())
        self._inside_prefix = self.real_root.rstrip(os.sep) + os.sep
        self.path_max, self.name_max = _name_limits(root)
        self._dirs: dict[str, str] = {}

    def resolve(self, full: str) -> str:
        """`str(Path(full).resolve())`, its directory resolved once: only a symlink as the last component (one
        lstat) sends the path through a whole resolve again."""
        head, name = os.path.split(full)
        real_head = self._dirs.get(head)
        if real_head is None:
            real_head = self._dirs[head] = str(Path(head).resolve())
        candidate = os.path.join(real_head, name)
        try:
            # as `resolve` reads a component: a name with a NUL byte raises ValueError, a missing file is no link
            link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except OSError:
            link = False
        return str(Path(candidate).resolve()) if link else candidate

    def inside(self, rel: str, field: str) -> Path:
        """`root / rel` if it cannot leave the data root and the file system can name it; raises _Reject
        (path_escapes_root, path_too_long) otherwise."""
        pure = PurePosixPath(rel)
        longest = max((len(os.fsencode(part)) for part in pure.parts), default=0)
        full = self.root / rel
        text = str(full)
        if len(os.fsencode(text)) >= self.path_max or longest > self.name_max:
            raise _Reject(
                Reason.PATH_TOO_LONG,
                f"{field} is {len(rel)} characters with a {longest}-byte name; this file system takes paths up "
                f"to {self.path_max - 1} bytes and names up to {self.name_max} ({rel[:60]!r}...)",
            )
        if pure.is_absolute() or os.path.isabs(rel):
            raise _Reject(
                Reason.PATH_ESCAPES_ROOT,
                f"{field} {rel!r} is absolute; paths must be relative to the data root",
            )
        if ".." in pure.parts:
            raise _Reject(Reason.PATH_ESCAPES_ROOT, f"{field} {rel!r} contains '..'")
        try:
            resolved = self.resolve(text)
        except (OSError, ValueError, RuntimeError) as err:  # NUL bytes, symlink loops, over-long names
            raise _Reject(Reason.INVALID_FIELD, f"{field} {rel!r} is not a usable path ({err})") from err
        if resolved != self.real_root and not resolved.startswith(self._inside_prefix):
            raise _Reject(
                Reason.PATH_ESCAPES_ROOT, f"{field} {rel!r} resolves outside the data root (to {resolved})"
            )
        return full


def path_inside_root(rel: str, root: Path) -> Path | None:
    """`root / rel` when `validate_row` would let a row use that path (relative, no `..`, resolving inside the
    data root), else None."""
    try:
        return RootPaths(root).inside(rel, "path")
    except _Reject:
        return None


def _locate(
    rel: str, paths: RootPaths, field: str, limits: Limits, fixed: list[str]
) -> tuple[str, Path] | None:
    """(possibly repaired relative path, full path) of an existing file, or None if it does not exist. `rel`
    itself was checked to stay inside the root already (`_check_sample` checks every path first)."""
    full = paths.root / rel
    if file_key(full) is not None:  # it exists; stat'ed once for the later reads of a `reusing` block
        return rel, full
    if limits.fix_missing_suffix and not rel.lower().endswith(".png"):
        repaired = rel + ".png"
        full_png = paths.inside(repaired, field)
        if file_key(full_png) is not None:
            fixed.append(rel)
            return repaired, full_png
    return None


def _check_mask(
    rel: str, paths: RootPaths, field: str, image_hw: tuple[int, int], limits: Limits, fixed: list[str]
) -> str:
    located = _locate(rel, paths, field, limits, fixed)
    if located is None:
        raise _Reject(Reason.MASK_MISSING, f"{field} {rel!r}: file not found under {paths.root}")
    rel, full = located
    try:
        # One read: the header against the pixel limit, then the pixels (rows go on to use the mask).
        mask = load_mask(full, limits=ReadLimits(max_pixels=limits.max_image_pixels))
    except ImageReadError as err:
        reason = Reason.MASK_MISSING if err.problem == "missing" else Reason.MASK_UNREADABLE
        raise _Reject(reason, f"{field}: {err}") from err
    if mask.shape != image_hw:
        raise _Reject(
            Reason.MASK_SIZE_MISMATCH,
            f"{field} {rel!r} is {mask.shape[0]}x{mask.shape[1]} (HxW) but the image is {image_hw[0]}x{image_hw[1]}",
        )
    if not mask.any():
        raise _Reject(Reason.MASK_EMPTY, f"{field} {rel!r} has no foreground pixel (all values are 0)")
    return rel


def _check_prompt_bounds(prompt: Point | Box, field: str, image_hw: tuple[int, int]) -> None:
    height, width = image_hw
    if isinstance(prompt, Point):
        inside = 0 <= prompt.x < width and 0 <= prompt.y < height
        what = f"point ({prompt.x}, {prompt.y})"
    else:
        inside = 0 <= prompt.x0 and 0 <= prompt.y0 and prompt.x1 <= width and prompt.y1 <= height
        what = f"box ({prompt.x0}, {prompt.y0}, {prompt.x1}, {prompt.y1})"
    if not inside:
        raise _Reject(
            Reason.REGION_OUT_OF_BOUNDS, f"{field} {what} lies outside the {width}x{height} (WxH) image"
        )


def _check_sample(sample: Sample, paths: RootPaths, limits: Limits, fixed: list[str]) -> Sample:
    """File-level checks; returns the sample with repaired paths."""
    if len(sample.masks) > limits.max_masks:
        raise _Reject(
            Reason.TOO_MANY_TAGS, f"{len(sample.masks)} <SEG> targets; the limit is {limits.max_masks}"
        )
    if len(sample.regions) > limits.max_regions:
        raise _Reject(
            Reason.TOO_MANY_TAGS, f"{len(sample.regions)} region prompts; the limit is {limits.max_regions}"
        )
    # Every path first, so an escaping path is reported as such even if another file is missing.
    if sample.image is not None:
        paths.inside(sample.image, "image")
    for i, mask in enumerate(sample.masks):
        paths.inside(mask, f"masks[{i}]")
    for i, region in enumerate(sample.regions):
        if isinstance(region, MaskRef):
            paths.inside(region.path, f"regions[{i}] mask")
    if sample.image is None:
        return sample  # text-only: the parser guarantees no masks or regions

    located = _locate(sample.image, paths, "image", limits, fixed)
    if located is None:
        raise _Reject(Reason.IMAGE_MISSING, f"image {sample.image!r}: file not found under {paths.root}")
    image_rel, image_path = located
    read_limits = ReadLimits(max_pixels=limits.max_image_pixels)
    try:
        # The readers check the header against the limits before decoding any pixel: a 140 KB PNG can declare
        # 12,000 x 12,000, a NIfTI any shape.
        if limits.decode_images:
            image_hw = load_image(image_path, view=sample.view, limits=read_limits).shape[:2]
        else:
            image_hw = image_size(
                image_path, axis=sample.view.axis if sample.view else None, limits=read_limits
            )
    except ImageReadError as err:
        detail = err.detail.replace("(max_pixels)", "(max_image_pixels)")  # the name this config knows
        raise _Reject(image_reason(err), f"image {image_rel!r}: {detail}") from err
    image_hw = (int(image_hw[0]), int(image_hw[1]))

    masks = [
        _check_mask(m, paths, f"masks[{i}]", image_hw, limits, fixed) for i, m in enumerate(sample.masks)
    ]
    regions = []
    for i, region in enumerate(sample.regions):
        if isinstance(region, MaskRef):
            region = MaskRef(
                path=_check_mask(region.path, paths, f"regions[{i}] mask", image_hw, limits, fixed)
            )
        else:
            _check_prompt_bounds(region, f"regions[{i}]", image_hw)
        regions.append(region)
    if fixed:
        return sample.model_copy(update={"image": image_rel, "masks": masks, "regions": regions})
    return sample


def _raw_text(raw: Mapping[str, Any] | str) -> str:
    if isinstance(raw, str):
        return raw.rstrip("\r\n")
    return json.dumps(raw, ensure_ascii=False, default=str)


def validate_row(
    raw: Mapping[str, Any] | str,
    source: str | Path,
    line_no: int,
    data_root: str | Path,
    limits: Limits | None = None,
    seen_ids: set[str] | None = None,
    paths: RootPaths | None = None,
) -> Accepted | Rejection:
    """Check one row (a parsed object, or the raw JSONL line text) and never raise for bad data.

    `seen_ids`, when given, holds the ids accepted so far: a repeat is rejected, an accepted id is added.
    Pass None to skip the duplicate check (e.g. when rows are validated in parallel shards). `paths`: the
    `RootPaths` of `data_root` that a batch of rows shares (default: one for this row alone).
    """
    limits = limits or Limits()
    source = str(source)
    root = Path(data_root)
    if paths is None:
        paths = RootPaths(root)
    elif paths.root != root:
        raise ValueError(f"paths are checked against {paths.root}, the row's data root is {root}")

    def reject(reason: Reason, message: str) -> Rejection:
        logger.debug("%s:%d rejected (%s): %s", source, line_no, reason.value, message)
        return Rejection(source=source, line=line_no, reason=reason, message=message, raw=_raw_text(raw))

    row: Any = raw
    if isinstance(raw, str):
        try:
            row = json.loads(raw.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            return reject(Reason.MALFORMED_JSON, f"line is not valid JSON: {err.msg} at column {err.colno}")
    fixed: list[str] = []
    try:
        sample = parse_row(row, source=source, index=line_no)
        if seen_ids is not None and sample.id in seen_ids:
            return reject(
                Reason.DUPLICATE_ID, f"id {sample.id!r} was already used by an earlier accepted row"
            )
        sample = _check_sample(sample, paths, limits, fixed)
    except ParseError as err:
        return reject(Reason(err.reason), str(err))
    except _Reject as err:
        return reject(err.reason, err.message)
    except Exception as err:  # never let one row stop a run; keep the traceback for whoever fixes the reader
        logger.exception("%s:%d: unexpected error while validating the row", source, line_no)
        return reject(
            Reason.UNEXPECTED_ERROR, f"unexpected {type(err).__name__} while validating the row: {err}"
        )
    if fixed:
        logger.debug("%s:%d repaired missing .png suffix on %s", source, line_no, fixed)
    if seen_ids is not None:
        seen_ids.add(sample.id)
    return Accepted(sample=sample, source=source, line=line_no, fixed_suffix=fixed)


def annotation_files(path: Path) -> tuple[list[Path], list[Rejection]]:
    """The annotation files of an input, and the refused ones. A folder gives its *.json / *.jsonl in name order
    (not recursively), except a file that resolves outside the folder (a symlink out), which is not read: the
    containment rule of image paths. A file given by name is the caller's choice and is read as it is."""
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"annotation file or folder not found: {path}")
        return [path], []
    files, refused = [], []
    folder = path.resolve()
    for entry in sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl")):
        target = entry.resolve()
        if not target.is_relative_to(folder):
            message = (
                f"annotation file {entry.name!r} resolves outside the input folder (to {target}); not read"
            )
            refused.append(
                Rejection(source=str(entry), line=0, reason=Reason.PATH_ESCAPES_ROOT, message=message, raw="")
            )
            logger.warning("%s", message)
        elif target.is_file():
            files.append(entry)
    return files, refused


def is_json_array(path: Path) -> bool:
    """True when the first non-whitespace character (after a BOM) is '['."""
    with path.open("rb") as f:
        while chunk := f.read(4096):
            text = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
            if text:
                return text.startswith(b"[")
            # chunk was all whitespace: keep reading
    return False


def _iter_array_file(
    path: Path, data_root: Path, limits: Limits, seen_ids: set[str] | None
) -> Iterator[Accepted | Rejection]:
    source = str(path)
    try:
        with path.open(encoding="utf-8-sig") as f:
            rows = json.load(f)
    except json.JSONDecodeError as err:
        start = max(0, err.pos - RAW_PREVIEW_CHARS // 2)
        yield Rejection(
            source=source,
            line=err.lineno,
            reason=Reason.MALFORMED_JSON,
            message=f"file is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}; "
            "no row of it was read",
            raw=err.doc[start : start + RAW_PREVIEW_CHARS],
        )
        return
    except UnicodeDecodeError as err:
        yield Rejection(
            source=source,
            line=0,
            reason=Reason.MALFORMED_JSON,
            message=f"file is not UTF-8 ({err}); no row of it was read",
            raw="",
        )
        return
    # is_json_array saw '[' first, so a successful load is a list
    for index, row in enumerate(rows):
        if isinstance(row, str):  # validate_row would take a string for a JSONL line
            yield Rejection(
                source=source,
                line=index,
                reason=Reason.INVALID_FIELD,
                message=f"array element {index} is a string; expected a row object",
                raw=json.dumps(row),
            )
            continue
        yield validate_row(row, source, index, data_root, limits, seen_ids)


def _iter_jsonl_file(
    path: Path, data_root: Path, limits: Limits, seen_ids: set[str] | None
) -> Iterator[Accepted | Rejection]:
    source = str(path)
    with path.open("rb") as f:  # bytes, so one bad encoding costs one line, not the file
        for line_no, line_bytes in enumerate(f, start=1):
            if line_no == 1:
                line_bytes = line_bytes.removeprefix(b"\xef\xbb\xbf")
            try:
                line = line_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                yield Rejection(
                    source=source,
                    line=line_no,
                    reason=Reason.MALFORMED_JSON,
                    message=f"line is not UTF-8 ({err.reason} at byte {err.start})",
                    raw=line_bytes.decode("utf-8", errors="replace").rstrip("\r\n"),
                )
                continue
            if not line.strip():
                continue
            yield validate_row(line, source, line_no, data_root, limits, seen_ids)


def read_and_validate(
    path_or_dir: str | Path,
    data_root: str | Path,
    limits: Limits | None = None,
    *,
    seen_ids: set[str] | None = None,
) -> Iterator[Accepted | Rejection]:
    """Stream `Accepted`/`Rejection` for every row of a JSON/JSONL file, or of every such file in a folder.

    Files in a folder are read in name order (not recursively). A file whose first character is '[' is a JSON
    array (loaded whole); anything else is read as JSONL one line at a time, whatever its suffix. Blank lines are
    skipped. Duplicate ids are checked across all files of one call (pass `seen_ids` to extend across calls).
    Raises FileNotFoundError only when `path_or_dir` or `data_root` does not exist; bad data never raises.
    """
    limits = limits or Limits()
    root = Path(data_root)
    if not root.is_dir():  # a configuration error, not a data error: every row would be image_missing
        raise FileNotFoundError(f"data root {root} is not a folder")
    seen = set() if seen_ids is None else seen_ids
    files, refused = annotation_files(Path(path_or_dir))
    if not files and not refused:
        logger.warning("%s holds no .json or .jsonl files", path_or_dir)
    yield from refused
    for path in files:
        summary = ValidationSummary()
        reader = _iter_array_file if is_json_array(path) else _iter_jsonl_file
        for result in reader(path, root, limits, seen):
            summary.add(result)
            yield result
        logger.info(
            "%s: %d rows, %d accepted (%d with a repaired .png suffix), %d rejected %s",
            path,
            summary.total,
            summary.accepted,
            summary.fixed_suffix,
            summary.rejected,
            summary.by_reason,
        )


def write_quarantine(rejections: Iterable[Rejection], path: str | Path, *, append: bool = False) -> int:
    """Write rejections as JSONL records `{source, line, reason, message, raw}`; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for rejection in rejections:
            f.write(json.dumps(rejection.to_record(), ensure_ascii=False) + "\n")
            written += 1
    return written
