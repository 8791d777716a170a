"""A model's files into and out of an MLflow artifact store. On a store on the local filesystem the weights are hard
links, not copies: a `make run` logs three models of 0.6-0.9 GB and downloads each for the next stage (12.6 s of
copies on 2 cores, 2026-12-02), and a served `models:/` URI is downloaded into the medplib cache once more."""

from __future__ import annotations

import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

# Files this large are weights, written once into a new file (`save_model_atomic`) and never rewritten in place, so
# two folders may share them. Smaller files (the card, configs) are copied: the card is rewritten in place after the
# eval, which must not reach a model already logged.
LINK_MIN_BYTES = 1 << 20


def local_artifact_dir(uri: str) -> Path | None:
    """The local directory of an artifact URI (`file:` or a plain path); None for a remote store."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(uri) if parsed.scheme == "" else None


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """`src`'s files into `dst` (created; files there with the same names replaced, never written through): weights
    as hard links, copied where a link cannot be made (another filesystem), the rest copied."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.unlink(missing_ok=True)  # a file linked from elsewhere is replaced, not overwritten in place
        if path.stat().st_size >= LINK_MIN_BYTES:
            try:
                os.link(path, target)
                continue
            except OSError:
                pass
        shutil.copy2(path, target)


def download_artifacts(source: str, parent: Path, tracking_uri: str | None) -> Path:
    """The artifacts at `source` (e.g. a model version's source) into a new folder under `parent`, named as MLflow
    names it; returns that folder. A local store's weights are linked (`link_or_copy_tree`), any other store is
    MLflow's to download."""
    local = local_artifact_dir(source)
    if local is not None:
        link_or_copy_tree(local, parent / local.name)
        return parent / local.name
    import mlflow.artifacts

    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(parent), tracking_uri=tracking_uri
        )
    )
