"""Reading pretrained component checkpoints from local files (never from a hub, never unpickling objects)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)


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
    """Load a SAM-layout checkpoint (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) into `sam`.

    Every key of `sam` must be found, with the right shape; extra checkpoint keys are named in the error.
    """
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
