"""Model FLOPs of a training step and the matmul peak they are set against (MFU).

Counted for what the step runs, not for a dense 6N: the vocabulary projection only at supervised positions
(`medplib.model.losses.next_token_ce`), the backward pass only down to the lowest decoder layer that has a
trainable parameter below it (LoRA on the top layers of a grounding stage stops autograd there), and the frozen
image encoders by their own forward FLOPs (counted once on meta tensors), the SAM encoder only for images the
embedding cache did not hold. The denominator is a matmul peak measured on the worker in the training dtype, not
a datasheet number, so MFU on a shared CPU says how well the step uses what the worker actually gets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# torch is imported where it is used: the CLI imports this module on the driver, where --help should stay fast.


def forward_flops(module: Any, *shapes: tuple[int, ...]) -> float:
    """FLOPs of one forward pass of `module` on zero-cost meta inputs of these shapes (torch's FLOP counter)."""
    import torch
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    state = {
        k: torch.empty_like(v, device="meta")
        for k, v in [*module.named_parameters(), *module.named_buffers()]
    }
    # In the module's dtype: a bf16 model (DeepSpeed's bf16 engine on a GPU) rejects fp32 inputs.
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    inputs = tuple(torch.empty(s, device="meta", dtype=dtype) for s in shapes)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        functional_call(module, state, inputs)
    return float(counter.get_total_flops())


@dataclass
class FlopsModel:
    """Per-step model FLOPs of a `MedPLIB` in its training set-up (call `of` after `prepare_trainable`).

    Per token: forward 2 * (matmul weights it passes: attention, the top-k active experts, LoRA), backward input
    gradients 2 * those of the layers the backward reaches, weight gradients 2 * the trainable ones; attention
    scores 4 * d * T per token and layer forward, twice that backward where the backward runs. The vocabulary
    projection: 2 * V * d forward and as much backward per supervised position. The mask decoder is left out
    (<1% at every preset)."""

    layer_weights: list[float]  # per decoder layer, matmul weights a token passes (experts by top_k / E)
    layer_trainable: list[float]
    head_weights: float  # vocabulary projection
    head_trainable: float
    hidden: int
    backward_floor: int  # lowest decoder layer the backward pass reaches (the layer count: none)
    tower_flops: float  # vision tower forward per image row (0 when it pools the SAM embedding)
    sam_flops: float  # SAM image encoder forward per encoded image

    @classmethod
    def of(cls, model) -> FlopsModel:
        from torch import nn

        from medplib.model.moe import MoEFeedForward

        share: dict[int, float] = {}
        for moe in (m for m in model.llm.modules() if isinstance(m, MoEFeedForward)):
            for p in moe.experts.parameters():
                share[id(p)] = moe.cfg.top_k / len(moe.experts)

        def weights(module: Any, trainable: bool) -> float:
            return sum(
                m.weight.numel() * share.get(id(m.weight), 1.0)
                for m in module.modules()
                if isinstance(m, nn.Linear) and (m.weight.requires_grad or not trainable)
            )

        layers = list(model.decoder_layers)
        trains = [any(p.requires_grad for p in layer.parameters()) for layer in layers]
        # Anything trained below the decoder (projector, region adapter, input embeddings that pass their gradient)
        # needs the backward through every layer.
        below = [model.mm_projector, model.region_fea_adapter]
        below_trains = any(p.requires_grad for m in below for p in m.parameters()) or (
            model.input_token_grad
            and any(p.requires_grad for p in model.llm.get_input_embeddings().parameters())
        )
        floor = 0 if below_trains else next((i for i, t in enumerate(trains) if t), len(layers))
        head = model.llm.get_output_embeddings()
        sam_px = model.cfg.sam.image_size_px
        tower = 0.0
        if model.cfg.vision.kind != "sam_encoder":
            px = model.cfg.vision.image_size_px
            tower = forward_flops(model.vision_tower, (1, 3, px, px))
        return cls(
            layer_weights=[weights(layer, False) for layer in layers],
            layer_trainable=[weights(layer, True) for layer in layers],
            head_weights=float(head.weight.numel()),
            head_trainable=float(head.weight.numel()) if head.weight.requires_grad else 0.0,
            hidden=model.llm.config.hidden_size,
            backward_floor=floor,
            tower_flops=tower,
            sam_flops=forward_flops(model.sam.image_encoder, (1, 3, sam_px, sam_px)),
        )

    def step_flops(
        self, seq_lens: list[int], supervised: int, image_rows: int, encoded_images: int, shared: int = 0
    ) -> float:
        """FLOPs of a step over sequences of these lengths with `supervised` predicted tokens, `image_rows` rows
        with an image and `encoded_images` images run through the SAM encoder (cache misses); `shared` positions
        did not run because another row ran the same prefix (`MedPLIB.forward`'s `shared_tokens`; their
        attention scores, under 1% of the step, are still counted)."""
        reached = self.layer_weights[self.backward_floor :]
        per_token = 2 * sum(self.layer_weights) + 2 * sum(reached) + 2 * sum(self.layer_trainable)
        layers, backward_layers = len(self.layer_weights), len(reached)
        attention = sum(4 * self.hidden * t * t * (layers + 2 * backward_layers) for t in seq_lens)
        head = supervised * (4 * self.head_weights + 2 * self.head_trainable)
        images = image_rows * self.tower_flops + encoded_images * self.sam_flops
        return (sum(seq_lens) - shared) * per_token + attention + head + images


def matmul_dtype(precision: str):
    """The dtype a stage's matmuls run in at `precision` (`resolve_precision`): the peak its MFU is set against."""
    import torch

    return torch.float32 if precision == "fp32" else torch.bfloat16


def measure_matmul_peak(device, dtype, n: int | None = None, reps: int = 6, trials: int = 5) -> float:
    """Achieved FLOP/s of a square matmul on this worker (the MFU denominator): the best of `trials` timings, as
    a worker measures it while Ray Data starts reading beside it (one timing there gave 145 GFLOP/s where the
    2 cores give ~800 in bf16, and MFU read above 1)."""
    import torch

    n = n or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2.0 * n**3 * reps / (time.perf_counter() - t0))
    return best
