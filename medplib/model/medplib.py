"""The MedPLIB model: LLaVA-style LLM + vision tower + projector, region adapter, `<SEG>` -> SAM mask decoder,
and optional top-k MoE FFNs. One file holds the whole forward pass; components live beside it.

Data flow of `forward(batch)`:
  token ids -> embeddings; `<image>` positions <- projector(vision patch features);
  `<region_feat>` positions <- region_fea_adapter(mean of the patch features under each region mask, with
  `region.position` also the mean of SAM's positional encoding over the same cells);
  LLM decoder -> last hidden states -> lm_head -> CE on assistant tokens;
  hidden state that predicts each `<SEG>` -> text_hidden_fcs -> sparse prompt -> SAM mask decoder on the frozen
  SAM image embedding -> mask logits, un-padded to the original image size -> BCE/Dice/focal/IoU losses.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers < 5
    from transformers.modeling_utils import no_init_weights

from medplib.data.transforms import Geometry, region_cells, unpad_mask_logits
from medplib.model import export
from medplib.model.attention import GENERATION_ATTENTION
from medplib.model.config import LossWeights, MedPLIBConfig
from medplib.model.losses import box_loss, mask_losses, next_token_ce
from medplib.model.moe import MoEFeedForward, convert_to_moe
from medplib.model.packaged import resolve_weights
from medplib.model.sam import SAM
from medplib.model.vision import build_projector, build_vision_tower
from medplib.tokenizer import SpecialIds, build_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (x0, y0, x1, y1) as fractions of the image: where a `seg_prompt: box` head starts (sigmoid never reaches 0 or 1).
WHOLE_IMAGE_BOX = (0.02, 0.02, 0.98, 0.98)
GROUNDING_TERMS = ("bce", "dice", "focal", "iou", "box")
# transformers renamed `past_key_values` to `cache` in 5.2x; use whichever this version takes.
_CACHE_KW = (
    "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
)


@dataclass
class Segmentation:
    """Mask logits at original size per `<SEG>`, SAM's IoU prediction, and the regressed boxes (box prompts)."""

    logits: list[torch.Tensor]
    iou: torch.Tensor
    boxes: torch.Tensor | None
    rows: list[int] = field(default_factory=list)  # batch row of each mask


@dataclass
class Generation:
    """One generated answer: the tokens, the text, and a mask per `<SEG>` at the original image size."""

    token_ids: list[int]
    text: str
    mask_logits: list[torch.Tensor] = field(default_factory=list)  # (H, W) float each
    mask_scores: list[float] = field(default_factory=list)  # SAM's IoU prediction per mask
    # A mask per `<SEG>` of the row's teacher-forced answer (`MedPLIB.generate`'s `answers`), and their scores.
    forced_mask_logits: list[torch.Tensor] = field(default_factory=list)
    forced_mask_scores: list[float] = field(default_factory=list)


def llama_config(cfg: MedPLIBConfig, vocab_size: int) -> LlamaConfig:
    """The LLaMA config of the preset's LLM shapes."""
    c = cfg.llm
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
    )


def _build_llm(cfg: MedPLIBConfig, llm_config: LlamaConfig | None) -> LlamaForCausalLM:
    if llm_config is None and cfg.llm.weights:
        weights = resolve_weights(cfg.llm.weights)  # `pkg:smollm2` converts once into the user's cache
        return LlamaForCausalLM.from_pretrained(weights, local_files_only=True, dtype=torch.float32)
    return LlamaForCausalLM(llm_config or llama_config(cfg, 32000))  # resized to the tokenizer right after


def _init_added_rows(weight: torch.Tensor, base_rows: int) -> None:
    """Rows of tokens added to a pretrained vocabulary start near the mean row (plus a little noise, so the
    tokens differ). Random rows would give `<SEG>` an arbitrary logit and an out-of-distribution input; near the
    mean it is an average token the model can learn to predict (LLaVA initialises its added tokens at the mean too)."""
    with torch.no_grad():
        old = weight[:base_rows].float()
        noise = torch.randn(weight.shape[0] - base_rows, weight.shape[1]) * old.std(0) * 0.1
        weight[base_rows:] = (old.mean(0) + noise).to(weight.dtype)


# Masks a mask decoder call decodes without autograd (`segment` at generation or a teacher-forced pass at
# inference). Each carries the 4,096 x 256 image tokens through the two-way transformer, so a batch's 64 masks in
# one call made ~270 MB tensors that the heap met fresh each time: 21% of an evaluation actor's perf samples were
# the kernel zeroing new pages (2026-12-02). `small`, bf16 autocast, 1 CPU thread: 33-34 ms a mask by 2, 4 or 8,
# 40-47 by 64, 39 one at a time, the same logits to the bit; `medplib eval` of 120 `test` rows 46.0 -> 41.5 s
# with the same records. Training keeps one call: a graph holds every mask's activations anyway.
MASKS_PER_DECODE = 4


