"""Which parameters a stage trains: LoRA adapters on the LLM (through `peft`) plus fully trained modules.

The vision tower and the SAM image and prompt encoders stay frozen whatever a stage asks (upstream does the
same); `sft_modules` are name substrings of parameters trained in full (`mm_projector`, `mask_decoder`,
`text_hidden_fcs`, `region_fea_adapter`, `router`, `lm_head`, `embed_tokens`, `norm`, ...).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import nn

from medplib.constants import SPECIAL_TOKENS
from medplib.model.config import LoraSettings

ALWAYS_FROZEN = ("vision_tower.", "sam.image_encoder.", "sam.prompt_encoder.")


def added_token_ids(tokenizer) -> list[int]:
    """Ids of MedPLIB's special tokens (the rows `resize_token_embeddings` added to the base vocabulary)."""
    return sorted(tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS)


def is_lora(model: nn.Module) -> bool:
    return isinstance(getattr(model, "llm", None), PeftModel)


def prepare_trainable(model: nn.Module, lora: LoraSettings | None, sft_modules: list[str]) -> dict[str, int]:
    """Freeze everything, add LoRA (if given), then unfreeze `sft_modules`; returns parameter counts."""
    model.requires_grad_(False)
    if lora is not None:
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            bias="none",
            layers_to_transform=lora.layer_indexes(model.llm.config.num_hidden_layers),
            trainable_token_indices=added_token_ids(model.tokenizer) if lora.new_token_rows else None,
        )
        model.llm = get_peft_model(model.llm, config)  # marks only the adapters trainable
        for module in model.llm.modules():
            if isinstance(module, TrainableTokensLayer):
                module.forward = types.MethodType(_token_rows_forward, module)
    # Added-token rows train through the output side only when the adapters sit on the top layers.
    model.input_token_grad = not (lora is not None and lora.new_token_rows and lora.layers is not None)
    unknown = [m for m in sft_modules if not any(m in name for name, _ in model.named_parameters())]
    if unknown:
        raise ValueError(f"sft_modules {unknown} match no parameter of the model")
    for name, param in model.named_parameters():
        if any(m in name for m in sft_modules) and not name.startswith(ALWAYS_FROZEN) and "lora_" not in name:
            param.requires_grad_(True)
    if hasattr(model.llm, "gradient_checkpointing_enable") and getattr(
        model, "gradient_checkpointing", False
    ):
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def _token_rows_forward(layer: TrainableTokensLayer, x: torch.Tensor) -> torch.Tensor:
    """peft's trainable-token forward without its copies of the whole vocabulary matrix, the same numbers to the
    bit (`tests/test_model.py`). peft writes the trainable rows into a copy of the 49k-row matrix at every call;
    then autocast rounds that copy to bf16 for the tied lm_head, and the backward turns its bf16 gradient back
    into an fp32 matrix and builds the embedding's dense fp32 gradient, to read a few rows of each. Here the
    embedding looks up a table of just the rows the batch uses (a row's gradient sums its positions in the same
    order whatever the table's size), and the lm_head puts the rows, rounded, into a bf16 copy of the frozen
    matrix kept between calls: rounding and writing rows commute, so the product is peft's. Earlier tries that
    changed the products themselves (e1ecf3b, 832090d) moved training onto another path under bf16. A `small`
    bf16 step, alternating in one process (2026-12-03, median of 15): vl 1767 -> 1704 ms, grounding 1169 ->
    1147 ms (PyTorch's profiler: peft's four whole-matrix copies a step and the gradient's fill are gone)."""
    base = layer.base_layer
    adapters = layer.active_adapters
    simple_embedding = isinstance(base, nn.Embedding) and (
        base.max_norm is None
        and not base.sparse
        and not base.scale_grad_by_freq
        and getattr(layer, "_get_embed_scale", lambda: None)() is None  # Gemma-style scaling: peft's way
    )
    if (
        layer.disable_adapters
        or layer.merged
        or len(adapters) != 1
        or base.weight.requires_grad  # a matrix trained in full (sft) takes peft's way
        or not (simple_embedding or type(base) is nn.Linear)
    ):
        return TrainableTokensLayer.forward(layer, x)
    delta = layer.trainable_tokens_delta[adapters[0]]
    weight = base.weight
    index = torch.tensor(layer.token_indices[adapters[0]], device=weight.device)
    if simple_embedding:
        # An export carries the pad id, so the stages after the first have an embedding with a padding_idx,
        # whose row gets no gradient: the pad id goes last into unique's input, so where[-1] is its table row.
        pad = [] if base.padding_idx is None else [base.padding_idx]
        ids, where = torch.unique(torch.cat([x.flatten(), index, index.new_tensor(pad)]), return_inverse=True)
        n = x.numel()
        table = weight[ids].index_copy(0, where[n : n + len(index)], delta.to(weight))
        return F.embedding(where[:n].view_as(x), table, padding_idx=int(where[-1]) if pad else None)
    kind = x.device.type
    if not torch.is_autocast_enabled(kind) or weight.dtype != torch.float32:
        return F.linear(x, weight.index_copy(0, index, delta.to(weight)))
    dtype = torch.get_autocast_dtype(kind)
    key = (weight.data_ptr(), weight._version, dtype)
    cached = getattr(layer, "_rounded_weight", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        layer._rounded_weight = cached
    return F.linear(x, cached[1].index_copy(0, index, delta.to(dtype)))


def merge_lora(model: nn.Module) -> None:
    """Fold the LoRA deltas into the base weights and drop the peft wrapper (for export / the next stage)."""
    if is_lora(model):
        model.llm = model.llm.merge_and_unload()


def frozen_linears_to_bf16(model: nn.Module) -> int:
    """Store the frozen linear layers of the LLM in bf16 for a bf16-autocast run; returns how many.

    Autocast rounds every fp32 weight to bf16 at every matmul, so a frozen weight kept in bf16 gives the same
    products without that copy: `bench.train_step`'s bf16 step 0.99 s with it, 1.49 s without (its fp32 step, the
    control, 2.09 vs 2.15 s; 2026-11-29, two runs; a harness in separate processes saw no difference on vl and
    grounding steps of the pipeline's models, so the gain depends on the step). Trainable layers and a
    linear that shares its weight with another module (a tied lm_head, the embedding) stay fp32. The stage's
    export starts again from the fp32 starting model, so nothing here reaches a saved model."""
    import torch

    uses: dict[int, int] = {}
    for _, param in model.llm.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    count = 0
    for module in model.llm.modules():
        if type(module) is not nn.Linear or uses[id(module.weight)] > 1:
            continue
        if any(p.requires_grad for p in module.parameters()):
            continue
        module.to(torch.bfloat16)
        count += 1
    return count
