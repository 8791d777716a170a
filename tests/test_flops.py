"""The FLOPs a training step is credited with (MFU): what the step runs, not a dense 6N."""

from __future__ import annotations

import torch

from medplib.model.config import LoraSettings
from medplib.model.lora import prepare_trainable
from workflows.train.flops import FlopsModel, forward_flops


def test_forward_flops_counts_a_linear_layer_on_meta_inputs():
    layer = torch.nn.Linear(16, 32)
    assert forward_flops(layer, (5, 16)) == 2 * 5 * 16 * 32
    assert layer.weight.device.type == "cpu"  # the module itself is untouched


def test_backward_stops_at_the_lowest_trained_layer(tiny_model):
    layers = len(tiny_model.decoder_layers)
    top = LoraSettings(target_modules=["gate_proj"], layers=1, new_token_rows=True)
    prepare_trainable(tiny_model, top, ["text_hidden_fcs"])
    f = FlopsModel.of(tiny_model)
    assert f.backward_floor == layers - 1
    assert sum(f.layer_trainable[:-1]) == 0 and f.layer_trainable[-1] > 0
    assert f.sam_flops > 0 and f.tower_flops > 0  # the tiny preset has a CLIP tower, counted on meta tensors

    # Something trained below the decoder: the backward runs through every layer.
    prepare_trainable(tiny_model, None, ["mm_projector"])
    assert FlopsModel.of(tiny_model).backward_floor == 0


def test_step_flops_grow_with_what_the_step_runs(tiny_model):
    prepare_trainable(tiny_model, LoraSettings(target_modules=["q_proj"]), [])
    f = FlopsModel.of(tiny_model)
    base = f.step_flops([20, 30], 5, 2, 0)
    assert f.step_flops([20, 30], 6, 2, 0) - base == 4 * f.head_weights + 2 * f.head_trainable
    assert f.step_flops([20, 30], 5, 2, 1) - base == f.sam_flops  # a cache miss runs the encoder
    assert f.step_flops([20, 31], 5, 2, 0) > base
    # Positions another row ran for them (a shared prompt) pass no layer.
    per_token = (
        2 * sum(f.layer_weights) + 2 * sum(f.layer_weights[f.backward_floor :]) + 2 * sum(f.layer_trainable)
    )
    assert base - f.step_flops([20, 30], 5, 2, 0, shared=7) == 7 * per_token
