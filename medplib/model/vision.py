"""Vision tower (CLIP ViT, frozen) and the `mlp2x_gelu` projector into the LLM's embedding space."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from medplib.model.config import VisionConfig


class ClipVisionTower(nn.Module):
    """Patch features (B, grid*grid, C) from the `select_layer` hidden state, CLS dropped (LLaVA-1.5)."""

    def __init__(self, cfg: VisionConfig, clip_config: CLIPVisionConfig | None = None):
        super().__init__()
        self.cfg = cfg
        if clip_config is not None:
            self.clip = CLIPVisionModel(clip_config)
        elif cfg.weights:
            self.clip = CLIPVisionModel.from_pretrained(cfg.weights, local_files_only=True)
        else:
            self.clip = CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=cfg.hidden_size,
                    intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.num_layers,
                    num_attention_heads=cfg.num_heads,
                    image_size=cfg.image_size_px,
                    patch_size=cfg.patch_size_px,
                )
            )
        self.hidden_size = self.clip.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.clip.parameters()).dtype
        out = self.clip(pixel_values.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.cfg.select_layer][:, 1:]


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {kind!r}; use 'mlp2x_gelu' or 'linear'")
