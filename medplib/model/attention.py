"""The LLM's attention while it generates: PyTorch's fused kernel for the prompt, plain matrix products for each
decoding step.

One query against a short KV cache is where the fused CPU kernel is slow: SmolLM2's shapes (9 query heads on 3
KV heads, head size 64, batch 5, 200 cached tokens, bf16, 1 thread, 2026-11-30) took 0.91 ms a layer in
`scaled_dot_product_attention` (with or without grouped heads) against 0.20 ms as two matrix products and a
softmax in fp32, whose error against an fp32 reference is the fused kernel's or less (max 0.0010 vs 0.0012). A
30-layer model pays it at every token. The prompt's pass (many queries) stays on the fused kernel, 1.6-2.4x
faster there than the same products.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

GENERATION_ATTENTION = "medplib_generation"


def generation_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention signature: query (b, heads, q, d), key/value (b, kv_heads, kv, d), the mask
    `sdpa_mask` makes (boolean (b, 1, q, kv), True attends) or None; returns (b, q, heads, d). Generation runs
    in eval mode, so there is no dropout to apply."""
    b, heads, q_len, d = query.shape
    if q_len != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    kv_heads, kv_len = key.shape[1], key.shape[2]
    with torch.autocast(query.device.type, enabled=False):
        # Each query head of a group against its shared KV head, without copying the KV heads per group.
        grouped = query.float().view(b, kv_heads, heads // kv_heads, d)
        scores = grouped @ key.float().transpose(-1, -2) * (d**-0.5 if scaling is None else scaling)
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.view(b, 1, 1, kv_len), float("-inf"))
        out = torch.softmax(scores, dim=-1) @ value.float()
    return out.to(value.dtype).view(b, heads, 1, d).transpose(1, 2), None


AttentionInterface.register(GENERATION_ATTENTION, generation_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(GENERATION_ATTENTION, sdpa_mask)
