"""Parameter counts per component, computed on the meta device so a 7B preset costs no memory."""

from __future__ import annotations

import torch

from medplib.model.config import load_model_config


def parameter_summary(preset: str) -> dict[str, int]:
    from transformers import CLIPVisionConfig, LlamaConfig

    from medplib.model.medplib import MedPLIB
    from medplib.model.packaged import resolve_weights

    cfg = load_model_config(preset)
    # Weights are not read on the meta device: count the architecture only. Pretrained components contribute
    # their config (shapes), read from the local weights directory.
    llm_config = LlamaConfig.from_pretrained(resolve_weights(cfg.llm.weights)) if cfg.llm.weights else None
    vision_config = (
        CLIPVisionConfig.from_pretrained(resolve_weights(cfg.vision.weights))
        if cfg.vision.kind == "clip" and cfg.vision.weights
        else None
    )
    cfg = cfg.model_copy(update={"sam": cfg.sam.model_copy(update={"weights": None})})
    with torch.device("meta"):
        model = MedPLIB(cfg, llm_config=llm_config, vision_config=vision_config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    llm = model.llm.get_decoder()
    moe_experts = sum(
        count(layer.mlp) - layer.mlp.router.weight.numel()
        for layer in llm.layers
        if hasattr(layer.mlp, "experts")
    )
    rows = {
        "llm (all)": count(model.llm),
        "llm embeddings + lm_head": count(model.llm.get_input_embeddings())
        + (0 if model.llm.config.tie_word_embeddings else count(model.llm.get_output_embeddings())),
        "llm moe experts": moe_experts,
        # 0 when the tower borrows sam.image_encoder (vision.kind sam_encoder): those weights are counted there.
        "vision_tower": count(model.vision_tower),
        "mm_projector": count(model.mm_projector),
        "region_fea_adapter": count(model.region_fea_adapter),
        "text_hidden_fcs": count(model.text_hidden_fcs),
        "sam.image_encoder": count(model.sam.image_encoder),
        "sam.prompt_encoder": count(model.sam.prompt_encoder),
        "sam.mask_decoder": count(model.sam.mask_decoder),
        "total": count(model),
    }
    return rows
