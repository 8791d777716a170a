"""Training losses: next-token CE on assistant tokens, mask BCE + Dice + focal + IoU regression, MoE aux."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medplib.constants import IGNORE_INDEX


def next_token_ce(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Mean CE over supervised (non-ignored) next tokens of the whole batch; 0 when there are none.

    Only the positions whose next token is supervised go through `head`, the vocabulary projection: answers are a
    few percent of a sequence (image tokens and the prompt are not supervised), and the 49k-way projection, its
    fp32 copy and its softmax at every other position were about a third of a small-preset step's work."""
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][supervised]).float()
    if not bool(supervised.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets[supervised])


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten()
    t = target.flatten()
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean()


def mask_losses(
    pred_logits: list[torch.Tensor], pred_iou: list[torch.Tensor], targets: list[torch.Tensor]
) -> dict:
    """Per-mask losses at the original image size, averaged over masks. Empty input gives zeros."""
    if not pred_logits:
        return {}
    parts: dict[str, list[torch.Tensor]] = {"bce": [], "dice": [], "focal": [], "iou": []}
    for logits, iou_hat, target in zip(pred_logits, pred_iou, targets, strict=True):
        logits, target = logits.float(), target.float().to(logits.device)
        parts["bce"].append(F.binary_cross_entropy_with_logits(logits, target))
        parts["dice"].append(dice_loss(logits, target))
        parts["focal"].append(focal_loss(logits, target))
        p = torch.sigmoid(logits)
        soft_iou = (p * target).sum() / (p + target - p * target).sum().clamp_min(1e-6)
        parts["iou"].append(F.mse_loss(iou_hat.float(), soft_iou.detach()))
    return {name: torch.stack(v).mean() for name, v in parts.items()}


def mask_box(mask: torch.Tensor) -> torch.Tensor | None:
    """Tight box (x0, y0, x1, y1) of a (H, W) mask as fractions of its width and height; None when empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None
    h, w = mask.shape
    return torch.stack([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]).float()


def box_loss(boxes: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
    """Mean over masks of L1 + (1 - generalised IoU) between regressed boxes (N, 4, fractions) and each target
    mask's tight box; empty targets are skipped. The mask losses alone give a box a weak, late gradient (a box
    far off the structure changes the mask little), this one pulls it straight to the structure."""
    terms = []
    for box, target in zip(boxes, targets, strict=True):
        ref = mask_box(target.to(box.device))
        if ref is None:
            continue
        box = box.float()
        l1 = (box - ref).abs().mean()
        lo, hi = torch.maximum(box[:2], ref[:2]), torch.minimum(box[2:], ref[2:])
        inter = (hi - lo).clamp_min(0).prod()
        area = (box[2:] - box[:2]).prod() + (ref[2:] - ref[:2]).prod() - inter
        hull = (torch.maximum(box[2:], ref[2:]) - torch.minimum(box[:2], ref[:2])).prod()
        giou = inter / area.clamp_min(1e-9) - (hull - area) / hull.clamp_min(1e-9)
        terms.append(l1 + 1 - giou)
    return torch.stack(terms).mean() if terms else boxes.sum() * 0.0
