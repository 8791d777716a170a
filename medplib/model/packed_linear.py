"""Linear layers whose inference on a CPU reads a weight packed once for oneDNN.

bf16: under bf16 autocast every `nn.Linear` call hands oneDNN a plain bf16 weight, which it reorders into its
blocked layout again on each call; at a decoding step's few rows that reorder is a large share of the product. A
weight packed once (`torch.ops.mkldnn._reorder_linear_weight`, what `torch.compile` freezes CPU linears into)
gives the same products bit for bit. SmolLM2-135M (`small`), a decoding step at 16 rows on 1 thread, 2026-12-01:
85.0 -> 64.2 ms; at 4 rows 55.7 -> 39.4 ms; on 2 threads at 16 rows 65.0 -> 50.9 ms; the prompt's pass 2-11%
faster; every token the same.

fp32 (a CPU without bf16 kernels runs everything in fp32): `nn.Linear` goes to MKL's sgemm, which on few rows is
slow and rounds each row differently with the row count. oneDNN on an fp32 weight packed once, on the AVX2-only
EPYC (Zen 1) at 2 threads, 2026-12-02: SmolLM2's LM head (576 -> 49,152) at 8 rows 46.5 -> 10.4 ms and at 1 row
11.8 -> 6.4 ms, its FFN projections at 8 rows 0.83 -> 0.30 ms, at a prompt's 800 rows 21.6 -> 19.2 ms; at 1 row
the small projections lose (0.45 -> 0.76 ms a layer), so products of fewer than `_FP32_MIN_OUTPUTS` outputs stay
with MKL. oneDNN's products agree with MKL's to float rounding (1e-4 on values ~30), and each row's is the same
bit for bit at any row count (MKL's change below 8 rows).
"""

from __future__ import annotations

import torch
from torch import nn

from medplib.cpu import has_bf16_kernels

# The row count oneDNN packs for: a hint only (any row count reads the packed weight, with the same results).
_ROWS_HINT = 16
# fp32 products of fewer outputs (rows x out_features) stay with MKL, which is faster there: a decoding step's
# 1-row projections, 8 rows of a 192-wide one (the crossing measured as in the module docstring).
_FP32_MIN_OUTPUTS = 4096


def packed_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a `PackedLinear` call multiplies in on a packed weight, None where it is `nn.Linear`'s call: a
    gradient to record, a tensor off the CPU, autocast to another dtype or on a CPU without bf16 kernels, fp32
    without autocast on anything but fp32 tensors, or an fp32 product of under `_FP32_MIN_OUTPUTS` outputs."""
    if torch.is_grad_enabled() or x.device.type != "cpu":
        return None
    if torch.is_autocast_enabled("cpu"):
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and has_bf16_kernels()
        return torch.bfloat16 if bf16 else None
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return None
    return torch.float32 if x.numel() // x.shape[-1] * weight.shape[0] >= _FP32_MIN_OUTPUTS else None


class PackedLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) that, when called on a CPU tensor with no gradient to
    record, multiplies by a packed copy of its weight (`packed_dtype`: bf16 under bf16 autocast, fp32 on fp32
    tensors without autocast; made on first use, made again when the weight changes); every other call is
    `nn.Linear`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = packed_dtype(x, self.weight)
        if dtype is None:
            return super().forward(x)
        weight, bias = self.weight, self.bias
        # A tensor and its in-place version name its values: a copy_ into it (load_state_dict, an optimiser
        # step) or a new parameter makes the packed copy stale.
        versions = [(t, t._version) for t in (weight, bias) if t is not None]
        if self._packed is None:
            self._packed = {}
        held = self._packed.get(dtype)
        if held is None or not _same(held[0], versions):
            held = self._packed[dtype] = (
                versions,
                torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), _ROWS_HINT),
                None if bias is None else bias.detach().to(dtype),
            )
        _, packed_weight, packed_bias = held
        flat = x.to(dtype).reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, packed_weight, packed_bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])

    _packed: dict | None = None  # {dtype: ([(tensor, version)], packed weight, bias in that dtype)}

    def __getstate__(self) -> dict:
        # A packed weight has no storage to copy or pickle (deepcopy, Ray): the copy packs its own.
        state = super().__getstate__()
        state.pop("_packed", None)
        return state


def _same(held: list, versions: list) -> bool:
    return len(held) == len(versions) and all(
        a is b and u == v for (a, u), (b, v) in zip(held, versions, strict=True)
    )


def pack_linears(module: nn.Module) -> int:
    """Make every plain `nn.Linear` in `module` a `PackedLinear`, in place (its class only: parameters, hooks
    and state dict stay); returns how many. A no-op where PyTorch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = PackedLinear
            count += 1
    return count
