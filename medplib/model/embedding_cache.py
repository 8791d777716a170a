"""Frozen SAM image-encoder outputs kept on disk, one file per distinct image view, or in memory.

The image encoder is frozen in every stage, and MeCoVQA rows share images (~38 rows per image in
MeCoVQA-mini), so a training step or an eval batch need not run it again for an image it has seen: on the `small`
preset the encoder costs ~1 s an image on a CPU core, the LLM step on a row ~0.3 s. Files live under
`<root>/<encoder fingerprint>/`, so a changed encoder (other weights, other precision) never reads stale outputs,
and are keyed by the SHA-1 of the view's pixels, so any reader that builds the same view finds them. Without a
root the outputs stay in the process's memory, least recently used first out (`medplib.inference.Predictor`'s
default: a grounding row's image is encoded once for its generation and its teacher-forced pass, and a served
image once for every question asked about it).
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from medplib.cpu import has_bf16_kernels
from medplib.data.batch import Encoded, collate
from medplib.data.lru import BoundedCache
from medplib.model.packed_linear import pack_linears

# SAM settings that do not change the encoder's output: where the weights came from (the preset names a package,
# an exported model None; the weights themselves are hashed) and the decoder's. With them in the key, the
# untrained and the trained model of one pipeline encoded every eval image twice.
_NOT_ENCODER = {
    "weights",
    "decoder_depth",
    "decoder_mlp_dim",
    "decoder_heads",
    "mask_threshold",
    "seg_prompt",
}


def encoder_fingerprint(model, autocast: bool, copy_dtype: torch.dtype | None = None) -> str:
    """What determines the encoder's output: its settings and weights, the model dtype, whether bf16 autocast
    runs it and in which dtype a folded and fused copy does (`EmbeddingCache`), if one does."""
    settings = model.cfg.sam.model_dump_json(exclude=_NOT_ENCODER)
    copy_ = f"{copy_dtype}-copy-bn-folded-gelu-fused-linears-packed" if copy_dtype is not None else ""
    digest = hashlib.sha256(f"{settings}|{model.dtype}|{autocast}|{copy_}".encode())
    for name, tensor in sorted(model.sam.image_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """Replace every (Conv2d, BatchNorm2d) pair of an eval-mode module by one convolution, in place."""
    for name, child in list(module.named_children()):
        parts = list(child.children())
        if (
            isinstance(child, nn.Sequential)
            and len(parts) == 2
            and isinstance(parts[0], nn.Conv2d)
            and isinstance(parts[1], nn.BatchNorm2d)
        ):
            setattr(module, name, fuse_conv_bn_eval(parts[0], parts[1]))
        else:
            fold_batch_norms(child)
    return module


class ConvGELU(nn.Module):
    """A convolution followed by exact GELU, computed by oneDNN in one kernel: the activation is applied to the
    accumulator before the output is written, so the output makes one trip through memory instead of three."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            c.weight,
            c.bias,
            list(c.padding),
            list(c.stride),
            list(c.dilation),
            c.groups,
            "gelu",
            [],
            "none",
        )


def _exact_gelu(module: nn.Module) -> bool:
    # oneDNN's "gelu" post-op is the erf form, so the tanh approximation is not fused.
    return isinstance(module, nn.GELU) and module.approximate == "none"


def fuse_conv_gelus(module: nn.Module) -> nn.Module:
    """Fuse every convolution that TinyViT follows by GELU into a `ConvGELU`, in place (after
    `fold_batch_norms`): a `Sequential`'s (Conv2d, GELU) pairs, and the MBConv / PatchMerging blocks, whose
    forward applies `act1`/`act2` (`act`) to `conv1`/`conv2`. LiteMedSAM's first stage runs at 256 x 256 with
    256 hidden channels, where each separate GELU is a 32 MB round trip through memory."""
    pairs = {
        "MBConv": (("conv1", "act1"), ("conv2", "act2")),
        "PatchMerging": (("conv1", "act"), ("conv2", "act")),
    }
    # Which convolutions to fuse is decided before any is replaced: PatchMerging applies one `act` to both.
    fusable = [
        (conv_name, act_name)
        for conv_name, act_name in pairs.get(type(module).__name__, ())
        if isinstance(getattr(module, conv_name), nn.Conv2d) and _exact_gelu(getattr(module, act_name))
    ]
    for conv_name, act_name in fusable:
        setattr(module, conv_name, ConvGELU(getattr(module, conv_name)))
        setattr(module, act_name, nn.Identity())
    if isinstance(module, nn.Sequential):
        for i in range(len(module) - 1):
            if isinstance(module[i], nn.Conv2d) and _exact_gelu(module[i + 1]):
                module[i], module[i + 1] = ConvGELU(module[i]), nn.Identity()
    for child in module.children():
        fuse_conv_gelus(child)
    return module


# In-memory outputs kept at most: 32 images of LiteMedSAM's 256 x 64 x 64 fp32 embedding (4 MiB), ~500 of
# SAM-Med2D's at 256 px; an eval batch or a conversation about a few images needs far fewer.
MEMORY_BYTES = 128 << 20


def view_key(view: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(view).tobytes()).hexdigest()


