"""Which parameters a stage trains: LoRA adapters on the LLM (through `peft`) plus fully trained modules.

The vision tower and the SAM image and prompt encoders stay frozen whatever a stage asks (upstream does the
same); `sft_modules` are name substrings of parameters trained in full (`mm_projector`, `mask_decoder`,
`text_hidden_fcs`, `region_fea_adapter`, `router`, `lm_head`, `embed_tokens`, `norm`, ...).
"""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
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
