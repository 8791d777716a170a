"""`medplib data prepare`: MeCoVQA JSON/JSONL -> validated, encoded Parquet shards, one folder per split (Ray Data).

    medplib data prepare --input DIR_OR_JSON --output DIR [--config configs/prepare/default.yaml]
                         [--model-preset tiny] [--data-root DIR] [--max-rows N] [--splits train,val] [--force]

Pipeline, per run:

1. Driver, streaming (never holds the rows): list the input files (a file, or every *.json / *.jsonl in a
   folder, in name order), hash their bytes, and scan them line by line. The scan keeps only the ids (for
   duplicates, step 2), where each row's line is (file, line, byte offset, length: 32 bytes a row) and counters.
   Each split's rows are put in a seeded random order (`shuffle_seed`; None keeps file order) and cut into
   *chunks* of `batch_size` rows: that order is the order the rows are written in. A JSON-array file has no lines
   to point at, so one Ray task loads it and rewrites it as JSONL first (one element per line; the reported line
   stays the array index).
2. Duplicate ids: for the few ids seen more than once the driver validates their occurrences in file order and
   the first accepted one wins (`duplicate_winners`); every worker then rejects a later occurrence as
   `duplicate_id`, exactly as the sequential `medplib.data.validate.read_and_validate` would.
3. Ray Data, two passes. Views: the distinct images (at the views rows read them at) the rows name, 64 a task ->
   each one's stored view columns (decoded, resized, PNG-encoded once), left in the object store (`_views_pass`).
   Encode, one pipeline for all splits: `from_items(chunks)` -> `map_batches(one chunk per call: read the views
   pass's output once per process, read the lines, validate, load target masks, encode, write
   DIR/<split>/part-<chunk id>.parquet)`.
   File names sort in written order. Rejected rows go to per-chunk quarantine part files, and per-chunk counts to
   stats part files (in the temp folder); every file is written under a temporary name and renamed, so a
   retried task replaces its own output.
4. Driver: merge the parts into `quarantine.jsonl` (sorted by file and line) and `manifest.json`, then move the
   temp folder into place (rename; an older output is renamed away first and deleted after). The temp folder is
   locked while its run lives; a run starts by deleting the temp folders of runs that were killed.

Decoding once: rows share images (~27 rows an image in MeCoVQA-mini) and masks (a region prompt of one row is
the target of another; validation and encoding both read each). Each encode process keeps, per file (path, size,
modification time), an image's stored view columns at each `view` its rows read it at (the same bytes in every
such row) and decoded masks and image sizes (`medplib.data.image.reusing`), least recently used out past
`cache_mb`. On Ray the views pass fills every process's view cache, so each image is decoded once per prepare
(when the views fit half of `cache_mb`; else once per process), each mask once per process. The manifest counts
the files decoded (`counts.decoded`).

Rows and rejections: the contract's `validate_row` checks every row (see medplib/data/validate.py for the
reasons), reading only image headers; the encode step then decodes each image, so a file whose pixel data is
corrupt is quarantined there, as `image_unreadable`, like the sequential validator would. Preprocessing adds
one check: a row's `split` must be usable as a folder name (else `invalid_field`). A row's split is its `split`
field, else the one its file name names (`MeCoVQA-mini_test.json` -> test), else `default_split`. Encode errors
(a prompt too long for the preset's `max_length`) are quarantined as `invalid_field`, a row whose answer
`max_length` cuts away entirely as `answer_truncated`. The text columns
`question`/`answer` hold the first human turn (without `<image>`) and the first answer.

Reuse: `manifest.json` records the input hash (names + bytes of the annotation files) and the config hash
(the row-shaping fields of `PrepareConfig`, the resolved model config and the schema version). A second run with
the same input and config returns the existing output and logs "reusing". Images and masks are not hashed
(that would read the whole dataset): after editing them in place, pass `--force`.

`engine="local"` runs the same chunk function in the driver process, one chunk after another: the
single-process baseline of `bench/preprocess.py` and a Ray-free path for debugging.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import re
import shutil
import time
import uuid
import zlib
from array import array
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, BinaryIO, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medplib.data.display import View, Window, parse_window
from medplib.data.image import DecodedFiles, ImageReadError, file_key, load_image, load_mask, reusing
from medplib.data.lru import BoundedCache
from medplib.data.parse import default_sample_id
from medplib.data.prepared import MANIFEST_NAME, QUARANTINE_NAME, ROW_SCHEMA, read_manifest, rows_to_table
from medplib.data.rows import SCHEMA_VERSION, StoredViews, encoded_to_row
from medplib.data.validate import (
    Accepted,
    Limits,
    Reason,
    Rejection,
    RootPaths,
    annotation_files,
    image_reason,
    is_json_array,
    path_inside_root,
    validate_row,
)
from medplib.model.config import MedPLIBConfig, load_model_config
from workflows.common import init_ray, write_text_atomic

logger = logging.getLogger(__name__)

SPLIT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# "MeCoVQA-mini_test_xsubject.json" -> "test_xsubject"; "MeCoVQA_Grounding_train.jsonl" -> "train".
_SPLIT_IN_NAME_RE = re.compile(
    r"(?:^|[_.-])((?:train|val|valid|validation|dev|test)(?:_[A-Za-z0-9]+)*)$", re.I
)
_PARTS = "_parts"
_LOCK = ".lock"  # in the temp folder: held while its run lives
_UNLOCKED_GRACE_S = 60.0
# Rows of one image carry the same view bytes, which Parquet's dictionary encoding stores once per row group as
# long as the dictionary fits this limit. pyarrow's default (1 MB) holds ~45 views of `small` (~23 kB each); a
# shuffled row group of 2048 MeCoVQA-mini train rows holds ~270 images: 12.9 MB a file with 64 MB, 58 MB without.
PARQUET_WRITE_OPTIONS = {"dictionary_pagesize_limit": 64 * 2**20}
RAW_PREVIEW_CHARS = 2000


# ------------------------------------------------------------------------------------------------ configuration
class PrepareConfig(BaseModel):
    """Knobs of `medplib data prepare`; loaded from YAML (`configs/prepare/*.yaml`), CLI flags override fields."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_preset: str = Field(
        "tiny",
        description="model preset name or config path: decides tokenizer, view sizes, max_length, regions",
    )
    data_root: Path | None = Field(
        None,
        description="folder that image/mask paths are relative to; default: the input folder (or its parent)",
    )
    splits: list[str] | None = Field(None, description="splits to prepare; None = every split found")
    default_split: str = Field(
        "train",
        description="split of a row without a `split` field whose file name names none (`*_test.json`)",
    )
    max_rows: int | None = Field(
        None, ge=1, description="stop after this many rows (file order), for quick runs"
    )
    shuffle_seed: int | None = Field(
        0,
        description="each split's rows are written in the random order this seed gives (one order per split), "
        "so a short training stage sees every modality and task; None keeps file order",
    )
    max_masks: int = Field(
        4, ge=0, description="most `<SEG>` targets per row; more is rejected (too_many_tags)"
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="most pixels (height x width) an image may declare; more is rejected (image_too_large) "
        "from its header, before an encode task decodes it",
    )
    fix_missing_suffix: bool = Field(
        True, description="repair an image/mask path lacking '.png' if path.png exists"
    )
    batch_size: int = Field(
        1024,
        ge=1,
        description="rows per chunk: one Ray task validates, encodes and writes one chunk as one Parquet file",
    )
    window: Window | None = Field(
        None,
        description="intensity window for DICOM/NIfTI images of rows whose `view` names none: a preset (brain, "
        "bone, lung, soft_tissue, ...) or 'centre,width'; None = the file's own window or min-max",
    )
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs reserved by each encode task")
    cache_mb: int = Field(
        256,
        ge=0,
        description="memory each encode process keeps to decode every image and mask once: half for image "
        "views (PNG, ~15 kB an image for `small`), half for masks (1 bit a pixel); the least recently used go",
    )

    # Fields that change how fast the output is made, not what it contains: left out of the config hash.
    EXECUTION_ONLY: ClassVar[frozenset[str]] = frozenset({"batch_size", "cpus_per_task", "cache_mb"})

    @field_validator("splits")
    @classmethod
    def _split_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not SPLIT_NAME_RE.match(name):
                raise ValueError(
                    f"split name {name!r} must match {SPLIT_NAME_RE.pattern} (it becomes a folder)"
                )
        return value

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, value: Any) -> Window | None:
        return parse_window(value)

    @field_validator("default_split")
    @classmethod
    def _default_split_name(cls, value: str) -> str:
        if not SPLIT_NAME_RE.match(value):
            raise ValueError(f"default_split {value!r} must match {SPLIT_NAME_RE.pattern}")
        return value

    @classmethod
    def from_yaml(cls, path: str | Path) -> PrepareConfig:
        """Validate a YAML file (an empty file gives the defaults); errors name the file and the field."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prepare config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of PrepareConfig fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def with_overrides(self, **overrides: Any) -> PrepareConfig:
        """A validated copy with the non-None `overrides` applied (CLI flags over YAML)."""
        update = {k: v for k, v in overrides.items() if v is not None}
        return PrepareConfig.model_validate({**self.model_dump(), **update})


class InputFile(BaseModel):
    """One annotation file of the input, as the scan saw it."""

    index: int = Field(description="position in name order; rows are ordered by (index, line)")
    source: str = Field(description="the file as given (quarantine `source`, default ids)")
    kind: Literal["jsonl", "array"] = Field(
        description="JSONL, or a JSON array rewritten to JSONL for the scan"
    )
    read_path: str = Field(description="the JSONL actually read: the source, or the rewritten array")
    default_split: str = Field(
        description="split of rows without a `split` field: from the file name, or the default"
    )
    size_bytes: int
    sha256: str


class Chunk(BaseModel):
    """Up to `batch_size` rows of one split, in the order they are written; chunk ids order the chunks."""

    chunk_id: int
    split: str
    lines: list[tuple[int, int, int, int]] = Field(
        description="(file index, 1-based line number in its `read_path`, byte offset, length) of each row"
    )


class ChunkJob(BaseModel):
    """Everything a worker needs to process chunks; sent once per pipeline."""

    job_id: str
    model: MedPLIBConfig
    model_preset: str
    data_root: str
    limits: Limits
    default_window: Window | None = None
    files: list[InputFile]
    duplicate_winners: dict[str, tuple[int, int] | None] = Field(
        default_factory=dict,
        description="id seen more than once -> (file index, line) of the accepted one, or None",
    )
    parts_dir: str = Field(description="folder of the per-chunk quarantine and stats parts")
    output_dir: str = Field(description="the temporary output folder: chunks go to <output_dir>/<split>/")
    cache_mb: int = Field(description="PrepareConfig.cache_mb")


class PrepareResult(BaseModel):
    """What `prepare` returns."""

    output: Path
    reused: bool = Field(description="True when an up-to-date output already existed and was returned as is")
    manifest: dict[str, Any]


# ----------------------------------------------------------------------------------------------- row helpers
def split_from_filename(name: str, default: str) -> str:
    """`MeCoVQA-mini_test.json` -> "test", `x_test_xsubject.jsonl` -> "test_xsubject"; `default` if none is named."""
    stem = Path(name).name
    for suffix in (".jsonl", ".json"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    match = _SPLIT_IN_NAME_RE.search(stem)
    return match.group(1).lower() if match else default


def row_split(obj: Any, default: str) -> tuple[str, str | None]:
    """(split, problem): the row's `split` field when it is a usable name, else `default`; `problem` says why a
    present field was unusable (such a row is rejected as invalid_field in the default split)."""
    if not isinstance(obj, dict) or obj.get("split") in (None, ""):
        return default, None
    value = obj["split"]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return default, f"'split' must be a string, got {value!r}"
    value = str(value)
    if not SPLIT_NAME_RE.match(value):
        return default, f"'split' {value!r} must match {SPLIT_NAME_RE.pattern} (it becomes a folder name)"
    return value, None


def row_id(obj: Any, source: str, line: int) -> str | None:
    """The id `medplib.data.parse.parse_row` will give this row (None when the row cannot have one)."""
    if not isinstance(obj, dict):
        return None
    value = obj.get("id")
    if value is None or isinstance(value, bool):
        return default_sample_id(source, line) if value is None else None
    if not isinstance(value, (str, int, float)):
        return None
    return str(value) if str(value) else default_sample_id(source, line)


def decode_line(raw: bytes, first_line: bool) -> tuple[str | None, Any]:
    """(text, JSON value) of one JSONL line as the sequential reader sees it: a BOM dropped on line 1, text None
    when the bytes are not UTF-8, value None when the text is not JSON. Blank lines have `not text.strip()`."""
    if first_line:
        raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, None
    try:
        return text, json.loads(text)
    except ValueError:
        return text, None


def _utf8_problem(raw: bytes) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"{err.reason} at byte {err.start}"
    return "valid UTF-8"


def _read_lines(
    files: dict[int, InputFile], lines: list[tuple[int, int, int, int]]
) -> Iterator[tuple[InputFile, int, bytes]]:
    """(file, line number, raw bytes) of each (file index, line, offset, length), in the order given."""
    with ExitStack() as stack:
        handles: dict[int, BinaryIO] = {}
        for file_index, line_no, offset, length in lines:
            if file_index not in handles:
                handles[file_index] = stack.enter_context(open(files[file_index].read_path, "rb"))
            handle = handles[file_index]
            handle.seek(offset)
            yield files[file_index], line_no, handle.read(length)


# ------------------------------------------------------------------------------------------------- the worker
def _new_stats() -> dict[str, Any]:
    """The counts of a chunk, summed per split by the driver."""
    return {
        "accepted": 0,
        "rejected": 0,
        "fixed_suffix": 0,
        "images_decoded": 0,
        "masks_decoded": 0,
        "task": Counter(),
        "modality": Counter(),
        "reason": Counter(),
    }


class ChunkProcessor:
    """Validates, decodes and encodes the rows of chunks; one per process, so the tokenizer is built once and
    each image and mask is decoded once per process (rows share them: ~27 rows an image in MeCoVQA-mini)."""

    def __init__(self, job: ChunkJob) -> None:
        from medplib.tokenizer import build_tokenizer  # transformers: workers only, the driver stays light

        self.job = job
        self.root = Path(job.data_root)
        self.tokenizer = build_tokenizer(job.model.llm.tokenizer)
        self.files = {f.index: f for f in job.files}
        budget = job.cache_mb * 2**20 // 2
        self.views: BoundedCache[StoredViews] = BoundedCache(budget)
        self.decoded = DecodedFiles(budget)  # masks and image sizes, for validation and encoding alike
        self.images_decoded = 0
        self.preloaded = False

    def preload(self, tables: list[pa.Table]) -> None:
        """Put the views pass's output (`_make_views`) in this process's view cache."""
        for table in tables:
            for row in table.to_pylist():
                views = StoredViews(
                    row["vision_view_png"], row["sam_view_png"], np.asarray(row["sam_geometry"], np.int32)
                )
                key = (row["path"], row["size"], row["mtime_ns"], row["view"])
                self.views.put(key, views, len(views.vision_view_png) + len(views.sam_view_png))
        self.preloaded = True

    def row_view(self, view: View | None) -> View:
        """The slice, axis and window a row's image is read at: its own `view`, prepare's `window` where it names
        none."""
        view = view or View()
        if view.window is None and self.job.default_window is not None:
            view = view.model_copy(update={"window": self.job.default_window})
        return view

    def stored_views(self, path: Path, view: View) -> StoredViews:
        """An image's view columns at `view`, made once per process and shared by the rows that read the file at
        that view; ImageReadError names the file."""
        from medplib.data.batch import image_views

        key = view_key(path, view)
        views = None if key is None else self.views.get(key)
        if views is None:
            views = StoredViews.of(*image_views(load_image(path, view=view), self.job.model))
            self.images_decoded += 1
            if key is not None:
                self.views.put(key, views, len(views.vision_view_png) + len(views.sam_view_png))
        return views

    def _reject(self, file: InputFile, line: int, reason: Reason, message: str, raw: str) -> Rejection:
        return Rejection(source=file.source, line=line, reason=reason, message=message, raw=raw)

    def process_line(
        self, file: InputFile, line_no: int, raw_bytes: bytes, split: str, paths: RootPaths
    ) -> dict[str, Any] | Rejection:
        """One non-blank line of `split` (the scan picked it) -> an encoded row dict (with `_fixed_suffix`) or a
        Rejection."""
        from medplib.data.batch import encode_without_views
        from medplib.data.conversation import AnswerTruncated

        text, obj = decode_line(raw_bytes, file.kind == "jsonl" and line_no == 1)
        _, split_problem = row_split(obj, file.default_split)
        # JSONL rows are validated from their text (quarantine keeps the line); array elements from the object.
        line = line_no if file.kind == "jsonl" else line_no - 1
        if text is None:
            body = raw_bytes.removeprefix(b"\xef\xbb\xbf") if line_no == 1 else raw_bytes
            return self._reject(
                file,
                line,
                Reason.MALFORMED_JSON,
                f"line is not UTF-8 ({_utf8_problem(body)})",
                body.decode("utf-8", errors="replace").rstrip("\r\n"),
            )
        raw_text = text.rstrip("\r\n")
        raw: Any = text
        if file.kind == "array":
            raw = obj
            if isinstance(obj, str):
                return self._reject(
                    file,
                    line,
                    Reason.INVALID_FIELD,
                    f"array element {line} is a string; expected a row object",
                    raw_text,
                )
        if split_problem is not None:
            return self._reject(file, line, Reason.INVALID_FIELD, split_problem, raw_text)

        rid = row_id(obj, file.source, line)
        winner = self.job.duplicate_winners.get(rid) if rid is not None else None
        seen = {rid} if winner is not None and winner < (file.index, line) else set()
        result = validate_row(raw, file.source, line, self.root, self.job.limits, seen_ids=seen, paths=paths)
        if isinstance(result, Rejection):
            return result
        sample = result.sample
        view = self.row_view(sample.view)
        try:
            views = self.stored_views(self.root / sample.image, view) if sample.image is not None else None
        except ImageReadError as err:  # validation read only the header (limits.decode_images=False)
            return self._reject(file, line, image_reason(err), f"image: {err}", raw_text)
        try:
            masks = [load_mask(self.root / m) for m in sample.masks]
        except ImageReadError as err:
            return self._reject(file, line, Reason.MASK_UNREADABLE, f"mask: {err}", raw_text)
        try:
            encoded = encode_without_views(
                sample,
                None if views is None else views.image_hw,
                self.tokenizer,
                self.job.model,
                target_masks=masks,
                data_root=self.root,
            )
        except AnswerTruncated as err:  # nothing left to learn from: a row with zero supervised tokens
            return self._reject(file, line, Reason.ANSWER_TRUNCATED, f"{err}; shorten the row", raw_text)
        except ValueError as err:
            return self._reject(
                file,
                line,
                Reason.INVALID_FIELD,
                f"cannot encode for model preset {self.job.model_preset!r}: {err}",
                raw_text,
            )
        except Exception as err:  # a bug in the encoder, not in the row: keep the traceback, keep going
            logger.exception("%s:%d: unexpected error while encoding", file.source, line)
            return self._reject(
                file,
                line,
                Reason.UNEXPECTED_ERROR,
                f"unexpected {type(err).__name__} while encoding: {err}",
                raw_text,
            )
        human = next((t.text for t in sample.turns if t.role == "human"), "")
        answer = next((t.text for t in sample.turns if t.role == "gpt"), "")
        meta = {
            "task": sample.task,
            "modality": sample.modality,
            "split": split,
            "answer_type": sample.answer_type,
            "question_type": sample.question_type,
            "image_path": sample.image,
            "question": human.replace("<image>", "").strip(),
            "answer": answer.strip(),
        }
        row = encoded_to_row(encoded, meta, views)
        row["_fixed_suffix"] = bool(result.fixed_suffix)
        return row

    def process_chunk(self, chunk: Chunk) -> tuple[pa.Table, list[tuple[int, Rejection]], dict[str, Any]]:
        """Encoded rows (ROW_SCHEMA, in chunk order), (file index, rejection) pairs and counts of one chunk."""
        rows: list[dict[str, Any]] = []
        rejections: list[tuple[int, Rejection]] = []
        stats = _new_stats()
        images_before, masks_before = self.images_decoded, self.decoded.masks_decoded
        paths = RootPaths(self.root)  # a chunk's rows share their images' directories
        with reusing(self.decoded):
            outs = [
                (file, self.process_line(file, line_no, raw, chunk.split, paths))
                for file, line_no, raw in _read_lines(self.files, chunk.lines)
            ]
        stats["images_decoded"] = self.images_decoded - images_before
        stats["masks_decoded"] = self.decoded.masks_decoded - masks_before
        for file, out in outs:
            if isinstance(out, Rejection):
                rejections.append((file.index, out))
                stats["rejected"] += 1
                stats["reason"][out.reason.value] += 1
                continue
            stats["accepted"] += 1
            stats["fixed_suffix"] += int(out.pop("_fixed_suffix"))
            stats["task"][out["task"]] += 1
            stats["modality"][out["modality"]] += 1
            rows.append(out)
        return rows_to_table(rows), rejections, stats

    def run_chunk(self, chunk: Chunk) -> int:
        """`process_chunk`, writing its rows to `<output_dir>/<split>/part-<chunk id>.parquet` (names sort in
        written order) and its rejections and counts to part files; returns the rows written. Every file is
        written under a temporary name and renamed, so a retried task replaces its own output."""
        table, rejections, stats = self.process_chunk(chunk)
        name = f"{chunk.chunk_id:07d}"
        if table.num_rows:
            out_dir = Path(self.job.output_dir) / chunk.split
            out_dir.mkdir(parents=True, exist_ok=True)
            partial = out_dir / f".part-{name}.parquet.{uuid.uuid4().hex[:8]}"
            pq.write_table(table, partial, **PARQUET_WRITE_OPTIONS)
            partial.rename(out_dir / f"part-{name}.parquet")
        parts = Path(self.job.parts_dir) / chunk.split
        parts.mkdir(parents=True, exist_ok=True)
        if rejections:
            records = [{**r.to_record(), "split": chunk.split, "_file": index} for index, r in rejections]
            write_text_atomic(
                parts / f"quarantine-{name}.jsonl",
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
            )
        write_text_atomic(parts / f"stats-{name}.json", json.dumps(stats))
        return table.num_rows


# Per worker process: job JSON -> processor, so the tokenizer and model config are built once, not per chunk.
_PROCESSORS: dict[str, ChunkProcessor] = {}


def _processor(job_json: str) -> ChunkProcessor:
    if job_json not in _PROCESSORS:
        _PROCESSORS.clear()  # one job at a time per process; drop the previous run's tokenizer
        _PROCESSORS[job_json] = ChunkProcessor(ChunkJob.model_validate_json(job_json))
    return _PROCESSORS[job_json]


VIEW_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("view", pa.string()),
        ("vision_view_png", pa.binary()),
        ("sam_view_png", pa.binary()),
        ("sam_geometry", pa.list_(pa.int32())),
    ]
)


def view_key(path: Path, view: View) -> tuple[str, int, int, str] | None:
    """The view cache's key: the file (`file_key`) and the view it is read at (a volume's slices differ; a plain
    image ignores its view, and its rows share the default one)."""
    key = file_key(path)
    return None if key is None else (*key, view.model_dump_json())


def _make_views(batch: pa.Table, job_json: str) -> pa.Table:
    """Ray Data UDF of the views pass: (image path, view) pairs as rows name them in, their stored view columns out
    (keyed by `view_key`). A path validation would refuse, a view it would refuse, or an image that does not
    decode, is left out: the encode pass judges the rows that name it, as it would without this pass."""
    processor = _processor(job_json)
    out: dict[str, list] = {name: [] for name in VIEW_SCHEMA.names}
    for rel, view_json in zip(
        batch.column("image").to_pylist(), batch.column("view").to_pylist(), strict=True
    ):
        path = path_inside_root(rel, processor.root)
        try:
            view = processor.row_view(View.model_validate_json(view_json) if view_json else None)
        except ValueError:
            continue
        key = None if path is None else view_key(path, view)
        if key is None:
            continue
        try:
            views = processor.stored_views(path, view)
        except ImageReadError:
            continue
        values = (*key, views.vision_view_png, views.sam_view_png, views.sam_geometry)
        for name, value in zip(VIEW_SCHEMA.names, values, strict=True):
            out[name].append(value)
    return pa.table(out, schema=VIEW_SCHEMA)


def _encode_chunks(batch: pa.Table, job_json: str, views: list) -> pa.Table:
    """Ray Data UDF (map_batches, batch_size=1): chunk descriptions in, rows written out per chunk. `views`:
    object refs of the views pass's blocks, read once per process."""
    processor = _processor(job_json)
    if views and not processor.preloaded:
        import ray

        processor.preload(ray.get(views))
    chunks = [Chunk.model_validate(item) for item in batch.to_pylist()]
    written = [processor.run_chunk(chunk) for chunk in chunks]
    return pa.table({"chunk_id": [c.chunk_id for c in chunks], "rows": written})


