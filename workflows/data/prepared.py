"""Readers of a prepared dataset (`medplib data prepare`) for the jobs: the Ray Dataset of a split, and two small
driver-side reads. All go through `medplib.data.prepared`, which checks the schema version."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


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


def row_lengths(directory: str | Path, split: str) -> list[tuple[str, int]]:
    """(task, token count) of every row of a split, read on the driver with pyarrow (two columns only; a Ray Data
    job here would cost a worker start-up for a few kilobytes)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from medplib.data.prepared import shard_files

    out: list[tuple[str, int]] = []
    for path in shard_files(directory, split):
        table = pq.read_table(path, columns=["task", "input_ids"])
        lengths = pc.list_value_length(table.column("input_ids")).to_pylist()
        out += zip(table.column("task").to_pylist(), lengths, strict=True)
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
