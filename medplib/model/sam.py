"""SAM-style pixel decoder: ViT image encoder, prompt encoder and two-way-transformer mask decoder.

Parameter names follow the original SAM layout (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`), so
SAM, SAM-Med2D and LiteMedSAM checkpoints load by name. MedPLIB prompts the decoder with one sparse embedding
per `<SEG>` (the projected LLM hidden state) and no dense prompt; point and box prompts are supported too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medplib.model.config import SAMConfig


class LayerNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SAM's LayerNorm2d (over channels, per pixel) as one fused layer norm over the channels-last view: the
        # decoder's upscaling tensors lie channels-last, and the six elementwise passes of the spelled-out form
        # plus their backward were ~half of its time on CPU (2026-11-30). Under autocast it runs in fp32.
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int, sigmoid_output: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim], strict=True))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return torch.sigmoid(x) if self.sigmoid_output else x


# ---------------------------------------------------------------- image encoder (ViT with windowed attention)


def _rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        rel_pos = F.interpolate(rel_pos.T[None], size=max_dist, mode="linear")[0].T
    q = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return rel_pos[((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


class EncoderAttention(nn.Module):
    def __init__(self, dim: int, heads: int, use_rel_pos: bool, input_size: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size - 1, dim // heads))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size - 1, dim // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            rh, rw = _rel_pos(h, h, self.rel_pos_h), _rel_pos(w, w, self.rel_pos_w)
            rq = q.reshape(b * self.heads, h, w, -1)
            bias_h = torch.einsum("bhwc,hkc->bhwk", rq, rh)
            bias_w = torch.einsum("bhwc,wkc->bhwk", rq, rw)
            attn = (attn.view(-1, h, w, h, w) + bias_h[..., None] + bias_w[..., None, :]).view(
                -1, h * w, h * w
            )
        x = (attn.softmax(-1) @ v).view(b, self.heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


class Adapter(nn.Module):
    """SAM-Med2D's adapter, a branch parallel to the block's MLP (both read `norm2(x)`; their outputs add).

    Channel attention (global average pool -> Linear(C, C/4) -> ReLU -> Linear(C/4, C) -> sigmoid, no biases)
    rescales the channels; a spatial branch (3x3 stride-2 conv -> ReLU -> 4x4 stride-2 transposed conv -> ReLU,
    no biases) is added back to the rescaled map, and a LayerNorm closes it. Parameter names and shapes are
    SAM-Med2D's (`Adapter.channel.{0,2}`, `Adapter.spatial.{0,2}`, `Adapter.norm`), so `sam-med2d_b.pth` loads by
    name: about 15.0 M parameters per ViT-B block, 180 M over 12 blocks (SAM-Med2D ViT-B at 256: 271 M in all).
    """

    def __init__(self, dim: int, ratio: float = 0.25):
        super().__init__()
        hidden = int(dim * ratio)
        self.norm = nn.LayerNorm(dim)
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.Sigmoid()
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, 3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        scaled = x * self.channel(x.mean(dim=(2, 3)))[:, :, None, None]
        x = x + self.spatial(scaled)
        return self.norm(x.permute(0, 2, 3, 1))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, use_rel_pos: bool, grid: int, adapter: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EncoderAttention(dim, heads, use_rel_pos, window if window > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.lin1 = nn.Linear(dim, dim * 4)
        self.mlp.act = nn.GELU()
        self.mlp.lin2 = nn.Linear(dim * 4, dim)
        # Capitalised as in SAM-Med2D so its checkpoint keys (`blocks.N.Adapter.*`) load unchanged.
        self.Adapter = Adapter(dim) if adapter else None
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window > 0:
            h, w = x.shape[1:3]
            x, pad_hw = _window_partition(x, self.window)
            x = _window_unpartition(self.attn(x), self.window, pad_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        y = self.norm2(x)
        out = self.mlp(y)
        if self.Adapter is not None:
            out = out + self.Adapter(y)
        return x + out


def _window_partition(x: torch.Tensor, win: int) -> tuple[torch.Tensor, tuple[int, int]]:
    b, h, w, c = x.shape
    ph, pw = (win - h % win) % win, (win - w % win) % win
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // win, win, wp // win, win, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, win, win, c), (hp, wp)


def _window_unpartition(
    x: torch.Tensor, win: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    hp, wp = pad_hw
    b = x.shape[0] // (hp * wp // win // win)
    x = x.view(b, hp // win, wp // win, win, win, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, : hw[0], : hw[1]].contiguous()


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder: (B,3,S,S) normalised -> (B, prompt_dim, S/16, S/16)."""

    def __init__(self, cfg: SAMConfig):
        super().__init__()
        dim, grid = cfg.encoder_embed_dim, cfg.image_size_px // cfg.encoder_patch_px
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, cfg.encoder_patch_px, cfg.encoder_patch_px)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(
                dim,
                cfg.encoder_heads,
                0 if i in cfg.encoder_global_attn_indexes else cfg.encoder_window_size,
                cfg.encoder_use_rel_pos,
                grid,
                cfg.encoder_adapters,
            )
            for i in range(cfg.encoder_depth)
        )
        p = cfg.prompt_embed_dim
        self.neck = nn.Sequential(
            nn.Conv2d(dim, p, 1, bias=False),
            LayerNorm2d(p),
            nn.Conv2d(p, p, 3, padding=1, bias=False),
            LayerNorm2d(p),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


# ---------------------------------------------------------------- prompt encoder


class PositionEmbeddingRandom(nn.Module):
    def __init__(self, num_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix.to(coords.dtype)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def grid(self, size: int) -> torch.Tensor:
        ones = torch.ones(size, size, device=self.positional_encoding_gaussian_matrix.device)
        y = (ones.cumsum(0) - 0.5) / size
        x = (ones.cumsum(1) - 0.5) / size
        return self._encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)

    def points(self, coords: torch.Tensor, image_size: int) -> torch.Tensor:
        return self._encode(coords.float() / image_size)


class PromptEncoder(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        dim = cfg.prompt_embed_dim
        self.embed_dim = dim
        self.image_size = cfg.image_size_px
        self.embedding_size = cfg.embedding_size
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        # 0/1: negative/positive point, 2/3: box corners (SAM's order).
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        # SAM's mask_in_chans is 16 at dim 256 (SAM, SAM-Med2D, LiteMedSAM): 1 -> 4 -> 16 -> dim channels.
        mask_in = max(4, dim // 16)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in // 4, 2, 2),
            LayerNorm2d(mask_in // 4),
            nn.GELU(),
            nn.Conv2d(mask_in // 4, mask_in, 2, 2),
            LayerNorm2d(mask_in),
            nn.GELU(),
            nn.Conv2d(mask_in, dim, 1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def dense_pe(self) -> torch.Tensor:
        return self.pe_layer.grid(self.embedding_size)[None]

    def no_mask_dense(self, batch: int) -> torch.Tensor:
        e = self.embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, e, e)

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(N, 4) boxes in view pixels -> (N, 2, dim) sparse embeddings."""
        corners = self.pe_layer.points(boxes.reshape(-1, 2, 2) + 0.5, self.image_size)
        corners[:, 0] += self.point_embeddings[2].weight
        corners[:, 1] += self.point_embeddings[3].weight
        return corners

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, P, 2) points + (N, P) labels (1 fg, 0 bg) -> (N, P+1, dim); a padding point is appended as SAM does."""
        coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
        labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        emb = self.pe_layer.points(coords + 0.5, self.image_size)
        emb = torch.where((labels == -1)[..., None], self.not_a_point_embed.weight.expand_as(emb), emb)
        emb = emb + torch.where((labels == 1)[..., None], self.point_embeddings[1].weight, 0.0)
        emb = emb + torch.where((labels == 0)[..., None], self.point_embeddings[0].weight, 0.0)
        return emb


# ---------------------------------------------------------------- mask decoder


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(dim, inner),
            nn.Linear(dim, inner),
            nn.Linear(dim, inner),
        )
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))
        # Plain matmuls, as SAM itself: one side is a handful of prompt tokens, so the score matrix is small, and
        # PyTorch's fused CPU kernel took ~15 ms a call in the backward pass against 4,096 image tokens.
        out = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TwoWayBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.lin1 = nn.Linear(dim, mlp_dim)
        self.mlp.act = nn.ReLU()
        self.mlp.lin2 = nn.Linear(mlp_dim, dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, heads, downsample=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        """image (N,C,h,w), image_pe (1 or N,C,h,w), tokens (N,K,C) -> tokens, image (N,h*w,C)."""
        # Token-major and contiguous once: every `keys + key_pe` on the transposed views was a strided pass over
        # 4,096 x 256 values, ~20 ms each in a training step on CPU.
        image = image.flatten(2).transpose(1, 2).contiguous()
        image_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe)
        q, k = queries + tokens, keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MaskDecoder(nn.Module):
    def __init__(self, cfg: SAMConfig, num_multimask_outputs: int = 3):
        super().__init__()
        dim = cfg.prompt_embed_dim
        self.transformer = TwoWayTransformer(cfg.decoder_depth, dim, cfg.decoder_heads, cfg.decoder_mlp_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, 2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(dim, 256, self.num_mask_tokens, 3)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per prompt row: embeddings (N,C,e,e), sparse (N,K,C), dense (N,C,e,e) ->
        low-res logits (N, 4e, 4e) and predicted IoU (N,) of the single-mask output."""
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens[None].expand(sparse.shape[0], -1, -1).to(sparse.dtype), sparse], dim=1)
        src = image_embeddings + dense
        n, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)  # pe (1,C,h,w) broadcasts over the rows
        # (N, h*w, C) seen as (N, C, h, w) is channels-last, and so is everything the upscaling computes from it.
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
        # Single-mask output (multimask_output=False in SAM's terms): mask token 0 only. The product is taken on the
        # channels-last view (no copy; an NCHW product copied the 32 x 256 x 256 map and left GELU's backward
        # mixing layouts, 3x slower).
        hyper = self.output_hypernetworks_mlps[0](hs[:, 1])
        masks = (upscaled.permute(0, 2, 3, 1).flatten(1, 2) @ hyper[:, :, None]).reshape(
            n, *upscaled.shape[-2:]
        )
        iou = self.iou_prediction_head(hs[:, 0])[:, 0]
        return masks, iou


class SAM(nn.Module):
    """The three parts together; the image encoder is frozen and run without gradients by the model."""

    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.encoder == "vit":
            self.image_encoder = ImageEncoderViT(cfg)
        else:
            from medplib.model.tinyvit import build_tinyvit  # the `small` preset's LiteMedSAM encoder

            self.image_encoder = build_tinyvit(cfg)
        self.prompt_encoder = PromptEncoder(cfg)
        self.mask_decoder = MaskDecoder(cfg)

    def decode(self, embeddings: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embeddings (N,C,e,e) and sparse prompts (N,K,C) -> low-res logits (N,4e,4e), IoU (N,)."""
        dense = self.prompt_encoder.no_mask_dense(sparse.shape[0]).to(embeddings.dtype)
        pe = self.prompt_encoder.dense_pe().to(embeddings.dtype)
        return self.mask_decoder(embeddings, pe, sparse.to(embeddings.dtype), dense)
