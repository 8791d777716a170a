"""Top-k mixture of expert FFNs, in plain PyTorch (no DeepSpeed launcher, process group or port at inference).

Router: `router` = Linear(hidden, E, bias=False) in fp32 (initialised per `MoEConfig.router_init`), softmax,
top-k. At top-1 the output of a token is
`p_chosen * expert(x)` with the probability not renormalised (DeepSpeed TopKGate, which upstream used;
`gate_scale: straight_through` keeps the weight at 1 and only its gradient, `one` neither); at top-k > 1 the k probabilities
are renormalised to sum to 1. Capacity per expert is
`max(min_capacity, ceil(tokens * k / E * factor))`; when `drop_tokens` is on, the tokens an expert has no room for
(those with the lowest router probability) get zero FFN output, so only the residual carries them.
Aux loss (Switch/GShard): `E * sum_e mean_prob_e * fraction_routed_e`. Every token runs exactly its top-k experts:
the dispatch gathers each expert's tokens and scatters the results back. The router's log-probabilities of the last
forward stay on the layer (`router_logp`) for `MedPLIB.forward`'s routing loss (`LossWeights.moe_route`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from medplib.constants import SPECIAL_TOKENS
from medplib.model.config import MoEConfig


class MoEFeedForward(nn.Module):
    def __init__(self, experts: list[nn.Module], hidden_size: int, cfg: MoEConfig):
        super().__init__()
        if not 1 <= cfg.top_k <= len(experts):
            raise ValueError(f"moe.top_k must be in 1..{len(experts)}, got {cfg.top_k}")
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(hidden_size, len(experts), bias=False)
        self.cfg = cfg
        # Filled by every forward, read by the loss and by tests.
        self.aux_loss: torch.Tensor | None = None
        self.router_logp: torch.Tensor | None = None  # (tokens, experts)
        self.expert_counts: torch.Tensor | None = None
        self.dropped_tokens = 0

    @classmethod
    def from_ffn(cls, ffn: nn.Module, hidden_size: int, cfg: MoEConfig) -> MoEFeedForward:
        """Each expert starts as a copy of the dense FFN it replaces."""
        moe = cls([copy.deepcopy(ffn) for _ in range(cfg.num_experts)], hidden_size, cfg)
        if cfg.router_init == "first_expert":
            nn.init.zeros_(moe.router.weight)
        else:
            nn.init.normal_(moe.router.weight, std=0.02)
        ref = next(ffn.parameters())
        return moe.to(device=ref.device, dtype=ref.dtype)

    def capacity(self, num_tokens: int) -> int:
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        e = len(self.experts)
        return max(self.cfg.min_capacity, math.ceil(num_tokens * self.cfg.top_k / e * factor))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        n, e, k = x.shape[0], len(self.experts), self.cfg.top_k
        # The router runs in fp32 whatever the model dtype, as upstream's gate does.
        self.router_logp = torch.log_softmax(
            nn.functional.linear(x.float(), self.router.weight.float()), dim=-1
        )
        probs = self.router_logp.exp()
        if k == 1:  # max, not topk: on a tie (a zero-initialised router) torch.max returns the first expert
            top_p, top_i = probs.max(dim=-1, keepdim=True)
        else:
            top_p, top_i = probs.topk(k, dim=-1)
        if k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        routed = torch.zeros(n, e, device=x.device).scatter_(1, top_i, 1.0)
        self.aux_loss = e * (probs.mean(0) * routed.mean(0)).sum()

        out = torch.zeros_like(x)
        cap = self.capacity(n)
        counts = torch.zeros(e, dtype=torch.long)
        dropped = 0
        flat_i, flat_p = top_i.reshape(-1), top_p.reshape(-1)
        token_of = torch.arange(n, device=x.device).repeat_interleave(k)
        for j, expert in enumerate(self.experts):
            slots = torch.nonzero(flat_i == j).flatten()
            if self.cfg.drop_tokens and slots.numel() > cap:
                dropped += slots.numel() - cap
                # Keep the tokens the router is surest of. Dropping in sequence order would always cut the last
                # rows of a micro-batch (DeepSpeed's random choice is fair to rows but not reproducible).
                keep = flat_p[slots].topk(cap).indices.sort().values
                slots = slots[keep]
            # An expert with no tokens still runs (on zero rows), so the autograd graph has the same parameters on
            # every data-parallel rank whatever the routing did there.
            tokens = token_of[slots]
            counts[j] = tokens.numel()
            weight = flat_p[slots]
            if self.cfg.gate_scale == "straight_through" and k == 1:
                weight = weight / weight.detach()  # value 1, gradient of p (see MoEConfig.gate_scale)
            elif self.cfg.gate_scale == "one" and k == 1:
                weight = torch.ones_like(weight)
            y = expert(x.index_select(0, tokens)) * weight.unsqueeze(-1).to(x.dtype)
            out.index_add_(0, tokens, y)
        self.expert_counts, self.dropped_tokens = counts, dropped
        return out.reshape(shape)


def convert_to_moe(decoder_layers: nn.ModuleList, hidden_size: int, cfg: MoEConfig) -> list[int]:
    """Replace `layer.mlp` by an MoE FFN in the layers `cfg.layers` names; returns their indexes."""
    indexes = cfg.layer_indexes(len(decoder_layers))
    for i in indexes:
        layer = decoder_layers[i]
        if not isinstance(layer.mlp, MoEFeedForward):
            layer.mlp = MoEFeedForward.from_ffn(layer.mlp, hidden_size, cfg)
    return indexes


def init_experts_from_stages(
    vl_model: nn.Module,
    grounding_model: nn.Module,
    cfg: MoEConfig,
    expert_sources: Sequence[str] = ("grounding", "vl"),
) -> nn.Module:
    """Build the stage-3 MoE model in place of `vl_model` (research notes 2.5).

    Expert i of every MoE layer takes the FFN of `expert_sources[i]` ("grounding" or "vl"); attention, the base
    vocabulary's embedding and lm_head rows, projector and region adapter stay the VL model's; the grounding
    head (`text_hidden_fcs`, `sam.mask_decoder`) and the added tokens' rows (`<SEG>`, the image and region
    delimiters) come from the grounding model, which started from the VL rows and taught `<SEG>` in the context
    of its own delimiter rows. A grounding stage that trains only these (LoRA on FFNs, the head, the added rows)
    thus hands over a model whose grounding-expert path is exactly the grounding model. Both inputs must be
    merged (no LoRA) and of the same architecture; the router starts as `cfg.router_init` says.
    """
    if cfg.num_experts < 2:
        raise ValueError("an MoE built from two stages needs moe.num_experts >= 2")
    if len(expert_sources) != cfg.num_experts or set(expert_sources) - {"grounding", "vl"}:
        raise ValueError(f"expert_sources {list(expert_sources)}: one of grounding/vl per expert")
    expert_of = {source: expert_sources.index(source) for source in set(expert_sources)}
    cfg = cfg.model_copy(update={"enabled": True, "expert_of": expert_of})
    vl_model.cfg = vl_model.cfg.model_copy(update={"moe": cfg})
    dense = {"vl": [layer.mlp for layer in vl_model.decoder_layers]}
    dense["grounding"] = [layer.mlp for layer in grounding_model.decoder_layers]
    for i in convert_to_moe(vl_model.decoder_layers, vl_model.llm.config.hidden_size, cfg):
        for expert, source in zip(vl_model.decoder_layers[i].mlp.experts, expert_sources, strict=True):
            expert.load_state_dict(dense[source][i].state_dict())
    vl_model.text_hidden_fcs.load_state_dict(grounding_model.text_hidden_fcs.state_dict())
    vl_model.sam.mask_decoder.load_state_dict(grounding_model.sam.mask_decoder.state_dict())
    added = torch.tensor(vl_model.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS))
    with torch.no_grad():
        for table in ("get_input_embeddings", "get_output_embeddings"):
            # With tied embeddings both calls name one tensor; copying twice is harmless.
            getattr(vl_model.llm, table)().weight[added] = getattr(grounding_model.llm, table)().weight[added]
    return vl_model
