"""3-D segmentation scores for volume-level grounding: Dice, the 95th-percentile Hausdorff distance and the
normalised surface Dice (NSD), in millimetres through the voxel spacing. The boundary metrics are MONAI's
(`monai.metrics`, the `volumes` extra), computed on the CPU. An empty prediction or an empty ground truth has no
boundary: HD95 and NSD are then None (reported as missing, never as 0)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NSD_TOLERANCE_MM = 2.0


def dice_3d(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P & G| / (|P| + |G|); 1.0 when both are empty."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & gt).sum()) / total


def _tensors(pred: np.ndarray, gt: np.ndarray):
    import torch

    return (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None] for a in (pred, gt))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def hd95_mm(pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float]) -> float | None:
    """95th-percentile symmetric Hausdorff distance between the two boundaries, in mm (MONAI)."""
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() or not gt.any():
        return None
    p, g = _tensors(pred, gt)
    value = compute_hausdorff_distance(p, g, percentile=95, spacing=[float(s) for s in spacing_mm])
    return _finite(float(value.item()))


def nsd(
    pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float = NSD_TOLERANCE_MM
) -> float | None:
    """Normalised surface Dice: the share of both boundaries within `tolerance_mm` of the other (MONAI)."""
    from monai.metrics import compute_surface_dice

    if not pred.any() or not gt.any():
        return None
    p, g = _tensors(pred, gt)
    value = compute_surface_dice(
        p, g, class_thresholds=[tolerance_mm], spacing=[float(s) for s in spacing_mm]
    )
    return _finite(float(value.item()))


def voxel_spacing_mm(affine: np.ndarray) -> tuple[float, float, float]:
    """The length of each voxel axis in mm, from a voxel -> mm affine."""
    return tuple(float(np.linalg.norm(affine[:3, a])) for a in range(3))