# ------------------------------------------------------------------------------------------------- the driver
def input_files(path: Path) -> tuple[list[Path], list[Rejection]]:
    """The annotation files of an input (the file itself, or a folder's *.json / *.jsonl in name order) and the
    refused ones (resolving outside the folder; see `medplib.data.validate.annotation_files`)."""
    files, refused = annotation_files(path)
    if not files:
        outside = f" inside it ({len(refused)} resolve outside it)" if refused else ""
        raise FileNotFoundError(f"{path} holds no .json or .jsonl annotation files{outside}")
    return files, refused


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def array_to_jsonl(source: str, out_path: str) -> dict[str, Any] | None:
    """Rewrite a JSON-array file as JSONL (one element per line). Returns a quarantine record if the file is not
    a valid JSON array (then no row of it is read), else None. Runs as one Ray task per file."""
    try:
        with open(source, encoding="utf-8-sig") as f:
            rows = json.load(f)
    except json.JSONDecodeError as err:
        start = max(0, err.pos - RAW_PREVIEW_CHARS // 2)
        return {
            "line": err.lineno,
            "reason": Reason.MALFORMED_JSON.value,
            "message": f"file is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}; "
            "no row of it was read",
            "raw": err.doc[start : start + RAW_PREVIEW_CHARS],
        }
    except UnicodeDecodeError as err:
        return {
            "line": 0,
            "reason": Reason.MALFORMED_JSON.value,
            "message": f"file is not UTF-8 ({err}); no row of it was read",
            "raw": "",
        }
    if not isinstance(rows, list):
        return {
            "line": 0,
            "reason": Reason.INVALID_FIELD.value,
            "message": f"expected a JSON array of rows, got {type(rows).__name__}",
            "raw": "",
        }
    with open(out_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return None


class _Scan(BaseModel):
    """What the driver's scan produced: chunks, duplicate occurrences and counts (no rows)."""

    chunks: list[Chunk] = Field(default_factory=list)
    duplicates: dict[str, list[tuple[int, int, int, int]]] = Field(
        default_factory=dict,
        description="id -> [(file index, line, byte offset, length)] for ids seen twice+",
    )
    rows: int = 0
    skipped_other_split: int = 0
    splits_seen: list[str] = Field(default_factory=list)
    stopped_at_max_rows: bool = False
    images: list[tuple[str, str]] = Field(
        default_factory=list,
        description="distinct (`image`, `view` as JSON or '') of the rows to prepare (the views pass)",
    )


def scan_files(files: list[InputFile], cfg: PrepareConfig) -> _Scan:
    """Stream every file once: rows, their split and id -> chunks of `cfg.batch_size` rows of one split, in the
    order they will be written (`make_chunks`)."""
    scan = _Scan()
    # Duplicates need global state: id -> where it was first seen, ~270 B per row with 50-character ids (~3 MB
    # for 10k rows, ~270 MB for 1M; beyond that, move this to a Ray Data groupby). Duplicates are judged among
    # the rows this run processes (its splits, its `max_rows`).
    first_seen: dict[str, tuple[int, int, int, int]] = {}
    wanted = set(cfg.splits) if cfg.splits else None
    splits_seen: dict[str, None] = {}
    lines: dict[str, array] = {}
    images: dict[tuple[str, str], None] = {}
    for file in files:
        with open(file.read_path, "rb") as f:
            offset = 0
            for line_no, raw in enumerate(f, start=1):
                length = len(raw)
                text, obj = decode_line(raw, line_no == 1 and file.kind == "jsonl")
                if text is None or text.strip():
                    if cfg.max_rows is not None and scan.rows >= cfg.max_rows:
                        scan.stopped_at_max_rows = True
                        break
                    scan.rows += 1
                    split, _ = row_split(obj, file.default_split)
                    splits_seen.setdefault(split, None)
                    if wanted is not None and split not in wanted:
                        scan.skipped_other_split += 1
                    else:
                        line = line_no if file.kind == "jsonl" else line_no - 1
                        rid = row_id(obj, file.source, line)
                        if rid is not None:
                            where = (file.index, line, offset, length)
                            if rid in first_seen:
                                scan.duplicates.setdefault(rid, [first_seen[rid]]).append(where)
                            else:
                                first_seen[rid] = where
                        # 4 int64 a row (32 B; 32 MB for 1M rows), not a tuple each (~120 B).
                        lines.setdefault(split, array("q")).extend((file.index, line_no, offset, length))
                        if isinstance(obj, dict) and isinstance(obj.get("image"), str):
                            view = obj.get("view")
                            view_json = "" if view is None else json.dumps(view, sort_keys=True)
                            images.setdefault((obj["image"], view_json), None)
                offset += length
        if scan.stopped_at_max_rows:
            break
    scan.splits_seen = list(splits_seen)
    scan.images = list(images)
    scan.chunks = make_chunks(lines, cfg.batch_size, cfg.shuffle_seed)
    return scan


def make_chunks(lines: dict[str, array], batch_size: int, shuffle_seed: int | None) -> list[Chunk]:
    """Cut each split's rows (flat (file index, line, offset, length) quadruples in file order) into chunks of
    `batch_size`, after a seeded permutation unless `shuffle_seed` is None. Chunk ids follow the written order.

    The permutation is the written order of the split: training reads the files in order, so a short stage sees
    every modality and task instead of the first file's first images, and a resume replays nothing (the order is
    in the files, not in a reader's random state)."""
    chunks: list[Chunk] = []
    for split, flat in lines.items():
        table = np.frombuffer(flat, dtype=np.int64).reshape(-1, 4)
        if shuffle_seed is not None:
            # Seeded by split name too: each split has its own order, and adding a split changes no other's.
            rng = np.random.default_rng([shuffle_seed, zlib.crc32(split.encode())])
            table = table[rng.permutation(len(table))]
        for start in range(0, len(table), batch_size):
            rows = [tuple(row) for row in table[start : start + batch_size].tolist()]
            chunks.append(Chunk(chunk_id=len(chunks), split=split, lines=rows))
    return chunks


def duplicate_winners(scan: _Scan, files: list[InputFile], root: Path, limits: Limits) -> dict[str, Any]:
    """For each id seen more than once: the (file index, line) of its first occurrence that validates, or None.

    Validates only the occurrences of duplicated ids, in file order (the sequential validator's rule: the first
    accepted row with an id wins; later ones are rejected as duplicate_id)."""
    by_index = {f.index: f for f in files}
    full_limits = limits.model_copy(update={"decode_images": True})
    winners: dict[str, Any] = {}
    for rid, occurrences in scan.duplicates.items():
        winners[rid] = None
        for file_index, line, offset, length in sorted(occurrences):
            file = by_index[file_index]
            with open(file.read_path, "rb") as f:
                f.seek(offset)
                raw_bytes = f.read(length)
            text, obj = decode_line(raw_bytes, line == 1 and file.kind == "jsonl")
            raw: Any = text if file.kind == "jsonl" else obj
            if raw is None:  # not UTF-8: rejected as malformed_json, cannot win
                continue
            if isinstance(validate_row(raw, file.source, line, root, full_limits), Accepted):
                winners[rid] = (file_index, line)
                break
    if winners:
        logger.info(
            "%d ids occur more than once; later occurrences are rejected as duplicate_id", len(winners)
        )
    return winners


def _config_hash(cfg: PrepareConfig, data_root: Path, model: MedPLIBConfig) -> str:
    content = {
        "schema_version": SCHEMA_VERSION,
        "prepare": cfg.model_dump(mode="json", exclude=set(PrepareConfig.EXECUTION_ONLY) | {"data_root"}),
        "data_root": str(data_root.resolve()),
        "model": model.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _input_hash(files: list[InputFile]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{Path(f.source).name}\0{f.size_bytes}\0{f.sha256}\n".encode())
    return digest.hexdigest()


def _run_ray(job: ChunkJob, scan: _Scan, cfg: PrepareConfig) -> int:
    """Both passes on Ray Data; returns the images the views pass decoded."""
    import ray.data

    # Ray Data reserves part of the cluster for each operator's outputs; on 2 CPUs that left one map task running
    # at a time, with the other core idle. Both passes are one map each, writing little: MeCoVQA-mini's prepare
    # 20.2-20.6 -> 16.5-17.0 s from a cold cluster (2 cores, 2026-11-30).
    context = ray.data.DataContext.get_current()
    reserving = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False
    try:
        return _run_passes(job, scan, cfg)
    finally:
        context.op_resource_reservation_enabled = reserving


def _run_passes(job: ChunkJob, scan: _Scan, cfg: PrepareConfig) -> int:
    import ray

    job_json = job.model_dump_json()
    views, decoded = _views_pass(job_json, scan.images, job.model, cfg)
    # Ray Data touch-point: one pipeline for every split, one task per chunk; each task writes its chunk's
    # Parquet file itself and returns two numbers. Encoded rows (~50 kB each with their views) never travel
    # through the object store to a writer, and one streaming executor polls instead of one per split.
    # Largest chunks first, so the short last chunk of each split fills the end instead of leaving a core idle.
    items = [c.model_dump() for c in sorted(scan.chunks, key=lambda c: -len(c.lines))]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _encode_chunks,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"job_json": job_json, "views": views},
        num_cpus=cfg.cpus_per_task,  # 1: on 2 cores two chunks encode at once; no actor holds a CPU for the run
    )
    # Runs the pipeline; take_all streams the small outputs to the driver (ds.sum would add a shuffle stage).
    written = sum(row["rows"] for row in ds.take_all())
    logger.debug("Ray Data wrote %d rows in %d chunks", written, len(items))
    return decoded


def _views_pass(
    job_json: str, images: list[tuple[str, str]], model: MedPLIBConfig, cfg: PrepareConfig
) -> tuple[list, int]:
    """Make every distinct (image, view)'s stored views once, spread over the workers (Ray Data), and keep them in the
    object store: (block refs every encode process reads once, images decoded). Without it each encode process
    decodes the images its chunks name, and shuffled chunks name nearly all: measured 985 image decodes for
    MeCoVQA-mini's 633 images on 2 workers. Skipped (([], 0)) when the views would not fit the encode processes'
    view cache (`cache_mb` / 2), estimated at a quarter of the raw views (PNG of MeCoVQA-mini views: ~0.19)."""
    import ray

    view_px = model.vision.image_size_px**2 + model.sam.image_size_px**2
    if not images or len(images) * 3 * view_px // 4 > cfg.cache_mb * 2**20 // 2:
        return [], 0
    blocks = -(-len(images) // 64)  # ~0.4 s of work a task for `small`
    ds = ray.data.from_items(
        [{"image": image, "view": view} for image, view in images], override_num_blocks=blocks
    )
    # Ray Data touch-point: the views stay in the object store as Arrow blocks; the driver holds refs only.
    ds = ds.map_batches(
        _make_views, batch_size=None, batch_format="pyarrow", fn_kwargs={"job_json": job_json}
    ).materialize()
    return ds.to_arrow_refs(), ds.count()


def _run_local(processor: ChunkProcessor, chunks: list[Chunk]) -> None:
    for chunk in chunks:
        processor.run_chunk(chunk)


def _merge_parts(
    parts_dir: Path, files: list[InputFile], quarantine_path: Path, array_failures: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Concatenate the quarantine parts in (file, line) order and sum the stats per split."""
    records: list[dict[str, Any]] = list(array_failures)
    per_split: dict[str, dict[str, Any]] = {}
    for split_dir in sorted(p for p in parts_dir.iterdir() if p.is_dir()):
        total = _new_stats()
        for stats_file in sorted(split_dir.glob("stats-*.json")):
            stats = json.loads(stats_file.read_text())
            for key in ("accepted", "rejected", "fixed_suffix", "images_decoded", "masks_decoded"):
                total[key] += stats[key]
            for key in ("task", "modality", "reason"):
                total[key].update(stats[key])
        per_split[split_dir.name] = total
        for part in sorted(split_dir.glob("quarantine-*.jsonl")):
            records.extend(json.loads(line) for line in part.read_text().splitlines() if line)
    records.sort(key=lambda r: (r["_file"], r["line"]))
    with quarantine_path.open("w", encoding="utf-8") as f:
        for record in records:
            record.pop("_file")
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return per_split


def _resolve_data_root(input_path: Path, cfg: PrepareConfig) -> Path:
    root = (
        cfg.data_root
        if cfg.data_root is not None
        else (input_path if input_path.is_dir() else input_path.parent)
    )
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} is not a folder (set data_root / --data-root)")
    return root


def _manifest_matches(output: Path, input_hash: str, config_hash: str) -> dict[str, Any] | None:
    try:
        manifest = read_manifest(output)
    except (FileNotFoundError, ValueError):
        return None
    same = manifest.get("input_hash") == input_hash and manifest.get("config_hash") == config_hash
    return manifest if same else None


def prepare(
    input_path: str | Path,
    output: str | Path,
    cfg: PrepareConfig | None = None,
    *,
    force: bool = False,
    engine: Literal["ray", "local"] = "ray",
) -> PrepareResult:
    """Validate and encode a MeCoVQA-format input into `output` (see the module docstring); never raises for bad
    rows. With `engine="ray"` it uses the Ray this process is connected to, the cluster in $RAY_ADDRESS, or a new
    local one. Returns the manifest."""
    cfg = cfg or PrepareConfig()
    started = time.perf_counter()
    input_path, output = Path(input_path), Path(output)
    remove_stale_temps(output)
    paths, refused = input_files(input_path)
    data_root = _resolve_data_root(input_path, cfg)
    model = load_model_config(cfg.model_preset)

    files = [
        InputFile(
            index=i,
            source=str(p),
            kind="array" if is_json_array(p) else "jsonl",
            read_path=str(p),
            default_split=split_from_filename(p.name, cfg.default_split),
            size_bytes=p.stat().st_size,
            sha256=_sha256_file(p),
        )
        for i, p in enumerate(paths)
    ]
    input_hash = _input_hash(files)
    config_hash = _config_hash(cfg, data_root, model)
    if not force and (existing := _manifest_matches(output, input_hash, config_hash)) is not None:
        logger.info(
            "reusing %s: same input hash %s… and config hash %s… as its manifest (pass --force to rebuild)",
            output,
            input_hash[:12],
            config_hash[:12],
        )
        return PrepareResult(output=output, reused=True, manifest=existing)
    if output.exists() and (
        not output.is_dir() or (any(output.iterdir()) and not (output / MANIFEST_NAME).exists())
    ):
        raise ValueError(f"{output} exists and is not a prepared dataset; refusing to replace it")

    if engine == "ray":
        init_ray()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    parts = tmp / _PARTS
    parts.mkdir(parents=True)
    lock = _hold(tmp)
    try:
        array_failures = [
            {**r.to_record(), "split": split_from_filename(r.source, cfg.default_split), "_file": -1}
            for r in refused
        ] + _convert_arrays(files, parts, engine)
        scan = scan_files(files, cfg)
        limits = Limits(
            max_masks=cfg.max_masks,
            max_regions=model.region.max_regions,
            max_image_pixels=cfg.max_image_pixels,
            decode_images=False,
            fix_missing_suffix=cfg.fix_missing_suffix,
        )
        job = ChunkJob(
            job_id=f"{config_hash[:16]}-{input_hash[:16]}-{uuid.uuid4().hex[:8]}",
            model=model,
            model_preset=cfg.model_preset,
            data_root=str(data_root.resolve()),
            limits=limits,
            default_window=cfg.window,
            files=files,
            duplicate_winners=duplicate_winners(scan, files, data_root, limits),
            parts_dir=str(parts),
            output_dir=str(tmp),
            cache_mb=cfg.cache_mb,
        )
        splits = [s for s in scan.splits_seen if not cfg.splits or s in cfg.splits]
        for split in cfg.splits or []:
            if split not in splits:
                logger.warning("split %r was asked for but no row of %s belongs to it", split, input_path)
        logger.info(
            "%s: %d rows in %d files -> %d chunks of <= %d rows, splits %s",
            input_path,
            scan.rows,
            len(files),
            len(scan.chunks),
            cfg.batch_size,
            ", ".join(splits) or "none",
        )

        encode_started = time.perf_counter()
        views_pass_images = 0
        if engine == "ray":
            views_pass_images = _run_ray(job, scan, cfg)
        else:
            _run_local(ChunkProcessor(job), scan.chunks)
        logger.info(
            "%d chunks encoded and written in %.1f s", len(scan.chunks), time.perf_counter() - encode_started
        )
        for split in splits:
            split_dir = tmp / split
            split_dir.mkdir(parents=True, exist_ok=True)
            for partial in split_dir.glob(".part-*"):  # left by a task that died while writing (then retried)
                partial.unlink()
            if not any(split_dir.glob("*.parquet")):  # every row rejected: keep a readable, empty shard
                pq.write_table(ROW_SCHEMA.empty_table(), split_dir / "part-empty.parquet")
        per_split = _merge_parts(parts, files, tmp / QUARANTINE_NAME, array_failures)
        manifest = _manifest(
            cfg,
            model,
            files,
            data_root,
            input_hash,
            config_hash,
            scan,
            splits,
            per_split,
            array_failures,
            views_pass_images,
            time.perf_counter() - started,
            tmp,
        )
        shutil.rmtree(parts)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        lock.close()
        (tmp / _LOCK).unlink()
        _swap_into_place(tmp, output)
    finally:
        lock.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    counts = manifest["counts"]
    logger.info(
        "prepared %s: %d accepted, %d rejected (%s), %d paths repaired, %.1f rows/s",
        output,
        counts["accepted"],
        counts["rejected"],
        dict(counts["reason"]) or "none",
        counts["fixed_suffix"],
        manifest["rows_per_s"],
    )
    return PrepareResult(output=output, reused=False, manifest=manifest)


def _convert_arrays(files: list[InputFile], parts: Path, engine: str) -> list[dict[str, Any]]:
    """Rewrite JSON-array inputs to JSONL under `parts` (one Ray task per file); returns whole-file rejections."""
    arrays = [f for f in files if f.kind == "array"]
    if not arrays:
        return []
    inputs = parts / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    targets = [str(inputs / f"{f.index:04d}-{Path(f.source).name}.jsonl") for f in arrays]
    if engine == "ray":
        import ray

        task = ray.remote(num_cpus=1)(array_to_jsonl)  # one task loads one whole array file
        results = ray.get([task.remote(f.source, t) for f, t in zip(arrays, targets, strict=True)])
    else:
        results = [array_to_jsonl(f.source, t) for f, t in zip(arrays, targets, strict=True)]
    failures = []
    for file, target, failure in zip(arrays, targets, results, strict=True):
        if failure is None:
            file.read_path = target
        else:  # nothing of the file is read: an empty JSONL stands in for it
            Path(target).write_text("")
            file.read_path = target
            failures.append(
                {"source": file.source, **failure, "split": file.default_split, "_file": file.index}
            )
            logger.warning("%s: %s", file.source, failure["message"])
    return failures


def _manifest(
    cfg: PrepareConfig,
    model: MedPLIBConfig,
    files: list[InputFile],
    data_root: Path,
    input_hash: str,
    config_hash: str,
    scan: _Scan,
    splits: list[str],
    per_split: dict[str, dict[str, Any]],
    array_failures: list[dict[str, Any]],
    views_pass_images: int,
    elapsed_s: float,
    tmp: Path,
) -> dict[str, Any]:
    task, modality, reason = Counter(), Counter(), Counter()
    for stats in per_split.values():
        task.update(stats["task"])
        modality.update(stats["modality"])
        reason.update(stats["reason"])
    reason.update(r["reason"] for r in array_failures)
    accepted = sum(s["accepted"] for s in per_split.values())
    rejected = sum(reason.values())
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_preset": cfg.model_preset,
        "model_name": model.name,
        "vision_image_size_px": model.vision.image_size_px,
        "sam_image_size_px": model.sam.image_size_px,
        "input_hash": input_hash,
        "config_hash": config_hash,
        "config": cfg.model_dump(mode="json"),
        "data_root": str(data_root.resolve()),
        "inputs": [
            {
                "source": f.source,
                "kind": f.kind,
                "default_split": f.default_split,
                "size_bytes": f.size_bytes,
                "sha256": f.sha256,
            }
            for f in files
        ],
        "splits": {
            s: {
                "accepted": per_split.get(s, {}).get("accepted", 0),
                "rejected": per_split.get(s, {}).get("rejected", 0),
                "files": sorted(p.name for p in (tmp / s).glob("*.parquet")),
                "task": dict(per_split.get(s, {}).get("task", {})),
                "modality": dict(per_split.get(s, {}).get("modality", {})),
            }
            for s in splits
        },
        "counts": {
            "rows_read": scan.rows,
            "accepted": accepted,
            "rejected": rejected,
            "fixed_suffix": sum(s["fixed_suffix"] for s in per_split.values()),
            # Files decoded, by the views pass and the encode processes (each decodes a shared file once).
            "decoded": {
                "images": views_pass_images + sum(s["images_decoded"] for s in per_split.values()),
                "masks": sum(s["masks_decoded"] for s in per_split.values()),
            },
            "skipped_other_split": scan.skipped_other_split,
            "stopped_at_max_rows": scan.stopped_at_max_rows,
            "split": {s: per_split.get(s, {}).get("accepted", 0) for s in splits},
            "task": dict(task),
            "modality": dict(modality),
            "reason": dict(reason),
        },
        "duplicate_ids": len(scan.duplicates),
        "elapsed_s": round(elapsed_s, 3),
        "rows_per_s": round(scan.rows / elapsed_s, 1) if elapsed_s > 0 else 0.0,
    }


def _hold(tmp: Path) -> IO[str]:
    """An exclusive lock on `tmp`, held while this process lives: the OS drops it when the process dies, even by
    kill -9, so `remove_stale_temps` can tell a live run's temp folder from a dead one's."""
    lock = (tmp / _LOCK).open("w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return lock


def remove_stale_temps(output: Path) -> list[Path]:
    """Delete what killed runs left beside `output`: `.NAME.tmp-*` folders older than a minute whose lock no live
    process holds, and `.NAME.old-*` folders; returns them."""
    pattern = glob.escape(f".{output.name}")
    stale = sorted(output.parent.glob(f"{pattern}.old-*"))  # never in use once the swap is over
    for path in sorted(output.parent.glob(f"{pattern}.tmp-*")):
        try:
            with (path / _LOCK).open("r+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a live run holds it
        except BlockingIOError:
            continue
        except FileNotFoundError:  # no lock file: its run died, or is just starting or finishing
            pass
        # A run holds its lock from its first moment to its last but one: spare young folders for that moment.
        if path.is_dir() and time.time() - path.stat().st_mtime >= _UNLOCKED_GRACE_S:
            stale.append(path)
    for path in stale:
        logger.warning("removing %s, left by a run that was killed", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _swap_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished temp folder to `output`; a previous output is renamed away first, then deleted."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summary_text(result: PrepareResult) -> str:
    """What `medplib data prepare` prints: what was written or reused, counts per split and rejection reason."""
    manifest, counts = result.manifest, result.manifest["counts"]
    lines = [
        f"{result.output}: {'reused (input and config unchanged)' if result.reused else 'written'}",
        f"  rows read {counts['rows_read']}, accepted {counts['accepted']}, rejected {counts['rejected']}, "
        f"paths repaired (.png) {counts['fixed_suffix']}",
    ]
    for name, split in manifest["splits"].items():
        lines.append(
            f"  {name}: {split['accepted']} rows in {len(split['files'])} files, {split['rejected']} rejected"
        )
    if counts["reason"]:
        lines.append(
            "  rejected: "
            + ", ".join(f"{k}={v}" for k, v in sorted(counts["reason"].items()))
            + f" (see {Path(result.output) / QUARANTINE_NAME})"
        )
    return "\n".join(lines)