# A prefix run apart is one more decoder call over the layers' weights: on `small` on 2 CPU threads, 51 positions
# saved (4 training rows sharing a 17-token system prompt) bought nothing, 255 (16 rows) 7% of the call.
MIN_SHARED_POSITIONS = 128


def shared_prefixes(
    emb: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """The prefixes rows of a right-padded batch share: a length L, per row which of the G distinct L-position
    prefixes it opens with (0..G-1, by input embedding: the system prompt and chat header every MeCoVQA row opens
    with, then the image for rows about one image), and each prefix's first row. L maximises the positions not
    run, (rows - G) * L, short of every row's last token; None where that saves fewer than
    `MIN_SHARED_POSITIONS`."""
    b = emb.shape[0]
    shortest = int(attention_mask.sum(1).min()) - 1
    if b < 2 or shortest < 1:
        return None
    # A number per position (a projection of its embedding in float64): equal embeddings, equal numbers; the
    # groups found on the numbers are checked on the embeddings themselves below.
    direction = torch.linspace(1.0, 2.0, emb.shape[-1], dtype=torch.float64, device=emb.device)
    numbers = emb[:, :shortest].detach().double() @ direction
    common = (numbers[:, None] == numbers[None]).long().cumprod(-1).sum(-1)  # (b, b) common prefix lengths
    rows = torch.arange(b, device=emb.device)
    best = (0, 0, rows)
    for length in common.unique().tolist():  # the saving only changes where two rows part
        leader = (common >= length).long().argmax(1)  # each row's first row with the same `length` prefix
        saved = (b - int((leader == rows).sum())) * length
        if saved > best[0]:
            best = (saved, length, leader)
    saved, length, leader = best
    if saved < MIN_SHARED_POSITIONS:
        return None
    if not torch.equal(emb[leader, :length], emb[:, :length]):
        return None
    first = rows[leader == rows]
    return length, torch.searchsorted(first, leader), first


class MedPLIB(nn.Module):
    def __init__(
        self,
        cfg: MedPLIBConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        llm_config: LlamaConfig | None = None,
        vision_config: CLIPVisionConfig | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.llm.tokenizer)
        self.ids = SpecialIds.of(self.tokenizer)
        self.llm = _build_llm(cfg, llm_config)
        rows = len(self.tokenizer)
        if cfg.llm.vocab_size is not None:
            if cfg.llm.vocab_size < rows:
                raise ValueError(
                    f"llm.vocab_size {cfg.llm.vocab_size} is smaller than the tokenizer ({rows} tokens)"
                )
            rows = cfg.llm.vocab_size
        base_rows = self.llm.get_input_embeddings().weight.shape[0]
        self.llm.resize_token_embeddings(rows, mean_resizing=False)
        if cfg.llm.weights and rows > base_rows:
            _init_added_rows(self.llm.get_input_embeddings().weight, base_rows)
        self.llm.config.pad_token_id = self.ids.pad
        hidden = self.llm.config.hidden_size
        self.sam = SAM(cfg.sam)
        if cfg.sam.weights:
            from medplib.model.weights import load_sam_checkpoint

            load_sam_checkpoint(self.sam, cfg.sam.weights)
        self.sam.image_encoder.requires_grad_(False)
        self.sam.prompt_encoder.requires_grad_(False)
        self.vision_tower = build_vision_tower(cfg, self.sam.image_encoder, vision_config)
        self.vision_tower.requires_grad_(False)
        vdim = self.vision_tower.hidden_size
        self.mm_projector = build_projector(cfg.projector, vdim, hidden)
        self.projector_source = self._load_projector()
        # Region features are pooled from pre-projector patch features (upstream: Linear(1024, 4096)).
        self.region_fea_adapter = nn.Linear(vdim, hidden)
        if cfg.region.position:
            # Extra input columns for the pooled positional encoding, at zero: the untrained model is the one
            # built without them (same weights, same random draws), and training decides what position adds.
            adapter = torch.nn.utils.skip_init(nn.Linear, vdim + cfg.sam.prompt_embed_dim, hidden)
            with torch.no_grad():
                adapter.weight.zero_()
                adapter.weight[:, :vdim] = self.region_fea_adapter.weight
                adapter.bias.copy_(self.region_fea_adapter.bias)
            self.region_fea_adapter = adapter
        # False when only the top layers train (`prepare_trainable`): the token embeddings then pass no gradient,
        # so the backward pass stops at the lowest adapted layer even while added-token rows train.
        self.input_token_grad = True
        box = cfg.sam.seg_prompt == "box"
        prompt_dim = cfg.sam.prompt_embed_dim
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4 * box + prompt_dim), nn.Dropout(0.0)
        )
        if box:
            # Start at the whole-image box plus a zero token whatever the hidden state: LiteMedSAM answers that
            # with a real mask (a single token alone gives an empty one), so the mask losses have a gradient from
            # the first step; the extra token (no effect at zero: Dice 0.502 vs 0.498 with tight boxes) is where
            # the trained head can say what a box cannot (grey vs white matter inside the same brain box).
            nn.init.zeros_(self.text_hidden_fcs[2].weight)
            with torch.no_grad():
                self.text_hidden_fcs[2].bias.zero_()
                self.text_hidden_fcs[2].bias[:4] = torch.logit(torch.tensor(WHOLE_IMAGE_BOX))
        if cfg.moe.enabled:
            self.enable_moe()
        self.to(DTYPES[cfg.dtype])

    def _load_projector(self) -> str | None:
        """Where the projector's trained weights came from; None when it starts at random init."""
        from medplib.model.weights import load_projector

        cfg = self.cfg
        if cfg.projector_weights:
            if not load_projector(self.mm_projector, resolve_weights(cfg.projector_weights)):
                raise ValueError(f"projector_weights: {cfg.projector_weights} holds no mm_projector tensors")
            return cfg.projector_weights
        base = cfg.llm.weights
        if (
            base
            and not base.startswith("pkg:")
            and Path(base).is_dir()
            and load_projector(self.mm_projector, base)
        ):
            return base
        return None

    # ------------------------------------------------------------------ structure

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.llm.get_decoder().layers

    @property
    def moe_ffns(self) -> list[MoEFeedForward]:
        """The decoder layers' MoE FFNs (`convert_to_moe` puts them at `layer.mlp`), in layer order. Read at every
        forward: a walk of the whole module tree cost ~1 ms of a 25-ms `tiny` step."""
        return [layer.mlp for layer in self.decoder_layers if isinstance(layer.mlp, MoEFeedForward)]

    def enable_moe(self) -> list[int]:
        """Turn the chosen layers' FFNs into MoE FFNs whose experts start as copies of the FFN (see
        `moe.init_experts_from_stages` for the stage-3 initialisation from two trained models)."""
        self.cfg = self.cfg.model_copy(update={"moe": self.cfg.moe.model_copy(update={"enabled": True})})
        return convert_to_moe(self.decoder_layers, self.llm.config.hidden_size, self.cfg.moe)

    @property
    def device(self) -> torch.device:
        return (
            self.mm_projector[0].weight.device
            if isinstance(self.mm_projector, nn.Sequential)
            else (self.mm_projector.weight.device)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.region_fea_adapter.weight.dtype

    # ------------------------------------------------------------------ inputs

    def embed(self, batch: dict) -> torch.Tensor:
        """Token embeddings with image and region features written into their placeholder positions."""
        ids = batch["input_ids"].to(self.device)
        emb = self.llm.get_input_embeddings()(ids)
        if not self.input_token_grad:
            emb = emb.detach()
        has_image = batch["has_image"]
        if not has_image.any():
            return emb
        if self.cfg.vision.kind == "sam_encoder":
            feats = self.vision_tower.pool(
                self.sam_embeddings(batch, torch.nonzero(has_image).flatten().tolist())
            )
        else:
            with torch.no_grad():
                feats = self.vision_tower(batch["pixel_values"][has_image].to(self.device, self.dtype))
        image_pos = ids == self.ids.image
        projected = self.mm_projector(feats.to(self.dtype))
        if int(image_pos.sum()) != projected.shape[0] * projected.shape[1]:
            raise ValueError(
                f"{int(image_pos.sum())} image placeholder tokens for {projected.shape[0]} images of "
                f"{projected.shape[1]} tokens: inputs were not built by medplib.data.batch.encode_sample"
            )
        emb = emb.masked_scatter(image_pos[..., None], projected.to(emb.dtype))
        region_feats = self._region_features(batch, feats)
        if region_feats is not None:
            region_pos = ids == self.ids.region_feature
            if int(region_pos.sum()) != region_feats.shape[0]:
                raise ValueError(
                    f"{int(region_pos.sum())} region tokens but {region_feats.shape[0]} region masks"
                )
            emb = emb.masked_scatter(region_pos[..., None], region_feats.to(emb.dtype))
        return emb

    def _region_features(self, batch: dict, feats: torch.Tensor) -> torch.Tensor | None:
        image_row = torch.cumsum(batch["has_image"].long(), 0) - 1
        pooled = []
        grid, rc = self.cfg.vision.grid, self.cfg.region
        # (grid*grid, C) encodings of the vision cells' centres, in the cells' row-major order
        cell_pe = self.sam.prompt_encoder.pe_layer.grid(grid).flatten(1).T if rc.position else None
        for row, masks in enumerate(batch["region_masks"]):
            for mask in masks:
                cells = region_cells(mask, grid, rc.min_cell_coverage, rc.max_sample_points).to(self.device)
                feature = feats[image_row[row]].index_select(0, cells).mean(0)
                if cell_pe is not None:
                    feature = torch.cat([feature, cell_pe.index_select(0, cells).mean(0).to(feature.dtype)])
                pooled.append(feature)
        if not pooled:
            return None
        # The adapter is linear, so adapting the mean equals averaging adapted features (and is cheaper).
        return self.region_fea_adapter(torch.stack(pooled).to(self.dtype))

    # ------------------------------------------------------------------ training forward

    def forward(
        self, batch: dict, loss_weights: LossWeights | None = None, all_logits: bool = False
    ) -> dict[str, torch.Tensor]:
        """Losses of a batch (`loss` is their weighted sum) and its teacher-forced masks (`segmentation`).
        `all_logits` also returns the vocabulary logits of every position (`logits`); training needs only the
        supervised positions' and computes no others."""
        w = loss_weights or LossWeights()
        kind = self.cfg.llm.attention
        # `eager` is there for the backward pass on a CPU. A pass without gradients (the evaluation's
        # teacher-forced masks) takes the fused kernel: 16.6 against 39.7 ms a layer for 16 rows of 160 tokens
        # (SmolLM2's heads, bf16, 1 thread, 2026-11-30).
        self._use_attention("sdpa" if kind == "eager" and not torch.is_grad_enabled() else kind)
        ids = batch["input_ids"].to(self.device)
        am = batch["attention_mask"].to(self.device)
        emb = self.embed(batch)
        decoder = self.llm.get_decoder()
        p, shared, cache, prefix = self._run_shared_prefix(emb, am, losses=True)
        if cache is None:
            hidden = decoder(inputs_embeds=emb, attention_mask=am, use_cache=False).last_hidden_state
        else:
            rest = decoder(
                inputs_embeds=emb[:, p:], attention_mask=am, use_cache=True, **{_CACHE_KW: cache}
            ).last_hidden_state
            hidden = torch.cat([prefix, rest], dim=1)
        head = self.llm.get_output_embeddings()
        out: dict[str, torch.Tensor] = {"ce": next_token_ce(hidden, batch["labels"].to(self.device), head)}
        out["shared_tokens"] = torch.tensor(shared)
        zero = out["ce"] * 0.0
        out.update(self._grounding_losses(batch, ids, hidden) or dict.fromkeys(GROUNDING_TERMS, zero))
        moe = self.moe_ffns
        aux = [m.aux_loss for m in moe if m.aux_loss is not None]
        out["moe_aux"] = torch.stack(aux).sum() if aux else zero
        route = self._routing_loss(batch, ids, moe)
        out["moe_route"] = zero if route is None else route
        out["loss"] = (
            w.ce * out["ce"]
            + w.bce * out["bce"]
            + w.dice * out["dice"]
            + w.focal * out["focal"]
            + w.iou * out["iou"]
            + w.box * out["box"]
            + w.moe_aux * out["moe_aux"]
            + w.moe_route * out["moe_route"]
        )
        if all_logits:
            out["logits"] = head(hidden)
        return out

    def _run_shared_prefix(
        self, emb: torch.Tensor, attention_mask: torch.Tensor, losses: bool
    ) -> tuple[int, int, DynamicCache | None, torch.Tensor | None]:
        """Runs each distinct prefix the rows open with (`shared_prefixes`) once: its length L, the positions
        not run, the KV cache of each row's prefix (the rest of the rows runs on it; autograd sums the rows'
        gradients back into their prefix) and each row's prefix hidden states; (0, 0, None, None) when not
        worth it. Not with gradient checkpointing (its layers drop the cache), nor with MoE layers where the
        pass makes `losses` (the routing losses read each router's outputs of its last call) or where they drop
        tokens (an expert's capacity counts the tokens of a call)."""
        moe = self.moe_ffns
        # The decoder's own flag, which `gradient_checkpointing_enable` sets: the model's
        # `is_gradient_checkpointing` walks every module and warns that it is deprecated, at every call.
        checkpointing = getattr(self.llm.get_decoder(), "gradient_checkpointing", False)
        if (moe and losses) or any(m.cfg.drop_tokens for m in moe) or checkpointing:
            return 0, 0, None, None
        shared = shared_prefixes(emb, attention_mask)
        if shared is None:
            return 0, 0, None, None
        length, group, first = shared
        cache = DynamicCache()
        prefix = self.llm.get_decoder()(
            inputs_embeds=emb[first, :length],
            attention_mask=attention_mask[first, :length],
            use_cache=True,
            **{_CACHE_KW: cache},
        ).last_hidden_state
        cache.batch_select_indices(group)
        return length, (len(group) - len(first)) * length, cache, prefix[group]

    def _routing_loss(self, batch: dict, ids: torch.Tensor, moe: list) -> torch.Tensor | None:
        """`LossWeights.moe_route`'s term; None without MoE layers or `moe.expert_of`.

        Targets: every token of a grounding row to the grounding expert; the tokens after the image (the question
        and the answer: where a task shows) of any other row to the vl expert. The tokens up to the image are
        alike in every task (the system prompt is identical), so another row's are left to the router. Each
        group is averaged apart: a grounding row's image tokens (64 on `small` then) would outweigh its text,
        and then the router learnt "image to the grounding expert, text to the vl expert" and moved grounding
        answers, `<SEG>` included, to the vl expert (2026-11-29)."""
        expert_of = self.cfg.moe.expert_of
        layers = [m for m in moe if m.router_logp is not None]
        if not layers or set(expert_of) != {"grounding", "vl"}:
            return None
        grounding = (ids == self.ids.seg).any(dim=1, keepdim=True)
        valid = batch["attention_mask"].to(self.device).bool()
        image = ids == self.ids.image
        after_image = valid & (image.long().cumsum(1) == image.sum(1, keepdim=True)) & ~image
        groups = [
            ((grounding & valid & ~after_image).flatten(), expert_of["grounding"]),
            ((grounding & after_image).flatten(), expert_of["grounding"]),
            ((~grounding & after_image).flatten(), expert_of["vl"]),
        ]
        terms = [
            -m.router_logp[tokens, expert].mean()
            for tokens, expert in groups
            if bool(tokens.any())
            for m in layers
        ]
        return torch.stack(terms).mean() if terms else None

    def _use_attention(self, kind: str) -> None:
        # Transformers reads the kernel from the config at every call: switching costs ~0.3 ms.
        if self.llm.config._attn_implementation != kind:
            self.llm.set_attn_implementation(kind)

    def _grounding_losses(self, batch: dict, ids: torch.Tensor, hidden: torch.Tensor) -> dict | None:
        # The hidden state at p predicts the token at p+1; the one predicting `<SEG>` prompts the decoder.
        rows, positions, targets = [], [], []
        for row in range(ids.shape[0]):
            seg_at = torch.nonzero(ids[row, 1:] == self.ids.seg).flatten().tolist()
            row_targets = batch["target_masks"][row]
            for p, target in zip(seg_at, row_targets, strict=False):
                rows.append(row)
                positions.append(p)
                targets.append(target)
        if not rows:
            return None
        seg = self.segment(batch, rows, hidden[rows, positions])
        losses = mask_losses(seg.logits, list(seg.iou), targets)
        losses["box"] = box_loss(seg.boxes, targets) if seg.boxes is not None else losses["bce"] * 0.0
        # Teacher-forced masks (the ground-truth answer's `<SEG>` positions), for in-training validation.
        seg.rows = rows
        losses["segmentation"] = seg
        return losses

    def sam_embeddings(self, batch: dict, rows: list[int]) -> torch.Tensor:
        """The frozen SAM image embeddings (len(rows), C, e, e) of batch rows. Each row's is computed at most once
        per batch and kept in `batch["sam_embeddings"]` ({row: tensor}), where a per-image cache may also have
        put it before (`collate` does, from `Encoded.sam_embedding`)."""
        known = batch.setdefault("sam_embeddings", {})
        missing = sorted({r for r in rows if r not in known})
        if missing:
            with torch.no_grad():
                pixels = batch["sam_pixel_values"][missing].to(self.device, self.dtype)
                for r, e in zip(missing, self.sam.image_encoder(pixels), strict=True):
                    known[r] = e
        return torch.stack([known[r].to(self.device) for r in rows])

    def seg_prompts(
        self, hidden: torch.Tensor, geometries: list[Geometry]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`<SEG>` hidden states (N, H) -> sparse prompts (N, K, C) for the mask decoder: one token, or with
        `seg_prompt: box` the two corner tokens of the regressed box and a free token; plus the boxes (N, 4) as
        fractions of each image (x0, y0, x1, y1)."""
        out = self.text_hidden_fcs(hidden.to(self.dtype))
        if self.cfg.sam.seg_prompt == "token":
            return out[:, None], None
        out, token = out[:, :4], out[:, 4:]
        frac = torch.sigmoid(out.float())
        # Corners in either order are one box; SAM's prompt encoder expects (top-left, bottom-right).
        x0, x1 = torch.minimum(frac[:, 0], frac[:, 2]), torch.maximum(frac[:, 0], frac[:, 2])
        y0, y1 = torch.minimum(frac[:, 1], frac[:, 3]), torch.maximum(frac[:, 1], frac[:, 3])
        boxes = torch.stack([x0, y0, x1, y1], dim=1)
        # Fractions of the image -> pixels of the SAM view the image was resized and padded into.
        scale = torch.tensor(
            [[g.resized_w, g.resized_h, g.resized_w, g.resized_h] for g in geometries],
            dtype=boxes.dtype,
            device=boxes.device,
        )
        offset = torch.tensor(
            [[g.pad_left, g.pad_top, g.pad_left, g.pad_top] for g in geometries],
            dtype=boxes.dtype,
            device=boxes.device,
        )
        corners = self.sam.prompt_encoder.embed_boxes(boxes * scale + offset)
        return torch.cat([corners, token[:, None].to(corners.dtype)], dim=1), boxes

    def segment(self, batch: dict, rows: list[int], hidden: torch.Tensor) -> Segmentation:
        """Masks at original size for `<SEG>` hidden state k on the image of batch row `rows[k]`."""
        geos = [Geometry.from_tensor(batch["sam_geometry"][r]) for r in rows]
        unique = sorted(set(rows))
        emb = self.sam_embeddings(batch, unique)
        index = torch.tensor([unique.index(r) for r in rows], device=self.device)
        sparse, boxes = self.seg_prompts(hidden, geos)
        # Without a graph to keep, `MASKS_PER_DECODE` masks a decoder call; with one (training) all in one call.
        step = max(len(rows), 1) if torch.is_grad_enabled() else MASKS_PER_DECODE
        parts = [
            self.sam.decode(
                emb.index_select(0, index[s : s + step]).to(self.dtype), sparse[s : s + step].to(self.dtype)
            )
            for s in range(0, len(rows), step)
        ]
        low_res, iou = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        masks = [unpad_mask_logits(low_res[k], geo) for k, geo in enumerate(geos)]
        return Segmentation(masks, iou, boxes)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        batch: dict,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        segment: bool = False,
        masks: bool = True,
        generator: torch.Generator | None = None,
        on_step: Callable[[list[int | None]], Iterable[int] | None] | None = None,
        answers: Sequence[Sequence[int] | None] | None = None,
    ) -> list[Generation]:
        """Greedy (temperature 0) or sampled decoding with a KV cache, then one mask per generated `<SEG>`.

        `batch` holds right-padded prompts (from `collate`); they are left-aligned here so every row's next
        token sits at the last position. With `segment=True` a row whose answer has no `<SEG>` is grounded
        from the hidden state that produced its last token (upstream eval's fallback); `masks=False` decodes no
        mask at all (a caller that uses the text only: the mask decoder costs ~80 ms a `<SEG>` on CPU, and a
        model that babbles `<SEG>` emits dozens per answer). `on_step`, when given, is
        called after every decoding step with each row's new token (None for a finished row) and may return rows
        to finish there (a stop sequence): the hook streaming and `stop` use.

        `answers` gives rows a ground-truth answer (token ids up to its end of turn; None for a row without one).
        Each is also teacher-forced after its prompt, on the prompt's own KV cache, and the masks of its `<SEG>`s
        come back in `forced_mask_logits` / `forced_mask_scores` (with any `masks`): the evaluation's teacher-forced
        masks without a second pass over the prompt. A row that generated exactly its answer was conditioned as
        teacher forcing conditions it, so its own masks are those.
        """
        # With a KV cache `eager` expands the grouped KV heads again at every step: decoding was 30% slower; the
        # fused kernel is slow on a step's single query (`medplib.model.attention`).
        self._use_attention(GENERATION_ATTENTION)
        am = batch["attention_mask"].to(self.device)
        emb = self.embed(batch)
        p, _, cache, _ = self._run_shared_prefix(emb, am, losses=False)
        cache = cache if cache is not None else DynamicCache()
        # Right padding -> left padding after the shared prefix: roll the rest of each row so that its last prompt
        # token is at the end (the padding then sits between the prefix and the row's own tokens, masked out).
        shifts = (am.shape[1] - am.sum(1)).tolist()

        def roll(t: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.roll(row, s, dims=0) for row, s in zip(t, shifts, strict=True)])

        emb = roll(emb[:, p:])
        am = torch.cat([am[:, :p], roll(am[:, p:])], dim=1)
        positions = (am.cumsum(1) - 1).clamp_min(0)
        decoder, head = self.llm.get_decoder(), self.llm.get_output_embeddings()
        b = emb.shape[0]
        tokens: list[list[int]] = [[] for _ in range(b)]
        seg_hidden: list[list[torch.Tensor]] = [[] for _ in range(b)]
        last_hidden: list[torch.Tensor | None] = [None] * b
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        decoding = torch.arange(b, device=self.device)  # the input row of each row of the batch
        step_emb, step_pos = emb, positions[:, p:]
        forced_hidden: list[list[torch.Tensor]] = [[] for _ in range(b)]
        for step_number in range(max_new_tokens):
            h = decoder(
                inputs_embeds=step_emb,
                attention_mask=am,
                position_ids=step_pos,
                use_cache=True,
                **{_CACHE_KW: cache},
            ).last_hidden_state[:, -1]
            if step_number == 0 and answers is not None:
                forced_hidden = self._forced_seg_hidden(cache, am, positions, h, answers)
            logits = head(h).float()
            nxt = self._pick(logits, temperature, top_p, generator)
            step: list[int | None] = [None] * b
            for k, i in enumerate(decoding.tolist()):
                if done[i]:
                    continue
                t = int(nxt[k])
                last_hidden[i] = h[k]
                if t == self.ids.eos:
                    done[i] = True
                    continue
                tokens[i].append(t)
                step[i] = t
                if t == self.ids.seg:
                    seg_hidden[i].append(h[k])
            for i in (on_step(step) or []) if on_step is not None else []:
                done[i] = True
            if bool(done.all()):
                break
            live = ~done[decoding]
            if 2 * int(live.sum()) <= len(decoding):
                # Half the rows have finished: drop them from the batch. One babbled 112-token answer had kept
                # 31 finished rows decoding pad for ~100 steps (123 ms a step at 32 rows on 2 CPU threads).
                keep = live.nonzero().flatten()
                cache.batch_select_indices(keep)
                decoding, nxt, am, live = decoding[keep], nxt[keep], am[keep], live[keep]
                step_pos = step_pos[keep]
            nxt = torch.where(live, nxt, torch.full_like(nxt, self.ids.pad))
            step_emb = self.llm.get_input_embeddings()(nxt)[:, None]
            am = torch.cat([am, live.long()[:, None]], dim=1)
            step_pos = step_pos[:, -1:] + 1
        results = [Generation(t, self.tokenizer.decode(t, skip_special_tokens=False)) for t in tokens]
        # One mask decoder call for every mask asked for: (row, teacher-forced?) per hidden state.
        rows: list[tuple[int, bool]] = []
        hiddens: list[torch.Tensor] = []
        for i in range(b) if masks else ():
            if not seg_hidden[i] and segment and last_hidden[i] is not None:
                seg_hidden[i].append(last_hidden[i])
            rows += [(i, False)] * len(seg_hidden[i])
            hiddens += seg_hidden[i]
        reused = [bool(masks and forced_hidden[i] and tokens[i] == list(answers[i] or ())) for i in range(b)]
        for i in range(b):
            if not reused[i]:
                rows += [(i, True)] * len(forced_hidden[i])
                hiddens += forced_hidden[i]
        image_rows = [r for r, _ in rows]
        if rows and batch["has_image"][image_rows].all():
            seg = self.segment(batch, image_rows, torch.stack(hiddens))
            for k, (r, forced) in enumerate(rows):
                out = results[r]
                (out.forced_mask_logits if forced else out.mask_logits).append(seg.logits[k].float().cpu())
                (out.forced_mask_scores if forced else out.mask_scores).append(float(seg.iou[k]))
        for out, reuse in zip(results, reused, strict=True):
            if reuse:
                out.forced_mask_logits, out.forced_mask_scores = list(out.mask_logits), list(out.mask_scores)
        return results

    def _forced_seg_hidden(
        self,
        cache: DynamicCache,
        am: torch.Tensor,
        positions: torch.Tensor,
        last_hidden: torch.Tensor,
        answers: Sequence[Sequence[int] | None],
    ) -> list[list[torch.Tensor]]:
        """Per row, the hidden states that predict each `<SEG>` of its answer when the answer follows the prompt:
        the prompt's last one (`last_hidden`) for an answer that opens with `<SEG>`, else the one of the answer
        token before, from the answer's tokens up to its last `<SEG>` run on the prompt's KV cache (left-aligned
        prompts: `am`, `positions`), which is then cropped back to the prompt."""
        seg_at = [[j for j, t in enumerate(a or ()) if t == self.ids.seg] for a in answers]
        fed = [max(js, default=0) for js in seg_at]  # answer tokens to run: those before the last <SEG>
        width = max(fed, default=0)
        hidden = None
        if width:
            ids = torch.full((len(answers), width), self.ids.pad, dtype=torch.long)
            for i, n in enumerate(fed):
                ids[i, :n] = torch.tensor(list(answers[i] or ())[:n], dtype=torch.long)
            if bool(((ids == self.ids.image) | (ids == self.ids.region_feature)).any()):
                raise ValueError("a teacher-forced answer holds an image or region placeholder token")
            ran = (torch.arange(width)[None] < torch.tensor(fed)[:, None]).to(self.device, am.dtype)
            hidden = self.llm.get_decoder()(
                inputs_embeds=self.llm.get_input_embeddings()(ids.to(self.device)),
                attention_mask=torch.cat([am, ran], dim=1),
                position_ids=positions[:, -1:] + 1 + torch.arange(width, device=self.device),
                use_cache=True,
                **{_CACHE_KW: cache},
            ).last_hidden_state
            cache.crop(-width)
        return [[last_hidden[i] if j == 0 else hidden[i, j - 1] for j in js] for i, js in enumerate(seg_at)]

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
        if temperature <= 1e-5:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def binarize(self, mask_logits: torch.Tensor) -> np.ndarray:
        return (torch.sigmoid(mask_logits) > self.cfg.sam.mask_threshold).cpu().numpy()

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = export.MAX_SHARD_BYTES) -> Path:
        """`config.json` + safetensors weights (sharded above `max_shard_bytes`) + `llm_config.json` +
        `vision_config.json` (CLIP towers) + `tokenizer/` with the training chat template (`export.py`)."""
        from medplib.model.lora import is_lora

        if is_lora(self):
            raise ValueError(
                "the model still has unmerged LoRA adapters: call medplib.model.lora.merge_lora first"
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        export.write_config(self.cfg, path / "config.json")
        (path / "llm_config.json").write_text(self.llm.config.to_json_string())
        if hasattr(self.vision_tower, "clip"):
            (path / "vision_config.json").write_text(self.vision_tower.clip.config.to_json_string())
        export.save_tokenizer(self.tokenizer, self.cfg, path / "tokenizer")
        export.save_weights(self, path, max_shard_bytes)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | None = None) -> MedPLIB:
        """Load a directory written by `save_pretrained` (safetensors only; nothing is unpickled)."""
        path = Path(path)
        if not export.is_model_dir(path):
            raise FileNotFoundError(
                f"{path} is not a MedPLIB model directory (config.json + model.safetensors or its shard index)"
            )
        cfg = export.read_config(path / "config.json")
        # The weights file holds every component, so build each at random init instead of from its source.
        cfg = cfg.model_copy(
            update={
                "llm": cfg.llm.model_copy(update={"weights": None}),
                "vision": cfg.vision.model_copy(update={"weights": None}),
                "sam": cfg.sam.model_copy(update={"weights": None}),
                "projector_weights": None,
            }
        )
        if dtype:
            cfg = cfg.model_copy(update={"dtype": dtype})
        # Without the random init that the file overwrites (1.0-1.3 s of a 1.5-2.1 s load of `small`):
        # `load_weights` raises if any parameter or persistent buffer is not in the file, so nothing is left
        # uninitialised. The few draws left (buffers, added rows) happen on a forked generator, so loading a
        # model leaves torch's random state as it found it.
        with no_init_weights(), torch.random.fork_rng(devices=[]):
            model = cls(
                cfg,
                AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True),
                llm_config=LlamaConfig.from_json_file(path / "llm_config.json"),
                vision_config=CLIPVisionConfig.from_json_file(path / "vision_config.json")
                if (path / "vision_config.json").exists()
                else None,
            )
        export.load_weights(model, path)
        return model.to(DTYPES[cfg.dtype])
