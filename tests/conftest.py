"""Shared fixtures: the random-init `tiny` model and small real images written to disk."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from medplib.data.batch import collate, encode_sample
from medplib.model.config import load_model_config
from workflows.common import use_local_cluster_settings


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_model_config("tiny")


@pytest.fixture()
def tiny_model(tiny_cfg):
    from medplib.model.medplib import MedPLIB

    torch.manual_seed(0)
    return MedPLIB(tiny_cfg)


@pytest.fixture()
def make_batch(tiny_cfg):
    """Encode (sample, image, masks[, regions]) items with the model's tokenizer and collate them; `regions`
    overrides the sample's own (e.g. in-memory mask arrays)."""

    def _make(model, items):
        encoded = [
            encode_sample(
                item[0],
                item[1],
                model.tokenizer,
                tiny_cfg,
                target_masks=item[2],
                regions=item[3] if len(item) > 3 else None,
            )
            for item in items
        ]
        return collate(encoded, tiny_cfg, model.ids.pad)

    return _make


@pytest.fixture(scope="session")
def rng_image():
    """A deterministic non-square uint8 RGB image (48 x 80), odd aspect ratio on purpose."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)


def _png_bomb(width: int, height: int) -> bytes:
    """A 1-bit PNG of `width` x `height` zeros, written chunk by chunk: small on disk, huge once decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's bits
    idat = b"".join(packer.compress(row * 1000) for _ in range(height // 1000))
    idat += packer.compress(row * (height % 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def png_bomb():
    """`png_bomb(width, height)` -> the bytes of a PNG of zeros: a few KB that declare any size (a decompression
    bomb), written without ever holding the pixels."""
    return _png_bomb


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for every test that needs Ray: 2 CPUs, no dashboard, a small object store (the
    machine is shared), and "local" so that no other cluster on this machine is ever joined."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    use_local_cluster_settings()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    """`mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI to the whole process: put back what was there
    before each test, so one test's MLflow server never becomes the next test's default store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before and "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(before)


@pytest.fixture(scope="module")
def pg_mlflow(tmp_path_factory):
    """(Postgres, MlflowServer): a PostgreSQL server and `mlflow server` on it, both on 127.0.0.1, for one test
    module (tests/mlflow_servers.py)."""
    from mlflow_servers import mlflow_server, postgres_server

    with postgres_server() as pg, mlflow_server(pg.uri, tmp_path_factory.mktemp("mlflow")) as server:
        yield pg, server
