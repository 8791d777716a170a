"""What the model answered about one image (`Prediction`) or one volume (`VolumePrediction`), whichever way it was
asked: `medplib predict`, the HTTP API and its client, batch evaluation. numpy only, so the client returns them
without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medplib_client.masks import png_encode


@dataclass
class Prediction:
    """The answer, one bool (H, W) mask per `<SEG>` at the original image size, SAM's IoU score per mask, and
    timings."""

    text: str
    masks: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    num_generated_tokens: int = 0
    # Empty when the prediction came over HTTP: the API sends only their count.
    token_ids: list[int] = field(default_factory=list)
    # "stop": the answer ended (EOS or a stop string); "length": it ran into max_new_tokens.
    finish_reason: str = "stop"

    def save_masks(self, prefix: str | Path) -> list[Path]:
        """Write `<prefix>_mask<i>.png` (0/255) for each mask; returns the paths."""
        prefix = Path(prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, mask in enumerate(self.masks):
            path = prefix.with_name(f"{prefix.name}_mask{i}.png")
            path.write_bytes(png_encode(mask))
            paths.append(path)
        return paths


@dataclass
class VolumePrediction:
    """A volume's answer: the 3-D mask (stored voxel order; None without `segment`), answers per slice."""

    answer: str
    axis: int
    slices_read: list[int]
    answer_slices: list[int]
    answers: dict[int, str] = field(default_factory=dict)
    mask: np.ndarray | None = None
    mask_slices: list[int] = field(default_factory=list)  # slices (along `axis`) where the mask is present
    timings: dict[str, float] = field(default_factory=dict)
