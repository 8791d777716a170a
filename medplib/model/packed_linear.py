"""Linear layers whose bf16 inference on a CPU reads a weight packed once for oneDNN.

Under bf16 autocast every `nn.Linear` call hands oneDNN a plain bf16 weight, which it reorders into its blocked
layout again on each call; at a decoding step's few rows that reorder is a large share of the product. A weight
packed once (`torch.ops.mkldnn._reorder_linear_weight`, what `torch.compile` freezes CPU linears into) gives the
same products bit for bit. SmolLM2-135M (`small`), a decoding step at 16 rows on 1 thread, 2026-12-01: 85.0 ->
64.2 ms; at 4 rows 55.7 -> 39.4 ms; on 2 threads at 16 rows 65.0 -> 50.9 ms; the prompt's pass 2-11% faster; every
token the same.
"""

from __future__ import annotations

import torch
from torch import nn

from medplib.cpu import has_bf16_kernels

# The row count oneDNN packs for: a hint only (any row count reads the packed weight, with the same results).
_ROWS_HINT = 16


class PackedLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) that, when called on a CPU tensor under bf16 autocast
    with no gradient to record, multiplies by a packed bf16 copy of its weight (made on first use, made again
    when the weight changes); every other call is `nn.Linear`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            torch.is_grad_enabled()
            or x.device.type != "cpu"
            or not torch.is_autocast_enabled("cpu")
            or torch.get_autocast_dtype("cpu") != torch.bfloat16
        ):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        # A tensor and its in-place version name its values: a copy_ into it (load_state_dict, an optimiser
        # step) or a new parameter makes the packed copy stale.
        versions = [(t, t._version) for t in (weight, bias) if t is not None]
        if self._packed is None or not _same(self._packed[0], versions):
            self._packed = (
                versions,
                torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), _ROWS_HINT),
                None if bias is None else bias.detach().to(torch.bfloat16),
            )
        _, packed_weight, packed_bias = self._packed
        flat = x.to(torch.bfloat16).reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, packed_weight, packed_bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])

    _packed: tuple | None = None  # ([(tensor, version)], packed weight, bf16 bias), made on first use

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
    and state dict stay); returns how many. A no-op on CPUs without oneDNN bf16 kernels."""
    if not has_bf16_kernels():
        return 0
    count = 0
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = PackedLinear
            count += 1
    return count
