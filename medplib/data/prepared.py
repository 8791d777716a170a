"""Reading a prepared dataset (the output of `medplib data prepare`) without Ray: its Arrow schema, its
manifest and a plain row iterator.

Layout of a prepared folder::

    DIR/manifest.json          hashes, schema version, model preset, counts (see workflows/data/preprocess.py)
    DIR/quarantine.jsonl       one record per rejected row: {source, line, split, reason, message, raw}
    DIR/<split>/*.parquet      one row per accepted sample, columns `medplib.data.rows.COLUMNS`

Each Parquet row converts back to an `Encoded` with `medplib.data.rows.row_to_encoded`. Training reads the shards
through Ray Data (`workflows.data.prepared.load_prepared`); tests and single-process eval use `iter_prepared_rows`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from medplib.data.rows import COLUMNS, SCHEMA_VERSION

MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.jsonl"
SCHEMA_VERSION_KEY = b"medplib.schema_version"

# The Arrow types of `rows.COLUMNS`, in that order. Nullable where a text-only row or a row without regions
# has no value (views, geometry, region masks) or where the source row may lack the field (answer_type).
ROW_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("task", pa.string()),
        ("modality", pa.string()),
        ("split", pa.string()),
        ("answer_type", pa.string()),
        ("question_type", pa.string()),  # null where the source row names none
        ("image_path", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("vision_view_png", pa.binary()),
        ("sam_view_png", pa.binary()),
        ("sam_geometry", pa.list_(pa.int32())),  # Geometry.as_tensor(): 7 ints
        ("num_regions", pa.int32()),
        ("region_masks_png", pa.binary()),  # (R*Hv, Wv) stack of the region masks in the vision view
        ("target_masks_png", pa.list_(pa.binary())),  # one PNG per <SEG>, original resolution
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)
assert tuple(ROW_SCHEMA.names) == COLUMNS, "ROW_SCHEMA must list rows.COLUMNS in order"


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows from `rows.encoded_to_row` -> an Arrow table with the fixed `ROW_SCHEMA` (also for zero rows)."""
    return pa.Table.from_pylist(list(rows), schema=ROW_SCHEMA)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a prepared folder; raises FileNotFoundError or ValueError naming the file."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a prepared dataset (run `medplib data prepare`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {version!r}, this code reads version {SCHEMA_VERSION}; prepare the data again"
        )
    return manifest


def shard_files(directory: str | Path, split: str) -> list[Path]:
    """The Parquet files of one split, in name order; ValueError naming the known splits if it is absent."""
    manifest = read_manifest(directory)
    known = sorted(manifest.get("splits", {}))
    folder = Path(directory) / split
    if split not in known or not folder.is_dir():
        raise ValueError(f"{directory} has no split {split!r}; prepared splits: {', '.join(known) or 'none'}")
    return sorted(folder.glob("*.parquet"))


def iter_prepared_rows(
    directory: str | Path, split: str, columns: Sequence[str] | None = None, batch_rows: int = 256
) -> Iterator[dict[str, Any]]:
    """Yield the rows of one split as dicts (lists for list columns, bytes for PNG columns), file by file.

    Streams `batch_rows` rows at a time, so memory stays bounded for any split size. Feed a row to
    `rows.row_to_encoded(row, cfg.vision.image_size_px)` to get an `Encoded` for `batch.collate`.
    """
    for path in shard_files(directory, split):
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None):
            yield from batch.to_pylist()
