"""The files of a MedPLIB model directory, written and read without unpickling anything.

    config.json                       MedPLIBConfig + `model_type` / `architectures` (what Hugging Face tools read)
    model.safetensors                 all weights, or when larger than one shard:
    model-00001-of-0000N.safetensors  shards, with model.safetensors.index.json (`weight_map`: tensor -> file)
    tokenizer/                        the tokenizer; its chat template is the conversation template of training
    llm_config.json, vision_config.json

`MedPLIB.save_pretrained` / `from_pretrained` call these; `is_model_dir` is what every reader checks.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from medplib.model.config import MedPLIBConfig

MODEL_TYPE = "medplib"
ARCHITECTURE = "MedPLIB"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Shards small enough for object stores' single-part uploads and for loading on a modest host.
MAX_SHARD_BYTES = 5 * 1000**3
_HF_KEYS = ("model_type", "architectures")


def is_model_dir(path: Path) -> bool:
    """A directory with config.json and its weights (one file or an index of shards)."""
    return (path / "config.json").is_file() and (
        (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()
    )


def write_config(cfg: MedPLIBConfig, path: Path) -> None:
    data = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **cfg.model_dump(mode="json")}
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_config(path: Path) -> MedPLIBConfig:
    data = json.loads(path.read_text())
    found = data.get("model_type", MODEL_TYPE)  # directories written before model_type existed have none
    if found != MODEL_TYPE:
        raise ValueError(f"{path}: model_type is {found!r}, not {MODEL_TYPE!r}: not a MedPLIB model")
    return MedPLIBConfig.model_validate({k: v for k, v in data.items() if k not in _HF_KEYS})


def _unique_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each storage once (tied weights are saved under their first name)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.contiguous()
    return out


# safetensors' dtype names (https://github.com/huggingface/safetensors, the format's README).
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """One safetensors file (an 8-byte header length, the JSON header, then each tensor's bytes), written straight
    from the tensors' memory: `safetensors.torch.save_file` first copies every tensor into one bytes object, ~3 s
    of a moe export's 900 MB on 2 cores against ~0.6 s here, and a pipeline writes five such models. Tensors go
    largest element first, so every tensor's data starts at a multiple of its element size (as save_file lays
    them out); the header is padded to 8 bytes."""
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())  # stable: names keep their order
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name} has dtype {t.dtype}, which safetensors cannot hold")
        end = offset + t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            data = tensors[name].detach().cpu().contiguous().reshape(-1)
            f.write(data.view(torch.uint8).numpy().data)  # little-endian, as the format and every host we run


def save_weights(module: nn.Module, path: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """`model.safetensors`, or shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own) plus
    the index; returns the files written."""
    tensors = _unique_tensors(module)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt", "medplib": "1"}
    if len(shards) == 1:
        write_safetensors(shards[0], path / SINGLE_FILE, metadata)
        return [path / SINGLE_FILE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(shard, path / name, metadata)
        files.append(path / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*files, path / INDEX_FILE]


def load_weights(module: nn.Module, path: Path) -> None:
    """Load a single file or every shard of the index; raises naming the tensors that do not match."""
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for name in sorted(set(weight_map.values())):
            state.update(load_file(str(path / name)))
        where = f"{path}/{INDEX_FILE}"
    else:
        state = load_file(str(path / SINGLE_FILE))
        where = f"{path}/{SINGLE_FILE}"
    missing, unexpected = module.load_state_dict(state, strict=False)
    # A tied weight was saved under its first name only: it is loaded when any name of its storage was.
    storages: dict[tuple[int, int], list[str]] = {}
    for name, tensor in module.state_dict().items():
        storages.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), []).append(name)
    tied = {n for names in storages.values() if len(names) > 1 and set(names) & set(state) for n in names}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def save_tokenizer(tokenizer, cfg: MedPLIBConfig, path: Path) -> None:
    """The tokenizer with the chat template of `cfg.conv_template`, so `apply_chat_template` prompts the model
    exactly as it was trained (the base model's own template, e.g. SmolLM2's, has another system prompt)."""
    from medplib.data.conversation import chat_template

    tokenizer.chat_template = chat_template(cfg.conv_template, cfg.vision.grid**2)
    tokenizer.save_pretrained(path)
