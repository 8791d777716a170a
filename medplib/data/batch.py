"""From a `Sample` to model inputs: `encode_sample` (one row, what preprocessing stores) and `collate` (a batch).

An encoded sample keeps images as uint8 square views (compact in Parquet); `collate` normalises them, pads the
token ids on the right and keeps per-sample variable-size tensors (region masks, target masks) as lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from medplib.constants import IGNORE_INDEX
from medplib.data.conversation import tokenize_conversation
from medplib.data.schema import RegionPrompt, Sample, Turn
from medplib.data.transforms import Geometry, normalize_view, region_to_mask, to_square
from medplib.model.config import MedPLIBConfig


@dataclass
class Encoded:
    """One sample ready for `collate`. Views are uint8 HxWx3 squares; masks are bool."""

    input_ids: list[int]
    labels: list[int]
    vision_view: np.ndarray | None  # (Hv, Wv, 3) uint8, None for text-only samples
    sam_view: np.ndarray | None  # (S, S, 3) uint8
    sam_geometry: Geometry | None
    region_masks: np.ndarray  # (R, Hv, Wv) bool, in the vision view
    target_masks: list[np.ndarray] = field(default_factory=list)  # M x (H, W) bool at original size
    sample_id: str = ""
    sam_embedding: np.ndarray | None = None  # (C, e, e) frozen SAM encoder output of sam_view, when cached


def encode_regions(
    regions: list[RegionPrompt], image_hw: tuple[int, int], cfg: MedPLIBConfig, data_root: Path | None
) -> np.ndarray:
    """Region prompts -> (R, Hv, Wv) bool masks in the vision view."""
    size = cfg.vision.image_size_px
    out = np.zeros((len(regions), size, size), dtype=bool)
    for i, region in enumerate(regions):
        mask = region_to_mask(region, image_hw, cfg.region.point_square_px, data_root)
        out[i], _ = to_square(mask, size, cfg.vision.pad_mode)
    return out


def image_views(image: np.ndarray, cfg: MedPLIBConfig) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """The vision-tower view, the SAM view and where the image sits in the SAM view (uint8 squares). Where the
    two are made alike (the `small` preset's tower reads the SAM view) they are one array."""
    sam_view, geo = to_square(image, cfg.sam.image_size_px, cfg.sam.pad_mode, 0)
    v = cfg.vision
    if (v.image_size_px, v.pad_mode, set(v.pad_value)) == (cfg.sam.image_size_px, cfg.sam.pad_mode, {0}):
        return sam_view, sam_view, geo
    vision_view, _ = to_square(image, v.image_size_px, v.pad_mode, v.pad_value)
    return vision_view, sam_view, geo


def encode_sample(
    sample: Sample | list[Turn],
    image: np.ndarray | None,
    tokenizer: PreTrainedTokenizerBase,
    cfg: MedPLIBConfig,
    *,
    regions: list[RegionPrompt] | None = None,
    target_masks: list[np.ndarray] | None = None,
    data_root: Path | None = None,
    for_generation: bool = False,
) -> Encoded:
    """Tokenise, build both image views and the region masks. `image` is uint8 HxWx3 (see `image.load_image`)."""
    encoded = encode_without_views(
        sample,
        None if image is None else image.shape[:2],
        tokenizer,
        cfg,
        regions=regions,
        target_masks=target_masks,
        data_root=data_root,
        for_generation=for_generation,
    )
    if image is not None:
        encoded.vision_view, encoded.sam_view, encoded.sam_geometry = image_views(image, cfg)
    return encoded


def encode_without_views(
    sample: Sample | list[Turn],
    image_hw: tuple[int, int] | None,
    tokenizer: PreTrainedTokenizerBase,
    cfg: MedPLIBConfig,
    *,
    regions: list[RegionPrompt] | None = None,
    target_masks: list[np.ndarray] | None = None,
    data_root: Path | None = None,
    for_generation: bool = False,
) -> Encoded:
    """`encode_sample` without the image views (left None): for a caller that makes each image's views once and
    shares them among the rows of that image (preprocessing). `image_hw` is the image's (height, width), None
    for a text-only sample."""
    turns = sample.turns if isinstance(sample, Sample) else sample
    sample_id = sample.id if isinstance(sample, Sample) else "request"
    if regions is None:
        regions = sample.regions if isinstance(sample, Sample) else []
    if len(regions) > cfg.region.max_regions:
        raise ValueError(
            f"sample {sample_id}: {len(regions)} region prompts, the model takes at most "
            f"{cfg.region.max_regions} (region.max_regions)"
        )
    has_image_tag = any("<image>" in t.text for t in turns)
    if image_hw is not None and not has_image_tag:
        turns = [Turn(role=turns[0].role, text="<image>\n" + turns[0].text), *turns[1:]]
    if image_hw is None and has_image_tag:
        raise ValueError(f"sample {sample_id}: the text has <image> but no image was given")
    tok = tokenize_conversation(
        turns,
        tokenizer,
        cfg.conv_template,
        cfg.vision.grid**2,
        cfg.max_length,
        for_generation=for_generation,
        sample_id=sample_id,
    )
    if image_hw is not None:
        region_masks = encode_regions(regions[: tok.num_regions], image_hw, cfg, data_root)
    else:
        if regions:
            raise ValueError(f"sample {sample_id}: region prompts need an image")
        region_masks = np.zeros((0, cfg.vision.image_size_px, cfg.vision.image_size_px), dtype=bool)
    masks = list(target_masks or [])[: tok.num_masks]
    return Encoded(tok.input_ids, tok.labels, None, None, None, region_masks, masks, sample_id)


def collate(items: list[Encoded], cfg: MedPLIBConfig, pad_id: int) -> dict:
    """A batch dict for `MedPLIB.forward`; token ids right-padded with `pad_id`, labels with IGNORE_INDEX."""
    length = max(len(it.input_ids) for it in items)
    b = len(items)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it.input_ids)
        input_ids[i, :n] = torch.tensor(it.input_ids)
        labels[i, :n] = torch.tensor(it.labels)
        attention_mask[i, :n] = 1
    v, s = cfg.vision.image_size_px, cfg.sam.image_size_px
    has_image = torch.tensor([it.vision_view is not None for it in items])
    pixel_values = torch.zeros((b, 3, v, v))
    sam_pixel_values = torch.zeros((b, 3, s, s))
    sam_geometry = torch.zeros((b, 7), dtype=torch.long)
    for i, it in enumerate(items):
        if it.vision_view is None:
            continue
        geo = it.sam_geometry
        # Where encode_sample put the image in the vision view.
        vision_geo = Geometry.fit(geo.orig_h, geo.orig_w, v, cfg.vision.pad_mode)
        pixel_values[i] = normalize_view(
            it.vision_view,
            vision_geo,
            cfg.vision.normalization,
            cfg.vision.pixel_mean,
            cfg.vision.pixel_std,
            1 / 255,
        )
        sam_pixel_values[i] = normalize_view(
            it.sam_view, geo, cfg.sam.normalization, cfg.sam.pixel_mean, cfg.sam.pixel_std, 1.0
        )
        sam_geometry[i] = it.sam_geometry.as_tensor()
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "has_image": has_image,
        "pixel_values": pixel_values,
        "sam_pixel_values": sam_pixel_values,
        "sam_geometry": sam_geometry,
        "region_masks": [torch.from_numpy(it.region_masks) for it in items],
        "target_masks": [[torch.from_numpy(m) for m in it.target_masks] for it in items],
        # Precomputed frozen-encoder outputs by row; the model adds the ones it computes (`MedPLIB.sam_embeddings`).
        "sam_embeddings": {
            i: torch.from_numpy(it.sam_embedding)
            for i, it in enumerate(items)
            if it.sam_embedding is not None
        },
    }
