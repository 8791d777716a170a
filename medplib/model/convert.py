"""Import a checkpoint in the upstream MedPLIB layout (the released `MedPLIB-7b-2e`) into ours, and export back.

Upstream saves one Hugging Face directory (`merge_lora_weights_and_save_hf_model_moe.py`): LLaVA-style keys
under `model.` for the LLM, its MoE FFNs as DeepSpeed modules, the CLIP tower, projector, region adapter,
`<SEG>` projection and SAM-Med2D (`visual_model`), plus `lm_head`. `KEY_RULES` is the whole mapping, one line per
family of keys, read in both directions; a key no rule places, or that lands on a tensor our model lacks or
has in another shape, is reported (all of them, in one error) instead of being dropped.

Embedding rows keep their token ids: the tokenizer comes with the checkpoint (its directory, or `--tokenizer`),
MedPLIB's own special tokens are appended to it, and the rows of tokens upstream did not have (`<image>` and
`<region_feat>`, which upstream expressed as negative sentinel ids) start as the mean of the existing rows. Those
two are input placeholders whose embeddings the model overwrites with image / region features.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch

from medplib.model.config import MedPLIBConfig, load_model_config

log = logging.getLogger(__name__)

# (upstream key, our key). `{name}` fields match the patterns in FIELDS and carry over unchanged.
KEY_RULES: list[tuple[str, str]] = [
    ("model.embed_tokens.weight", "llm.model.embed_tokens.weight"),
    ("model.norm.weight", "llm.model.norm.weight"),
    ("lm_head.weight", "llm.lm_head.weight"),
    ("model.layers.{i}.self_attn.{attn}.weight", "llm.model.layers.{i}.self_attn.{attn}.weight"),
    ("model.layers.{i}.{norm}.weight", "llm.model.layers.{i}.{norm}.weight"),
    # A dense FFN (a layer left out of the MoE), then the DeepSpeed MoE FFN: experts and the top-k gate.
    ("model.layers.{i}.mlp.{ffn}.weight", "llm.model.layers.{i}.mlp.{ffn}.weight"),
    (
        "model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{ffn}.weight",
        "llm.model.layers.{i}.mlp.experts.{e}.{ffn}.weight",
    ),
    ("model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight", "llm.model.layers.{i}.mlp.router.weight"),
    ("model.mm_projector.{rest}", "mm_projector.{rest}"),
    ("model.vision_tower.vision_tower.vision_model.{rest}", "vision_tower.clip.{clip}{rest}"),
    ("model.region_fea_adapter.{rest}", "region_fea_adapter.{rest}"),
    # Upstream wraps the `<SEG>` projection in a one-element ModuleList: text_hidden_fcs[0] = Sequential(...).
    ("model.text_hidden_fcs.0.{rest}", "text_hidden_fcs.{rest}"),
    ("model.visual_model.{rest}", "sam.{rest}"),
]
FIELDS = {
    "i": r"\d+",
    "e": r"\d+",
    "attn": r"(?:q|k|v|o)_proj",
    "norm": r"(?:input|post_attention)_layernorm",
    "ffn": r"(?:gate|up|down)_proj",
    "rest": r".+",
}
# Upstream tensors that are buffers derived from the config, not weights (older transformers saved them).
UPSTREAM_DERIVED = (re.compile(r"\.rotary_emb\.inv_freq$"), re.compile(r"\.embeddings\.position_ids$"))
VOCAB_KEYS = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")


def _compile(template: str, clip: str) -> re.Pattern[str]:
    template = template.replace("{clip}", clip)
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{FIELDS[p]})" for k, p in enumerate(parts))
    return re.compile(regex + "$")


def _rules(clip: str, to_ours: bool) -> list[tuple[re.Pattern[str], str]]:
    pairs = KEY_RULES if to_ours else [(ours, up) for up, ours in KEY_RULES]
    return [(_compile(src, clip), dst.replace("{clip}", clip)) for src, dst in pairs]


def clip_prefix(our_keys: list[str] | set[str]) -> str:
    """transformers < 5 nests CLIPVisionModel's weights under `vision_model.`; 5.x does not."""
    return "vision_model." if any(k.startswith("vision_tower.clip.vision_model.") for k in our_keys) else ""


