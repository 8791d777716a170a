"""`medplib data prepare`: MeCoVQA JSON/JSONL -> validated, encoded Parquet shards, one folder per split (Ray Data).

    medplib data prepare --input DIR_OR_JSON --output DIR [--config configs/prepare/default.yaml]
                         [--model-preset tiny] [--data-root DIR] [--max-rows N] [--splits train,val] [--force]

Pipeline, per run:

1. Driver, streaming (never holds the rows): list the input files (a file, or every *.json / *.jsonl in a
   folder, in name order), hash their bytes, and scan them line by line into *chunks*: byte ranges of
   `batch_size` rows of one split in one file. The scan keeps only the ids (for duplicates, step 2), the chunk
   table and counters. A JSON-array file cannot be cut into byte ranges, so one Ray task loads it and rewrites it
   as JSONL first (one element per line; the reported line stays the array index).
2. Duplicate ids: for the few ids seen more than once the driver validates their occurrences in file order and
   the first accepted one wins (`duplicate_winners`); every worker then rejects a later occurrence as
   `duplicate_id`, exactly as the sequential `medplib.data.validate.read_and_validate` would.
3. Ray Data, one pipeline per split, all at once: `from_items(chunks)` -> `map_batches(one chunk per call: read the lines,
   validate, decode the image, load target masks, encode_sample, encoded_to_row)` -> `write_parquet(DIR/<split>/)`.
   Rejected rows go to per-chunk quarantine part files, and per-chunk counts to stats part files (both in the
   temp folder; names are deterministic, so a retried task overwrites its own parts).
4. Driver: merge the parts into `quarantine.jsonl` (sorted by file and line) and `manifest.json`, then move the
   temp folder into place (rename; an older output is renamed away first and deleted after).

Rows and rejections: the contract's `validate_row` checks every row (see medplib/data/validate.py for the
reasons), reading only image headers; the encode step then decodes each image once, so a file whose pixel data
is corrupt is quarantined there, as `image_unreadable`, like the sequential validator would. Preprocessing adds
one check: a row's `split` must be usable as a folder name (else `invalid_field`). A row's split is its `split`
field, else the one its file name names (`MeCoVQA-mini_test.json` -> test), else `default_split`. Encode errors
(a prompt too long for the preset's `max_length`) are quarantined as `invalid_field`. The text columns
`question`/`answer` hold the first human turn (without `<image>`) and the first answer.

Reuse: `manifest.json` records the input hash (names + bytes of the annotation files) and the config hash
(the row-shaping fields of `PrepareConfig`, the resolved model config and the schema version). A second run with
the same input and config returns the existing output and logs "reusing". Images and masks are not hashed
(that would read the whole dataset): after editing them in place, pass `--force`.

`engine="local"` runs the same chunk function in the driver process, one chunk after another, and writes Parquet
with pyarrow: the single-process baseline of `bench/preprocess.py` and a Ray-free path for debugging.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medplib.data.display import View, Window, parse_window
from medplib.data.image import ImageReadError, load_image, load_mask
from medplib.data.parse import default_sample_id
from medplib.data.prepared import MANIFEST_NAME, QUARANTINE_NAME, ROW_SCHEMA, read_manifest, rows_to_table
from medplib.data.rows import SCHEMA_VERSION
from medplib.data.validate import (
    Accepted,
    Limits,
    Reason,
    Rejection,
    image_reason,
    is_json_array,
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
    max_masks: int = Field(
        4, ge=0, description="most `<SEG>` targets per row; more is rejected (too_many_tags)"
    )
    fix_missing_suffix: bool = Field(
        True, description="repair an image/mask path lacking '.png' if path.png exists"
    )
    batch_size: int = Field(
        64, ge=1, description="rows per chunk: one Ray task validates and encodes one chunk"
    )
    rows_per_file: int = Field(
        2048, ge=1, description="Parquet rows per shard file, at least (the last may be less)"
    )
    window: Window | None = Field(
        None,
        description="intensity window for DICOM/NIfTI images of rows whose `view` names none: a preset (brain, "
        "bone, lung, soft_tissue, ...) or 'centre,width'; None = the file's own window or min-max",
    )
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs reserved by each encode task")
    writer_cpus: float = Field(
        0.0,
        ge=0,
        description="CPUs reserved by each Parquet write task; 0: it never waits for the encoders (I/O)",
    )

    # Fields that change how fast the output is made, not what it contains: left out of the config hash.
    EXECUTION_ONLY: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "rows_per_file", "cpus_per_task", "writer_cpus"}
    )

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
    """A byte range of one input file holding up to `batch_size` rows of one split (other splits' lines skipped)."""

    chunk_id: int
    split: str
    file_index: int
    start: int = Field(description="byte offset of the first line")
    end: int = Field(description="byte offset just past the last line")
    first_line: int = Field(description="1-based line number of the first line in `read_path`")
    rows: int


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
    parts_dir: str


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


def _iter_lines(path: str, start: int, end: int, first_line: int) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of every line in [start, end) of a file; lines end at b"\\n" only, as in
    `for line in binary_file`."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    pos, line_no = 0, first_line
    while pos < len(data):
        newline = data.find(b"\n", pos)
        stop = len(data) if newline < 0 else newline + 1
        yield line_no, data[pos:stop]
        pos, line_no = stop, line_no + 1


# ------------------------------------------------------------------------------------------------- the worker
def _new_stats() -> dict[str, Any]:
    """The counts of a chunk, summed per split by the driver."""
    return {
        "accepted": 0,
        "rejected": 0,
        "fixed_suffix": 0,
        "task": Counter(),
        "modality": Counter(),
        "reason": Counter(),
    }


class ChunkProcessor:
    """Validates, decodes and encodes the rows of chunks; one per process (the tokenizer is built once)."""

    def __init__(self, job: ChunkJob) -> None:
        from medplib.tokenizer import build_tokenizer  # transformers: workers only, the driver stays light

        self.job = job
        self.root = Path(job.data_root)
        self.tokenizer = build_tokenizer(job.model.llm.tokenizer)
        self.files = {f.index: f for f in job.files}

    def _reject(self, file: InputFile, line: int, reason: Reason, message: str, raw: str) -> Rejection:
        return Rejection(source=file.source, line=line, reason=reason, message=message, raw=raw)

    def process_line(
        self, file: InputFile, line_no: int, raw_bytes: bytes, split: str
    ) -> dict[str, Any] | Rejection | None:
        """One line -> an encoded row dict (with `_fixed_suffix`), a Rejection, or None (blank / other split)."""
        from medplib.data.batch import encode_sample
        from medplib.data.rows import encoded_to_row

        text, obj = decode_line(raw_bytes, file.kind == "jsonl" and line_no == 1)
        if text is not None and not text.strip():
            return None
        own_split, split_problem = row_split(obj, file.default_split)
        if own_split != split:
            return None
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
        result = validate_row(raw, file.source, line, self.root, self.job.limits, seen_ids=seen)
        if isinstance(result, Rejection):
            return result
        sample = result.sample
        view = sample.view or View()
        if view.window is None and self.job.default_window is not None:
            view = view.model_copy(update={"window": self.job.default_window})
        try:
            image = load_image(self.root / sample.image, view=view) if sample.image is not None else None
        except ImageReadError as err:  # validation read only the header (limits.decode_images=False)
            return self._reject(file, line, image_reason(err), f"image: {err}", raw_text)
        try:
            masks = [load_mask(self.root / m) for m in sample.masks]
        except ImageReadError as err:
            return self._reject(file, line, Reason.MASK_UNREADABLE, f"mask: {err}", raw_text)
        try:
            encoded = encode_sample(
                sample, image, self.tokenizer, self.job.model, target_masks=masks, data_root=self.root
            )
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
            "image_path": sample.image,
            "question": human.replace("<image>", "").strip(),
            "answer": answer.strip(),
        }
        row = encoded_to_row(encoded, meta)
        row["_fixed_suffix"] = bool(result.fixed_suffix)
        return row

    def process_chunk(self, chunk: Chunk) -> tuple[pa.Table, list[Rejection], dict[str, Any]]:
        """Encoded rows (ROW_SCHEMA), rejections and counts of one chunk."""
        file = self.files[chunk.file_index]
        rows: list[dict[str, Any]] = []
        rejections: list[Rejection] = []
        stats = _new_stats()
        for line_no, raw in _iter_lines(file.read_path, chunk.start, chunk.end, chunk.first_line):
            out = self.process_line(file, line_no, raw, chunk.split)
            if out is None:
                continue
            if isinstance(out, Rejection):
                rejections.append(out)
                stats["rejected"] += 1
                stats["reason"][out.reason.value] += 1
                continue
            stats["accepted"] += 1
            stats["fixed_suffix"] += int(out.pop("_fixed_suffix"))
            stats["task"][out["task"]] += 1
            stats["modality"][out["modality"]] += 1
            rows.append(out)
        return rows_to_table(rows), rejections, stats

    def run_chunk(self, chunk: Chunk) -> pa.Table:
        """`process_chunk`, writing the rejections and counts to this chunk's part files."""
        table, rejections, stats = self.process_chunk(chunk)
        parts = Path(self.job.parts_dir) / chunk.split
        parts.mkdir(parents=True, exist_ok=True)
        name = f"{chunk.chunk_id:07d}"
        if rejections:
            records = [{**r.to_record(), "split": chunk.split, "_file": chunk.file_index} for r in rejections]
            write_text_atomic(
                parts / f"quarantine-{name}.jsonl",
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
            )
        write_text_atomic(parts / f"stats-{name}.json", json.dumps(stats))
        return table


