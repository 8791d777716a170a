"""Readers of a prepared dataset (`medplib data prepare`) for the jobs: the Ray Dataset of a split, and two small
driver-side reads. All go through `medplib.data.prepared`, which checks the schema version."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple


def load_prepared(directory: str | Path, split: str, *, preserve_order: bool = False):  # -> ray.data.Dataset
    """The Parquet shards of one split as a Ray Dataset (columns `rows.COLUMNS`), lazily.

    Training passes it to `TorchTrainer(datasets={"train": ds})`; each worker turns rows back into `Encoded`
    with `rows.row_to_encoded` and batches them with `batch.collate`. With `preserve_order` the rows come in the
    order `prepare` wrote them (its seeded shuffle), as `medplib.data.prepared.iter_prepared_rows` yields them.
    """
    import ray

    from medplib.data.prepared import shard_files

    ds = ray.data.read_parquet([str(p) for p in shard_files(directory, split)], partitioning=None)
    if preserve_order:  # this dataset's own copy of the DataContext; read tasks follow the file list
        ds.context.execution_options.preserve_order = True
    return ds


class RowInfo(NamedTuple):
    """What the driver needs of a row to plan a stage: which rows it takes, how often, how long they are."""

    sample_id: str
    task: str
    length: int
    question_type: str | None = None
    modality: str | None = None
    image: str | None = None  # image_path: rows that share it share one frozen-encoder pass


def row_index(directory: str | Path, split: str) -> list[RowInfo]:
    """`RowInfo` of every row of a split in file order, read on the driver with pyarrow (a few small columns; a Ray
    Data job here would cost a worker start-up for a few kilobytes)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from medplib.data.prepared import shard_files

    out: list[RowInfo] = []
    for path in shard_files(directory, split):
        names = set(pq.read_schema(path).names)
        optional_columns = ("question_type", "modality", "image_path")
        wanted = ["sample_id", "task", "input_ids"] + [c for c in optional_columns if c in names]
        table = pq.read_table(path, columns=wanted)
        lengths = pc.list_value_length(table.column("input_ids")).to_pylist()
        optional = {
            c: table.column(c).to_pylist() if c in names else [None] * len(lengths) for c in optional_columns
        }
        out += map(
            RowInfo,
            table.column("sample_id").to_pylist(),
            table.column("task").to_pylist(),
            lengths,
            optional["question_type"],
            optional["modality"],
            optional["image_path"],
        )
    return out


def read_rows(
    directory: str | Path, split: str, tasks: Iterable[str] | None, limit: int
) -> list[dict[str, Any]]:
    """The first `limit` rows of a split in written order (`prepare` shuffles it), only those of `tasks` when
    given; no Ray."""
    from medplib.data.prepared import iter_prepared_rows

    wanted = None if tasks is None else set(tasks)
    out: list[dict[str, Any]] = []
    for row in iter_prepared_rows(directory, split):
        if len(out) >= limit:
            break
        if wanted is None or row["task"] in wanted:
            out.append(row)
    return out