def map_key(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            return target.format(**m.groupdict())
    return None


def to_upstream(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> upstream key names (the inverse of `KEY_RULES`); every key must have a place."""
    rules = _rules(clip_prefix(set(state)), to_ours=False)
    out, unplaced = {}, []
    for key, value in state.items():
        target = map_key(key, rules)
        if target is None:
            unplaced.append(key)
        else:
            out[target] = value
    if unplaced:
        raise ValueError(
            f"{len(unplaced)} keys have no place in the upstream layout:\n  " + "\n  ".join(unplaced)
        )
    return out


def from_upstream(
    upstream: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Upstream tensors -> a state dict with exactly `reference`'s keys and shapes (our model's state dict).

    The embedding and lm_head may have fewer rows than the reference (tokens MedPLIB adds); the extra rows
    start as the mean of the given rows. Anything else that does not fit raises one error listing every key:
    upstream keys no rule places, keys that map onto a tensor our model lacks, shape mismatches, and our keys
    the checkpoint does not provide.
    """
    rules = _rules(clip_prefix(set(reference)), to_ours=True)
    out: dict[str, torch.Tensor] = {}
    unplaced, no_target, wrong_shape = [], [], []
    for key, value in upstream.items():
        if any(p.search(key) for p in UPSTREAM_DERIVED):
            continue
        target = map_key(key, rules)
        if target is None:
            unplaced.append(key)
        elif target not in reference:
            no_target.append(f"{key} -> {target}")
        else:
            want = reference[target].shape
            if (
                target in VOCAB_KEYS
                and value.ndim == 2
                and value.shape[1] == want[1]
                and value.shape[0] < want[0]
            ):
                extra = (
                    value.float().mean(0, keepdim=True).expand(want[0] - value.shape[0], -1).to(value.dtype)
                )
                value = torch.cat([value, extra])
            if value.shape != want:
                wrong_shape.append(f"{key} {tuple(value.shape)} -> {target} {tuple(want)}")
            else:
                out[target] = value
    missing = sorted(set(reference) - set(out) - {k.split(" -> ")[1].split(" ")[0] for k in wrong_shape})
    problems = [
        (f"{len(unplaced)} {source} keys match no rule of medplib.model.convert.KEY_RULES", unplaced),
        (
            f"{len(no_target)} {source} keys map to tensors this model does not have (check the preset)",
            no_target,
        ),
        (
            f"{len(wrong_shape)} {source} tensors have another shape than this model's (check the preset)",
            wrong_shape,
        ),
        (f"{len(missing)} model tensors are not in the {source}", missing),
    ]
    message = "\n".join(head + ":\n  " + "\n  ".join(keys) for head, keys in problems if keys)
    if message:
        raise ValueError(f"cannot place the {source} into the model:\n{message}")
    return out


# ---------------------------------------------------------------- reading and writing


def _checkpoint_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint {src} does not exist")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            weight_map = json.loads((src / index).read_text()).get("weight_map", {})
            names = sorted(set(weight_map.values()))
            # An index names shards beside it; one that leads elsewhere (`../`, an absolute path, a symlink out)
            # would read whatever file it names.
            outside = [n for n in names if not (src / n).resolve().is_relative_to(src.resolve())]
            if outside:
                raise ValueError(
                    f"{src / index} names shards outside {src}: {', '.join(outside[:5])}; "
                    "a checkpoint's shards must lie in its folder"
                )
            return [src / name for name in names]
    files = sorted(src.glob("*.safetensors")) or sorted(
        p for p in src.glob("*.bin") if p.name != "training_args.bin"
    )
    if not files:
        raise FileNotFoundError(f"{src} holds no .safetensors or .bin weight files")
    return files


def read_checkpoint(src: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: one `.safetensors` / `.bin` file, or a directory of shards (an index json,
    else every `*.safetensors`, else every `*.bin`). `.bin` files are read with `weights_only=True`: one holding
    other pickled objects is refused with a ValueError saying how to convert it; so is an index naming shards
    outside the directory."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in _checkpoint_files(Path(src)):
        if path.suffix == ".safetensors":
            part = load_file(str(path))
        else:
            try:
                part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as err:  # objects beyond tensors: unpickling them could run code
                # torch's message is a page long; its "GLOBAL module.Name" names the object.
                found = re.search(r"GLOBAL (\S+)", str(err))
                reason = f"one is {found.group(1)}" if found else "it is not a plain state dict"
                raise ValueError(
                    f"{path} holds pickled objects besides tensors, which medplib does not load (unpickling can run "
                    f"code; {reason}). Where you trust the file, convert it to safetensors and pass "
                    'that instead, e.g. python -c "import torch; from safetensors.torch import save_file; '
                    f"save_file(torch.load('{path.name}', weights_only=False), '{path.stem}.safetensors')\" "
                    "(a DeepSpeed file keeps the tensors under 'module'; the upstream zero_to_fp32.py and "
                    "merge scripts write plain state dicts)"
                ) from err
            if isinstance(part, dict) and isinstance(
                part.get("module"), dict
            ):  # a DeepSpeed model_states file
                part = part["module"]
        if not isinstance(part, dict):
            raise ValueError(f"{path} does not hold a state dict")
        dup = sorted(set(part) & set(state))
        if dup:
            raise ValueError(f"{path} repeats {len(dup)} keys of an earlier shard, e.g. {dup[:3]}")
        state.update(part)
    log.info("read %d tensors from %s", len(state), src)
    return state


def _llm_config(cfg: MedPLIBConfig, src: Path, rows: int):
    """LLaMA config from the preset's shapes; norm epsilon, RoPE base and context from SRC's config.json."""
    from medplib.model.medplib import llama_config

    c = cfg.llm
    config = llama_config(cfg, rows)
    src_config = (src if src.is_dir() else src.parent) / "config.json"
    if src_config.is_file():
        upstream = json.loads(src_config.read_text())
        for ours, theirs in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers")):
            if theirs in upstream and upstream[theirs] != getattr(c, ours):
                raise ValueError(
                    f"{src_config}: {theirs} is {upstream[theirs]} but the preset's llm.{ours} is "
                    f"{getattr(c, ours)}; pass --preset with this checkpoint's shapes"
                )
        for key in ("rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act"):
            if key in upstream:
                setattr(config, key, upstream[key])
    return config


def convert_upstream(
    src: str | Path, dst: str | Path, preset: str | Path = "7b", tokenizer: str | Path | None = None
) -> Path:
    """Write a MedPLIB model directory (`MedPLIB.from_pretrained` reads it) from an upstream checkpoint.

    `preset` gives the architecture; the tensors must fit it exactly. The model is built on the meta device
    and takes the checkpoint's tensors as they are, so a 7B conversion needs about the checkpoint's size in
    memory, not twice that. DST is written to a temporary sibling and renamed into place.
    """
    from medplib.model.medplib import DTYPES, MedPLIB
    from medplib.tokenizer import build_tokenizer

    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} exists and is not empty; choose a new output directory")
    tok_dir = Path(tokenizer) if tokenizer else (src if src.is_dir() else src.parent)
    if not (tok_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer at {tok_dir} (tokenizer_config.json): embedding rows are indexed by the checkpoint's "
            "token ids, so pass --tokenizer with the tokenizer directory that came with it"
        )
    upstream = read_checkpoint(src)
    tok = build_tokenizer(tok_dir)
    embed = upstream.get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{src} has no model.embed_tokens.weight: not a MedPLIB / LLaVA checkpoint")
    float_dtypes = {v.dtype for v in upstream.values() if v.is_floating_point()}
    dtype = "bfloat16" if torch.bfloat16 in float_dtypes else "float32"
    cfg = load_model_config(preset)
    rows = max(len(tok), embed.shape[0])
    cfg = cfg.model_copy(
        update={
            "llm": cfg.llm.model_copy(update={"weights": None, "vocab_size": rows}),
            "vision": cfg.vision.model_copy(update={"weights": None}),
            "sam": cfg.sam.model_copy(update={"weights": None}),
            "dtype": dtype,
        }
    )
    with torch.device("meta"):
        model = MedPLIB(cfg, tok, llm_config=_llm_config(cfg, src, rows))
    reference = model.state_dict()
    state = from_upstream(upstream, reference, source=str(src))
    target_dtype = DTYPES[dtype]
    state = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        model.save_pretrained(tmp)
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %d upstream tensors from %s into %s", len(state), src, dst)
    return dst