class EmbeddingCache:
    """`fill(items)` sets `Encoded.sam_embedding` on every item with an image, computing only what is missing.
    `root` None keeps the outputs in memory (at most `memory_bytes`, as computed, fp32) instead of on disk (fp16)."""

    def __init__(
        self,
        root: str | Path | None,
        model,
        *,
        autocast: bool = False,
        batch_size: int | None = None,
        memory_bytes: int = MEMORY_BYTES,
    ):
        # Images per encoder call: 4 on a GPU; 1 on a CPU, where TinyViT's 256 x 256 first stage is bound by memory
        # traffic and a batch only spills the caches (2 threads, 2026-11-29: 0.57 s an image alone, 0.65 in fours).
        self.batch_size = batch_size or (4 if model.device.type == "cuda" else 1)
        self.model, self.autocast = model, autocast
        # With autocast on a CPU, a bf16 copy of the frozen encoder in channels-last layout: autocast casts the
        # fp32 weights again at every call and oneDNN's convolutions prefer channels-last. LiteMedSAM's TinyViT
        # on 2 threads, 2026-11-29: 0.60 s an image against 1.02 s, outputs within 0.03 of autocast's. Its
        # BatchNorms are folded into their convolutions first (exact in fp32): a BatchNorm over TinyViT's
        # 256-channel 256 x 256 first stage was 9% of the copy's time; folded, 0.63 s against 0.69 s an image.
        # Each convolution that GELU follows then runs with the GELU fused (`fuse_conv_gelus`): 0.42-0.47 ->
        # 0.38-0.40 s an image (2026-11-30, three MRI/CT slices, alternating), mean |error| against the fp32
        # encoder 0.0047 -> 0.0043 (the GELU sees the fp32 accumulator instead of its bf16 rounding).
        # Only where oneDNN has bf16 kernels: elsewhere its bf16 convolutions refuse to run, and autocast alone
        # runs the fp32 encoder (a stage asked for `bf16-mixed` on such a CPU).
        # Without autocast (fp32, e.g. a CPU without bf16 kernels) the same copy in fp32: on an AVX2-only EPYC,
        # 2026-12-01, LiteMedSAM's TinyViT took 2.38 -> 1.71 s an image on 2 threads (folding 2.25, fusing 2.05,
        # channels-last the rest) and 3.75 -> 2.96 s on 1, within 3e-6 of the encoder's own outputs.
        # Either copy needs oneDNN, whose kernel `ConvGELU` calls.
        # The copy is built at the first image to encode (0.09 s for `small`, 2026-12-01): a predictor that
        # switches to a folder (`use_embedding_cache`) or reads only cached outputs never builds one.
        self._encoder: nn.Module | None = None
        self.copy_dtype = None
        cpu_copy = model.device.type == "cpu" and torch.backends.mkldnn.is_available()
        if cpu_copy and (not autocast or has_bf16_kernels()):
            self.copy_dtype = torch.bfloat16 if autocast else torch.float32
        self.dir: Path | None = None
        self.memory: BoundedCache[np.ndarray] | None = None
        if root is None:
            self.memory = BoundedCache(memory_bytes)
        else:
            self.dir = Path(root) / encoder_fingerprint(model, autocast, self.copy_dtype)
            self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    @property
    def encoder(self) -> nn.Module | None:
        """The folded and fused copy of the frozen encoder this cache runs, None where it runs the model's own."""
        if self._encoder is None and self.copy_dtype is not None:
            folded = fold_batch_norms(copy.deepcopy(self.model.sam.image_encoder))
            self._encoder = fuse_conv_gelus(folded).to(self.copy_dtype, memory_format=torch.channels_last)
            # Its linears read packed weights (`medplib.model.packed_linear`): bf16 0.322 -> 0.311 s an image,
            # the same outputs (2 threads, 2026-12-01); fp32 on the AVX2-only EPYC 1.59 -> 1.53 s, outputs
            # within 2e-6 (2026-12-02).
            pack_linears(self._encoder)
        return self._encoder

    def _path(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / f"{key}.npy"

    def _load(self, key: str) -> np.ndarray | None:
        if self.memory is not None:
            return self.memory.get(key)
        path = self._path(key)
        return np.load(path).astype(np.float32) if path.exists() else None

    def _store(self, key: str, embedding: np.ndarray) -> np.ndarray:
        """Keep `embedding`; returns it as a later `_load` gives it back."""
        if self.memory is not None:
            embedding = embedding.copy()  # not a view that would keep its whole batch alive
            self.memory.put(key, embedding, embedding.nbytes)
            return embedding
        # fp16 on disk: half the bytes, and the embedding (LayerNorm output, |x| < ~20) fits its range.
        stored = embedding.astype(np.float16)
        tmp = self._path(f".{key}.{os.getpid()}.tmp")
        np.save(tmp, stored)
        os.replace(tmp, self._path(key))  # atomic: concurrent readers never see half a file
        return stored.astype(np.float32)

    def fill(self, items: list[Encoded]) -> None:
        missing: dict[str, list[Encoded]] = {}
        for item in items:
            if item.sam_view is None or item.sam_embedding is not None:
                continue
            key = view_key(item.sam_view)
            if key not in missing:
                item.sam_embedding = self._load(key)
            if item.sam_embedding is not None:
                self.hits += 1
            else:
                missing.setdefault(key, []).append(item)
        if not missing:
            return
        keys = list(missing)
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start : start + self.batch_size]
            batch = collate([missing[k][0] for k in chunk], self.model.cfg, self.model.ids.pad)
            device = "cuda" if self.model.device.type == "cuda" else "cpu"
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast):
                if (encoder := self.encoder) is not None:
                    pixels = batch["sam_pixel_values"].to(self.copy_dtype, memory_format=torch.channels_last)
                    embeddings = encoder(pixels).float().numpy()
                else:
                    embeddings = (
                        self.model.sam_embeddings(batch, list(range(len(chunk)))).float().cpu().numpy()
                    )
            for key, embedding in zip(chunk, embeddings, strict=True):
                kept = self._store(key, embedding)
                for item in missing[key]:  # the rows that share this image
                    item.sam_embedding = kept
        self.misses += len(missing)
