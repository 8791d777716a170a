"""Vision towers (frozen) and the `mlp2x_gelu` projector into the LLM's embedding space.

* `ClipVisionTower`: LLaVA-1.5's CLIP ViT patch features (the paper's `7b` preset).
* `SamEncoderVisionTower`: the SAM image encoder's embedding average-pooled to a token grid; it owns no weights
  and borrows `sam.image_encoder` (the `small` preset, where no CLIP ships offline but LiteMedSAM does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from medplib.model.config import MedPLIBConfig, VisionConfig
from medplib.model.packaged import resolve_weights


class ClipVisionTower(nn.Module):
    """Patch features (B, grid*grid, C) from the `select_layer` hidden state, CLS dropped (LLaVA-1.5)."""

    def __init__(self, cfg: VisionConfig, clip_config: CLIPVisionConfig | None = None):
        super().__init__()
        self.cfg = cfg
        if clip_config is not None:
            self.clip = CLIPVisionModel(clip_config)
        elif cfg.weights:
            self.clip = CLIPVisionModel.from_pretrained(resolve_weights(cfg.weights), local_files_only=True)
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


class SamEncoderVisionTower(nn.Module):
    """(B, grid*grid, C) tokens: the frozen SAM image embedding (B, C, e, e), average-pooled to grid x grid.

    The encoder is held by reference, not registered as a submodule, so its weights live (and are saved,
    counted and moved) once, under `sam.image_encoder`; both users keep it frozen, as upstream freezes CLIP and
    the SAM encoder in every stage. The config requires the vision view to be the SAM view, so the model runs
    the encoder once per image and hands the embedding to `pool`.
    """

    def __init__(self, cfg: VisionConfig, encoder: nn.Module, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self._encoder = (encoder,)  # a tuple hides it from nn.Module registration
        self.hidden_size = embed_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        encoder = self._encoder[0]
        return self.pool(encoder(pixel_values.to(next(encoder.parameters()).dtype)))

    def pool(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(embedding, self.cfg.grid).flatten(2).transpose(1, 2)


def build_vision_tower(
    cfg: MedPLIBConfig, sam_encoder: nn.Module, clip_config: CLIPVisionConfig | None = None
) -> nn.Module:
    if cfg.vision.kind == "sam_encoder":
        return SamEncoderVisionTower(cfg.vision, sam_encoder, cfg.sam.prompt_embed_dim)
    return ClipVisionTower(cfg.vision, clip_config)


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {kind!r}; use 'mlp2x_gelu' or 'linear'")
