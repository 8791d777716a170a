"""Which parameters a stage trains: LoRA adapters on the LLM (through `peft`) plus fully trained modules.

The vision tower and the SAM image and prompt encoders stay frozen whatever a stage asks (upstream does the
same); `sft_modules` are name substrings of parameters trained in full (`mm_projector`, `mask_decoder`,
`text_hidden_fcs`, `region_fea_adapter`, `router`, `lm_head`, `embed_tokens`, `norm`, ...).
"""

from __future__ import annotations

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
        sparse_token_rows(model.llm)
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


class SparseTokenRows(TrainableTokensLayer):
    """peft's trainable-token layer (the added tokens' embedding rows, and tied to them the lm_head's) with a
    forward that never builds the merged vocabulary matrix; `sparse_token_rows` gives a layer this class. Same
    values as peft's forward; merging, saving and the state-dict names stay peft's.

    peft writes the trained rows into a copy of the whole 49k x 576 matrix at every call (`index_copy`), and the
    tied lm_head then goes through autocast's bf16 cast and its gradient back to fp32: four full-matrix copies a
    training step, ~0.12 of a 1.35 s vl step on `small` (torch.profiler, 2026-11-30). Here the frozen matrix is
    used as it is (the head's bf16 copy made once) and only the added rows or columns are replaced.

    Every gradient is a matmul or a gather, so it is the same in every run: an indexed read of the rows
    (`delta[slot]`) has as its gradient an accumulating `index_put`, which on CPU adds floats from several threads
    in no fixed order once it is large (a batch's 256 image tokens are added tokens), and that made two runs
    of the same vl stage part at step 12 (the first version of this, 32931f5, reverted in 1075133)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base, adapters = self.base_layer, self.active_adapters
        if self.disable_adapters or not adapters or self.merged or len(adapters) > 1:
            return super().forward(x, *args, **kwargs)
        index = torch.tensor(self.token_indices[adapters[0]], device=x.device)
        delta = self.trainable_tokens_delta[adapters[0]]
        if isinstance(base, nn.Embedding):
            if self._get_embed_scale() is not None:
                return super().forward(x, *args, **kwargs)
            out = base(x)
            one_hot = (x.unsqueeze(-1) == index).to(delta.dtype)  # (..., added tokens)
            with torch.autocast(x.device.type, enabled=False):  # fp32, exact: each row is 1.0 x its delta
                rows = one_hot @ delta
            return torch.where(one_hot.sum(-1, keepdim=True) > 0, rows.to(out.dtype), out)
        frozen = not base.weight.requires_grad
        out = F.linear(x, self._frozen_bf16() if frozen and _autocast_bf16(x) else base.weight)
        return out.index_copy(-1, index, F.linear(x, delta).to(out.dtype))

    def _frozen_bf16(self) -> torch.Tensor:
        """The frozen base weight rounded to bf16 as autocast would round it, kept until the weight changes."""
        weight = self.base_layer.weight
        key = (weight.data_ptr(), weight._version, weight.device)
        cached = getattr(self, "_bf16_weight", None)
        if cached is None or cached[0] != key:
            self._bf16_weight = (key, weight.detach().to(torch.bfloat16))
        return self._bf16_weight[1]


def _autocast_bf16(x: torch.Tensor) -> bool:
    kind = x.device.type
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16


def sparse_token_rows(llm: nn.Module) -> int:
    """Give every peft trainable-token layer of `llm` the `SparseTokenRows` forward; returns how many."""
    layers = [m for m in llm.modules() if type(m) is TrainableTokensLayer]
    for layer in layers:
        layer.__class__ = SparseTokenRows
    return len(layers)


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