# Per worker process: job JSON -> processor, so the tokenizer and model config are built once, not per chunk.
_PROCESSORS: dict[str, ChunkProcessor] = {}


def _processor(job_json: str) -> ChunkProcessor:
    if job_json not in _PROCESSORS:
        _PROCESSORS.clear()  # one job at a time per process; drop the previous run's tokenizer
        _PROCESSORS[job_json] = ChunkProcessor(ChunkJob.model_validate_json(job_json))
    return _PROCESSORS[job_json]


def _encode_chunks(batch: pa.Table, job_json: str) -> pa.Table:
    """Ray Data UDF (map_batches, batch_size=1): chunk descriptions in, encoded sample rows out."""
    processor = _processor(job_json)
    tables = [processor.run_chunk(Chunk.model_validate(item)) for item in batch.to_pylist()]
    return pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()


# ------------------------------------------------------------------------------------------------- the driver
def input_files(path: Path) -> list[Path]:
    """The annotation files of an input: the file itself, or a folder's *.json / *.jsonl in name order."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .json or .jsonl annotation files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"annotation file or folder not found: {path}")
    return [path]


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


def scan_files(files: list[InputFile], cfg: PrepareConfig) -> _Scan:
    """Stream every file once: rows, their split and id -> chunks of `cfg.batch_size` rows per (file, split)."""
    scan = _Scan()
    # Duplicates need global state: id -> where it was first seen, ~270 B per row with 50-character ids (~3 MB
    # for 10k rows, ~270 MB for 1M; beyond that, move this to a Ray Data groupby). Duplicates are judged among
    # the rows this run processes (its splits, its `max_rows`).
    first_seen: dict[str, tuple[int, int, int, int]] = {}
    wanted = set(cfg.splits) if cfg.splits else None
    splits_seen: dict[str, None] = {}
    for file in files:
        open_chunks: dict[str, Chunk] = {}
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
                        chunk = open_chunks.get(split)
                        if chunk is not None and chunk.rows >= cfg.batch_size:
                            scan.chunks.append(chunk)
                            chunk = None
                        if chunk is None:
                            chunk = Chunk(
                                chunk_id=0,
                                split=split,
                                file_index=file.index,
                                start=offset,
                                end=offset,
                                first_line=line_no,
                                rows=0,
                            )
                            open_chunks[split] = chunk
                        chunk.end = offset + length
                        chunk.rows += 1
                offset += length
        scan.chunks.extend(open_chunks.values())
        if scan.stopped_at_max_rows:
            break
    for i, chunk in enumerate(scan.chunks):
        chunk.chunk_id = i
    scan.splits_seen = list(splits_seen)
    return scan


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


def _run_ray(job: ChunkJob, chunks: list[Chunk], out_dir: Path, cfg: PrepareConfig) -> None:
    import ray

    # Ray Data touch-point: chunk descriptions in, one encode task per chunk, Parquet out (streaming: encoded
    # rows flow from the encode tasks to the writer through the object store, never through the driver).
    ds = ray.data.from_items([c.model_dump() for c in chunks], override_num_blocks=len(chunks))
    # Ray Data reserves part of the cluster for each operator (op_resource_reservation_ratio 0.5). With two
    # operators on 2 CPUs that left the encoder one task at a time while the 0-CPU writer's share sat idle
    # (measured: 46% encoder utilisation). The writer needs no CPU, so let the encoders have all of them. The
    # setting lives in this dataset's own copy of the DataContext, not in the global one.
    ds.context.op_resource_reservation_enabled = False
    ds = ds.map_batches(
        _encode_chunks,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"job_json": job.model_dump_json()},
        num_cpus=cfg.cpus_per_task,  # 1: on 2 cores two chunks encode at once; no actor holds a CPU for the run
    )
    # writer_cpus 0: the writer never waits for the encoders to free a CPU (0.25 would, then idle 0.75 CPU).
    ds.write_parquet(
        str(out_dir), min_rows_per_file=cfg.rows_per_file, ray_remote_args={"num_cpus": cfg.writer_cpus}
    )


def _run_local(job: ChunkJob, chunks: list[Chunk], out_dir: Path, cfg: PrepareConfig) -> None:
    processor = ChunkProcessor(job)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    rows_in_file, file_no = 0, 0
    try:
        for chunk in chunks:
            table = processor.run_chunk(chunk)
            if table.num_rows == 0:
                continue
            if writer is None:
                writer = pq.ParquetWriter(out_dir / f"part-{file_no:05d}.parquet", ROW_SCHEMA)
            writer.write_table(table)
            rows_in_file += table.num_rows
            if rows_in_file >= cfg.rows_per_file:
                writer.close()
                writer, rows_in_file, file_no = None, 0, file_no + 1
    finally:
        if writer is not None:
            writer.close()


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
            for key in ("accepted", "rejected", "fixed_suffix"):
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
    paths = input_files(input_path)
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
    try:
        array_failures = _convert_arrays(files, parts, engine)
        scan = scan_files(files, cfg)
        limits = Limits(
            max_masks=cfg.max_masks,
            max_regions=model.region.max_regions,
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

        def run_split(split: str) -> None:
            chunks = [c for c in scan.chunks if c.split == split]
            split_dir = tmp / split
            split_started = time.perf_counter()
            (_run_ray if engine == "ray" else _run_local)(job, chunks, split_dir, cfg)
            split_dir.mkdir(parents=True, exist_ok=True)
            if not any(split_dir.glob("*.parquet")):  # every row rejected: keep a readable, empty shard
                pq.write_table(ROW_SCHEMA.empty_table(), split_dir / "part-empty.parquet")
            logger.info(
                "split %s: %d chunks in %.1f s", split, len(chunks), time.perf_counter() - split_started
            )

        if engine == "ray" and len(splits) > 1:
            # One Ray Data pipeline per split (each ends in its own write_parquet), all running at once, so one
            # split's start-up and last write overlap another's encoding instead of adding up.
            with ThreadPoolExecutor(max_workers=len(splits), thread_name_prefix="prepare") as pool:
                for future in [pool.submit(run_split, split) for split in splits]:
                    future.result()
        else:
            for split in splits:
                run_split(split)
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
            time.perf_counter() - started,
            tmp,
        )
        shutil.rmtree(parts)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(tmp, output)
    finally:
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
