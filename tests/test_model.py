"""The MedPLIB model core on the random-init `tiny` preset: every task kind trains, MoE routing is exact,
save/load and LoRA merging are lossless, and bad input fails with a clear message."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medplib.constants import SEG_TOKEN, SPECIAL_TOKENS
from medplib.cpu import has_bf16_kernels
from medplib.data.schema import Box, Point, Sample, Turn
from medplib.data.transforms import Geometry, region_cells, unpad_mask_logits
from medplib.model.config import LoraSettings, LossWeights, MoEConfig, configs_dir, load_model_config
from medplib.model.lora import merge_lora, prepare_trainable
from medplib.model.moe import MoEFeedForward, init_experts_from_stages


def _sample(question: str, answer: str, image: bool = True, regions=()) -> Sample:
    return Sample(
        id="s",
        image="img.png" if image else None,
        turns=[Turn(role="human", text=question), Turn(role="gpt", text=answer)],
        regions=list(regions),
    )


def _mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture()
def all_tasks(rng_image):
    h, w = rng_image.shape[:2]
    region_mask = _mask(h, w, 10, 30, 20, 50)
    return {
        "vqa": (_sample("What modality is this?", "MRI."), rng_image, []),
        "region_point": (
            _sample("What is in <region></region>?", "The thalamus.", regions=[Point(x=30, y=20)]),
            rng_image,
            [],
        ),
        "region_box": (
            _sample("What is in <region></region>?", "Bone.", regions=[Box(x0=5, y0=5, x1=40, y1=30)]),
            rng_image,
            [],
        ),
        "region_mask": (_sample("What is in <region></region>?", "Fat."), rng_image, [], [region_mask]),
        "ground_one": (
            _sample("Segment the brain.", "Sure, it is <SEG>."),
            rng_image,
            [_mask(h, w, 5, 40, 10, 70)],
        ),
        "ground_two": (
            _sample("Segment both lobes.", "Left <SEG> and right <SEG>."),
            rng_image,
            [_mask(h, w, 5, 40, 5, 38), _mask(h, w, 5, 40, 42, 75)],
        ),
        "text_only": (_sample("What is MRI?", "Magnetic resonance imaging.", image=False), None, []),
    }


@pytest.mark.parametrize(
    "kind", ["vqa", "region_point", "region_box", "region_mask", "ground_one", "ground_two", "text_only"]
)
def test_forward_backward_each_task(kind, all_tasks, tiny_model, make_batch):
    sample, image, masks = all_tasks[kind][:3]
    batch = make_batch(tiny_model, [all_tasks[kind]])
    out = tiny_model(batch, LossWeights(ce=1, bce=2, dice=0.5, focal=1, iou=1))
    for name in ("loss", "ce", "bce", "dice", "focal", "iou"):
        assert torch.isfinite(out[name]), name
    assert out["ce"] > 0
    if masks:
        assert out["bce"] > 0 and out["dice"] > 0
    else:
        assert out["bce"] == 0
    out["loss"].backward()
    if kind.startswith("region"):
        assert tiny_model.region_fea_adapter.weight.grad.abs().sum() > 0
    if masks:
        assert tiny_model.sam.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.grad.abs().sum() > 0
        assert tiny_model.text_hidden_fcs[0].weight.grad.abs().sum() > 0


def test_mixed_batch_trains_all_tasks_together(all_tasks, tiny_model, make_batch):
    batch = make_batch(tiny_model, list(all_tasks.values()))
    out = tiny_model(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def test_gradients_reach_exactly_the_unfrozen_parameters(all_tasks, tiny_model, make_batch):
    sft = ["mask_decoder", "text_hidden_fcs", "region_fea_adapter", "mm_projector"]
    prepare_trainable(
        tiny_model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]), sft
    )
    batch = make_batch(tiny_model, list(all_tasks.values()))
    tiny_model(batch)["loss"].backward()
    for name, p in tiny_model.named_parameters():
        expect = ("lora_" in name) or any(m in name for m in sft)
        assert p.requires_grad == expect, name
        if re.search(r"output_hypernetworks_mlps\.[1-9]\.", name):
            assert p.grad is None  # kept for checkpoint compatibility, unused at single-mask output
        elif expect:
            assert p.grad is not None, f"no gradient reached {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    # Always-frozen parts stay frozen even when asked for.
    prepare_trainable(tiny_model, None, ["sam", "vision_tower"])
    assert not any(p.requires_grad for p in tiny_model.sam.image_encoder.parameters())
    assert not any(p.requires_grad for p in tiny_model.vision_tower.parameters())
    assert all(p.requires_grad for p in tiny_model.sam.mask_decoder.parameters())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_layer_norm_2d_normalises_each_pixel_over_channels(layout):
    from medplib.model.sam import LayerNorm2d

    torch.manual_seed(0)
    norm = LayerNorm2d(8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 5, 7).to(memory_format=layout)
    mean, var = x.mean(1, keepdim=True), x.var(1, keepdim=True, unbiased=False)
    expected = norm.weight[:, None, None] * (x - mean) / torch.sqrt(var + norm.eps) + norm.bias[:, None, None]
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_sft_module_that_matches_nothing_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="mask_decodr"):
        prepare_trainable(tiny_model, None, ["mask_decodr"])


# ---------------------------------------------------------------- MoE


def _moe(num_experts=2, top_k=1, **kw) -> MoEFeedForward:
    torch.manual_seed(0)
    ffns = [
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        for _ in range(num_experts)
    ]
    return MoEFeedForward(ffns, 8, MoEConfig(enabled=True, num_experts=num_experts, top_k=top_k, **kw))


def test_top1_each_token_runs_exactly_one_expert():
    moe = _moe(capacity_factor=100.0).train()
    calls = {i: 0 for i in range(2)}
    for i, expert in enumerate(moe.experts):
        expert.register_forward_hook(
            lambda m, inp, out, i=i: calls.__setitem__(i, calls[i] + inp[0].shape[0])
        )
    x = torch.randn(3, 7, 8)
    moe(x)
    assert calls[0] + calls[1] == 21  # every token, once
    assert moe.expert_counts.sum() == 21 and moe.dropped_tokens == 0
    assert calls == {0: int(moe.expert_counts[0]), 1: int(moe.expert_counts[1])}


def test_router_probability_scales_the_chosen_expert_output():
    moe = _moe(capacity_factor=100.0).eval()
    x = torch.randn(10, 8)
    probs = torch.softmax(x @ moe.router.weight.T, dim=-1)
    p, idx = probs.max(-1)
    expected = torch.stack([moe.experts[int(i)](x[t]) * p[t] for t, i in enumerate(idx)])
    torch.testing.assert_close(moe(x), expected)


def test_top2_renormalises_the_two_probabilities():
    moe = _moe(num_experts=3, top_k=2, capacity_factor=100.0).eval()
    x = torch.randn(6, 8)
    probs = torch.softmax(x @ moe.router.weight.T, dim=-1)
    p, idx = probs.topk(2, dim=-1)
    p = p / p.sum(-1, keepdim=True)
    expected = torch.stack(
        [sum(moe.experts[int(idx[t, j])](x[t]) * p[t, j] for j in range(2)) for t in range(6)]
    )
    torch.testing.assert_close(moe(x), expected)


def test_capacity_overflow_drops_the_tokens_the_router_is_least_sure_of():
    moe = _moe(capacity_factor=0.5).train()
    with torch.no_grad():  # route every token to expert 0, more surely the larger its first feature
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0
    x = torch.randn(8, 8)
    x[:, 0] = torch.tensor([0.3, 0.9, 0.1, 0.5, 1.0, 0.2, 0.4, 0.6])
    out = moe(x)
    capacity = moe.capacity(8)  # ceil(8 * 1 / 2 * 0.5) = 2
    assert capacity == 2 and moe.dropped_tokens == 6
    kept = [1, 4]  # the two highest router probabilities, wherever they sit in the sequence
    assert torch.all(out[kept].abs().sum(-1) > 0)
    assert torch.all(out[[i for i in range(8) if i not in kept]] == 0)  # overflow tokens get no FFN output
    moe.eval()  # eval capacity factor 2.0: no drops with two experts
    moe(x)
    assert moe.dropped_tokens == 0


def test_straight_through_gate_keeps_the_expert_output_and_the_router_gradient():
    moe = _moe(capacity_factor=2.0)
    moe.cfg = moe.cfg.model_copy(update={"gate_scale": "straight_through"})
    x = torch.randn(6, 8)
    out = moe(x)
    expected = torch.zeros_like(x)
    choice = torch.softmax(x @ moe.router.weight.T, -1).argmax(-1)
    for i in range(6):
        expected[i] = moe.experts[int(choice[i])](x[i : i + 1])[0]
    assert torch.allclose(out, expected, atol=1e-6)  # weight 1, not the router probability
    out.sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_unit_gates_are_refused_beyond_top1():
    with pytest.raises(ValueError, match="top-1 setting"):
        MoEConfig(top_k=2, gate_scale="one")
    assert MoEConfig(top_k=2).gate_scale == "prob"


def test_first_expert_router_starts_as_expert_zero_and_learns_to_leave_it():
    """router_init first_expert: every token runs expert 0 (the MoE computes what expert 0's source model did),
    and the straight-through gradient still reaches the router."""
    from medplib.model.config import MoEConfig
    from medplib.model.moe import MoEFeedForward

    torch.manual_seed(0)
    ffn = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    cfg = MoEConfig(
        enabled=True, router_init="first_expert", gate_scale="straight_through", drop_tokens=False
    )
    moe = MoEFeedForward.from_ffn(ffn, 8, cfg)
    with torch.no_grad():  # make the experts differ, as the grounding and vl FFNs do
        moe.experts[1][0].weight.add_(1.0)
    x = torch.randn(10, 8)
    out = moe(x)
    assert moe.expert_counts.tolist() == [10, 0]
    assert torch.allclose(out, moe.experts[0](x), atol=1e-6)
    out.pow(2).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_experts_equal_their_source_ffns(tiny_cfg, all_tasks, make_batch):
    from medplib.model.medplib import MedPLIB

    torch.manual_seed(1)
    vl, grounding = MedPLIB(tiny_cfg), MedPLIB(tiny_cfg)
    vl_ffn = [{k: v.clone() for k, v in layer.mlp.state_dict().items()} for layer in vl.decoder_layers]
    g_ffn = [layer.mlp.state_dict() for layer in grounding.decoder_layers]
    vl_embed = vl.llm.get_input_embeddings().weight.detach().clone()
    moe_model = init_experts_from_stages(vl, grounding, MoEConfig(num_experts=2, top_k=1, layers="dense"))
    # The forward's lookup at the decoder layers finds every MoE FFN a walk of the whole model does.
    layers = [m for m in moe_model.modules() if isinstance(m, MoEFeedForward)]
    assert len(layers) == tiny_cfg.llm.num_layers and moe_model.moe_ffns == layers
    for i, layer in enumerate(moe_model.decoder_layers):
        for k, v in layer.mlp.experts[0].state_dict().items():
            assert torch.equal(v, g_ffn[i][k])
        for k, v in layer.mlp.experts[1].state_dict().items():
            assert torch.equal(v, vl_ffn[i][k])
    assert torch.equal(moe_model.text_hidden_fcs[0].weight, grounding.text_hidden_fcs[0].weight)
    # The added tokens' rows (<SEG>, image and region delimiters) come with the grounding head that learnt on
    # them; the base vocabulary stays the VL model's.
    added = torch.tensor(moe_model.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS))
    g_embed = grounding.llm.get_input_embeddings().weight
    moe_embed = moe_model.llm.get_input_embeddings().weight
    assert torch.equal(moe_embed[added], g_embed[added]) and not torch.equal(vl_embed[added], g_embed[added])
    base = torch.ones(moe_embed.shape[0], dtype=torch.bool)
    base[added] = False
    assert torch.equal(moe_embed[base], vl_embed[base])
    g_head = grounding.llm.get_output_embeddings().weight
    assert torch.equal(moe_model.llm.get_output_embeddings().weight[added], g_head[added])
    out = moe_model(make_batch(moe_model, list(all_tasks.values())), LossWeights(moe_aux=0.01))
    assert out["moe_aux"] > 0 and torch.isfinite(out["loss"])


def test_routing_loss_sends_each_task_to_its_expert(tiny_cfg, all_tasks, make_batch):
    """`moe_route`: the experts' origins come from the stage's expert order; trained on that term alone, the
    router sends the tokens of grounding rows to the grounding expert and a VQA row's question and answer to the
    vl expert."""
    from medplib.model.medplib import MedPLIB

    torch.manual_seed(2)
    model = init_experts_from_stages(
        MedPLIB(tiny_cfg), MedPLIB(tiny_cfg), MoEConfig(num_experts=2, drop_tokens=False), ("vl", "grounding")
    )
    assert model.cfg.moe.expert_of == {"vl": 0, "grounding": 1}
    batch = make_batch(model, [all_tasks["vqa"], all_tasks["ground_one"], all_tasks["ground_two"]])
    grounding = batch["attention_mask"].bool()
    grounding[0] = False
    vqa_text = torch.zeros_like(grounding)  # the VQA row's question and answer: the tokens after its image
    image = batch["input_ids"][0] == model.ids.image
    vqa_text[0] = batch["attention_mask"][0].bool() & (
        torch.arange(image.numel()) > int(image.nonzero().max())
    )
    only_route = LossWeights(ce=0.0, bce=0.0, dice=0.0, moe_route=1.0)
    opt = torch.optim.SGD([m.router.weight for m in model.moe_ffns], lr=0.5)
    start = None
    for _ in range(60):
        opt.zero_grad()
        out = model(batch, only_route)
        start = out["moe_route"].item() if start is None else start
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        assert float(model(batch, only_route)["moe_route"]) < 0.7 * start
    # A linear router on a random 2-layer model: the first layer sees little more than the token embeddings; the
    # second separates the tasks' tokens.
    choice = model.moe_ffns[-1].router_logp.argmax(-1)
    assert float((choice[grounding.flatten()] == 1).float().mean()) > 0.85
    assert float((choice[vqa_text.flatten()] == 0).float().mean()) > 0.85


def test_the_small_moe_stage_moves_its_routers_and_nothing_else(tiny_cfg, all_tasks, make_batch):
    """`configs/stages/small/moe.yaml` trains the router alone: one optimiser step as the stage takes it (its
    trainable set, its AdamW groups, all of its loss terms) on a mixed batch changes every layer's router and not
    one other weight (experts, attention, added-token rows, region adapter, grounding head)."""
    from medplib.model.medplib import MedPLIB
    from workflows.train.config import load_stage_config
    from workflows.train.stage import param_groups

    stage = load_stage_config(configs_dir() / "stages" / "small" / "moe.yaml")
    torch.manual_seed(3)
    model = init_experts_from_stages(MedPLIB(tiny_cfg), MedPLIB(tiny_cfg), stage.moe, stage.expert_sources)
    prepare_trainable(model, stage.lora, stage.sft_modules)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == tiny_cfg.llm.num_layers
    assert all(name.endswith("mlp.router.weight") for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.AdamW(
        param_groups(model, stage), betas=tuple(stage.betas), weight_decay=stage.weight_decay
    )
    batch = make_batch(model, [all_tasks[k] for k in ("vqa", "region_box", "ground_one")])
    model(batch, stage.loss_weights)["loss"].backward()
    opt.step()
    assert {name for name, p in model.named_parameters() if not torch.equal(p, before[name])} == trainable


# ---------------------------------------------------------------- persistence and LoRA


def test_save_load_gives_identical_logits_and_masks(tmp_path, all_tasks, tiny_model, make_batch):
    from medplib.model.medplib import MedPLIB

    tiny_model.enable_moe()
    tiny_model.eval()
    batch = make_batch(tiny_model, [all_tasks["ground_two"], all_tasks["region_box"]])
    with torch.no_grad():
        before = tiny_model(batch, all_logits=True)
        gen_before = tiny_model.generate(batch, max_new_tokens=4, segment=True)
    tiny_model.save_pretrained(tmp_path / "m")
    random_state = torch.get_rng_state()
    loaded = MedPLIB.from_pretrained(tmp_path / "m").eval()
    # Built without its random init (the file holds every weight), so loading draws nothing.
    assert torch.equal(torch.get_rng_state(), random_state)
    buffers = dict(loaded.named_buffers())  # non-persistent ones too: they are computed, never loaded
    for name, buffer in tiny_model.named_buffers():
        assert torch.equal(buffers[name], buffer), name
    with torch.no_grad():
        after = loaded(batch, all_logits=True)
        gen_after = loaded.generate(batch, max_new_tokens=4, segment=True)
    assert torch.equal(before["logits"], after["logits"])
    assert torch.equal(before["loss"], after["loss"])
    for a, b in zip(gen_before, gen_after, strict=True):
        assert a.token_ids == b.token_ids
        assert len(a.mask_logits) == len(b.mask_logits) > 0
        for ma, mb in zip(a.mask_logits, b.mask_logits, strict=True):
            assert torch.equal(ma, mb)


def test_ce_over_supervised_positions_equals_the_ce_over_all_logits(all_tasks, tiny_model, make_batch):
    # Training projects only the supervised positions onto the vocabulary; the loss must not change.
    tiny_model.eval()
    batch = make_batch(tiny_model, list(all_tasks.values()))
    with torch.no_grad():
        out = tiny_model(batch, all_logits=True)
    logits, labels = out["logits"][:, :-1].float(), batch["labels"][:, 1:]
    assert 0 < int((labels != -100).sum()) < labels.numel() / 2
    full = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out["ce"], full)


def test_the_encoder_cache_key_is_shared_by_a_preset_and_its_export(tmp_path, tiny_model):
    # A preset names where its SAM weights come from, an exported model does not (its weights are inside):
    # both must find the same cached encoder outputs.
    from medplib.model.embedding_cache import encoder_fingerprint
    from medplib.model.medplib import MedPLIB

    tiny_model.save_pretrained(tmp_path / "m")
    loaded = MedPLIB.from_pretrained(tmp_path / "m")
    sam = tiny_model.cfg.sam.model_copy(update={"weights": "pkg:lite_medsam", "mask_threshold": 0.1})
    tiny_model.cfg = tiny_model.cfg.model_copy(update={"sam": sam})
    assert encoder_fingerprint(tiny_model, autocast=True) == encoder_fingerprint(loaded, autocast=True)
    with torch.no_grad():
        next(loaded.sam.image_encoder.parameters()).add_(1.0)
    assert encoder_fingerprint(tiny_model, autocast=True) != encoder_fingerprint(loaded, autocast=True)


def test_the_cache_encodes_with_a_bf16_copy_close_to_autocast(tmp_path, rng_image, tiny_model):
    """Where oneDNN has bf16 kernels a bf16 copy of the encoder; elsewhere (AVX2 only, where its bf16
    convolutions refuse to run) autocast over the fp32 encoder. Either way close to autocast's embedding."""
    from medplib.data.batch import collate, encode_sample
    from medplib.model.embedding_cache import EmbeddingCache

    tiny_model.eval()
    items = [
        encode_sample([Turn(role="human", text="What is this?")], img, tiny_model.tokenizer, tiny_model.cfg)
        for img in (rng_image, 255 - rng_image)
    ]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        batch = collate(items, tiny_model.cfg, tiny_model.ids.pad)
        reference = tiny_model.sam_embeddings(batch, [0, 1]).float()
    cache = EmbeddingCache(tmp_path, tiny_model, autocast=True)
    assert (cache.encoder is not None) == has_bf16_kernels()
    assert cache.encoder is None or next(cache.encoder.parameters()).dtype == torch.bfloat16
    cache.fill(items)
    got = torch.from_numpy(np.stack([item.sam_embedding for item in items]))
    torch.testing.assert_close(got, reference, atol=0.1, rtol=0.05)
    assert cache.misses == 2 and len(list(cache.dir.glob("*.npy"))) == 2


def test_without_autocast_the_cache_encodes_with_an_fp32_copy(tmp_path, rng_image, tiny_model):
    """Without autocast (fp32 training, e.g. on a CPU without bf16 kernels) the cache encodes with an fp32 copy of
    the encoder in channels-last layout (BatchNorms folded and GELUs fused where it has them, as LiteMedSAM's
    TinyViT does: tests/test_grounding_recipe.py): the encoder's own embedding up to fp32 rounding and the fp16
    the cache stores; kept apart from autocast's outputs."""
    from medplib.data.batch import collate, encode_sample
    from medplib.model.embedding_cache import EmbeddingCache

    tiny_model.eval()
    items = [
        encode_sample([Turn(role="human", text="What is this?")], img, tiny_model.tokenizer, tiny_model.cfg)
        for img in (rng_image, 255 - rng_image)
    ]
    with torch.no_grad():
        reference = tiny_model.sam_embeddings(collate(items, tiny_model.cfg, tiny_model.ids.pad), [0, 1])
    cache = EmbeddingCache(tmp_path, tiny_model, autocast=False)
    assert cache.copy_dtype == torch.float32 and next(cache.encoder.parameters()).dtype == torch.float32
    assert cache.encoder.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    cache.fill(items)
    got = torch.from_numpy(np.stack([item.sam_embedding for item in items]))
    torch.testing.assert_close(got, reference, atol=1e-3, rtol=1e-3)
    assert cache.dir != EmbeddingCache(tmp_path, tiny_model, autocast=True).dir


def test_the_predictor_encodes_an_image_once_for_the_calls_about_it(rng_image, tiny_model):
    """Without a cache folder a `Predictor` keeps recent encoder outputs in memory: a grounding row's
    generation and its teacher-forced pass, or two questions about one image, encode it once; what it keeps is
    bounded (`memory_bytes`, least recently used out). The encoder copy it runs is built when first needed."""
    from medplib.data.batch import encode_sample
    from medplib.inference import Predictor
    from medplib.model.embedding_cache import EmbeddingCache

    predictor = Predictor(tiny_model, autocast=False)
    cache = predictor.embedding_cache
    assert cache.dir is None and cache.copy_dtype == torch.float32
    assert cache._encoder is None  # the copy is built at the first image, not with every predictor
    calls = []
    cache.encoder.register_forward_hook(lambda _module, inputs, _out: calls.append(inputs[0].shape[0]))
    for question in ("Segment the lesion.", "Where is it?"):
        predictor.predict(rng_image, question, max_new_tokens=2, segment=True)
    forced = encode_sample(
        [Turn(role="human", text="Segment the lesion."), Turn(role="gpt", text=f"It is {SEG_TOKEN}.")],
        rng_image,
        tiny_model.tokenizer,
        tiny_model.cfg,
        target_masks=[np.ones(rng_image.shape[:2], bool)],
    )
    (pred,) = predictor.teacher_forced([forced])
    assert calls == [1] and cache.misses == 1 and cache.hits == 2 and len(pred.masks) == 1
    predictor.predict(255 - rng_image, "Where is it?", max_new_tokens=2)
    assert calls == [1, 1] and len(cache.memory) == 2

    one_image = cache.memory.nbytes // 2
    small = EmbeddingCache(None, tiny_model, memory_bytes=one_image)
    items = [
        encode_sample([Turn(role="human", text="What is this?")], img, tiny_model.tokenizer, tiny_model.cfg)
        for img in (rng_image, 255 - rng_image, rng_image)
    ]
    small.fill(items)
    assert small.misses == 2 and len(small.memory) == 1 and small.memory.nbytes == one_image
    assert items[2].sam_embedding is items[0].sam_embedding  # one image, encoded once within the call


def test_lora_merge_matches_unmerged_outputs(all_tasks, tiny_model, make_batch):
    prepare_trainable(
        tiny_model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), []
    )
    with torch.no_grad():  # LoRA B starts at zero; move it so the merge has something to fold in
        for name, p in tiny_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    tiny_model.eval()
    batch = make_batch(tiny_model, list(all_tasks.values()))
    with torch.no_grad():
        unmerged = tiny_model(batch, all_logits=True)["logits"]
    merge_lora(tiny_model)
    assert not any("lora_" in n for n, _ in tiny_model.named_parameters())
    with torch.no_grad():
        merged = tiny_model(batch, all_logits=True)["logits"]
    torch.testing.assert_close(unmerged, merged, atol=1e-5, rtol=1e-5)


def test_save_refuses_unmerged_lora(tmp_path, tiny_model):
    prepare_trainable(tiny_model, LoraSettings(), [])
    with pytest.raises(ValueError, match="merge_lora"):
        tiny_model.save_pretrained(tmp_path / "m")


# ---------------------------------------------------------------- geometry and edge cases


def test_generation_uses_the_kv_cache_and_matches_full_recompute(rng_image, tiny_model, make_batch):
    from medplib.data.batch import collate, encode_sample

    tiny_model.eval()
    cfg = tiny_model.cfg
    prompt = encode_sample(
        [Turn(role="human", text="What is this?")], rng_image, tiny_model.tokenizer, cfg, for_generation=True
    )
    short = encode_sample(
        [Turn(role="human", text="Hi")], None, tiny_model.tokenizer, cfg, for_generation=True
    )
    batch = collate([prompt, short], cfg, tiny_model.ids.pad)
    gens = tiny_model.generate(batch, max_new_tokens=6)
    # Recompute greedily without a cache, one sample at a time, and compare tokens.
    for enc, gen in zip([prompt, short], gens, strict=True):
        ids = list(enc.input_ids)
        for tok in gen.token_ids:
            enc.input_ids = ids
            enc.labels = [-100] * len(ids)
            logits = tiny_model(collate([enc], cfg, tiny_model.ids.pad), all_logits=True)["logits"][0, -1]
            assert int(logits.argmax()) == tok
            ids = ids + [tok]


def test_rows_group_by_the_prefix_that_saves_the_most_positions():
    from medplib.model.medplib import MIN_SHARED_POSITIONS, shared_prefixes

    assert MIN_SHARED_POSITIONS == 128  # the figures below are set around it
    emb = torch.randn(5, 300, 4)
    emb[:, :40] = emb[0, :40]  # a prompt every row opens with: 4 * 40 positions saved
    emb[2, :100] = emb[0, :100]  # rows 0 and 2 show one image, 1 and 3 another: 2 * 100
    emb[3, 40:100] = emb[1, 40:100]
    am = torch.ones(5, 300, dtype=torch.long)
    length, group, first = shared_prefixes(emb, am)
    assert length == 100 and group[0] == group[2] != group[1] == group[3] and len(set(group.tolist())) == 3
    assert first[group].tolist() == [0, 1, 0, 1, 4]
    emb[2, 99, 1] += 1e-6
    assert shared_prefixes(emb, am)[0] == 99
    am[4, 60:] = 0  # the shortest row keeps its last token: images up to 59 save 2 * 59, the prompt 4 * 40
    length, group, first = shared_prefixes(emb, am)
    assert length == 40 and group.tolist() == [0] * 5 and first.tolist() == [0]
    assert shared_prefixes(emb[:1], am[:1]) is None  # one row shares nothing
    assert shared_prefixes(emb[:, :30], am[:, :30]) is None  # 4 * 29 positions are not worth a call


def _without_shared_prefix(monkeypatch):
    import medplib.model.medplib as core

    monkeypatch.setattr(core, "shared_prefixes", lambda emb, am: None)


def test_rows_about_one_image_run_it_once_and_train_as_the_whole_batch(
    all_tasks, tiny_model, make_batch, monkeypatch
):
    """Rows about one image run their prompt and image once, and the rest of each row on that prefix's KV cache:
    the same losses, teacher-forced masks and gradients (LoRA, projector, mask decoder) as
    running every row whole."""
    import copy

    prepare_trainable(
        tiny_model,
        LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj"]),
        ["mask_decoder", "text_hidden_fcs", "region_fea_adapter", "mm_projector"],
    )
    for p in tiny_model.parameters():  # LoRA's B starts at zero, which would hide a wrong A gradient
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.02)
    whole = copy.deepcopy(tiny_model)
    image, mask = all_tasks["ground_one"][1:3]
    other = np.ascontiguousarray(image[::-1])
    # Two images, each asked one question thrice: with `tiny`'s byte tokens only prompt, image and question
    # together save more than the ~165-position system prompt of every row.
    items = [(_sample("What modality is this?", a), image, []) for a in ("MRI.", "An MRI.", "T1 MRI.")]
    items += [
        (_sample("Segment the brain.", a), other, mask)
        for a in ("Sure, it is <SEG>.", "It is <SEG>.", "<SEG>")
    ]
    batch = make_batch(tiny_model, items)
    shared = tiny_model(batch)
    with monkeypatch.context() as m:
        _without_shared_prefix(m)
        plain = whole(batch)
    image_end = int((batch["input_ids"][0] == tiny_model.ids.image).nonzero().max())
    saved = int(shared["shared_tokens"])  # (6 rows - 2 prefixes) x a prefix past the image
    assert saved % 4 == 0 and saved // 4 > image_end + 1 and int(plain["shared_tokens"]) == 0
    for name in ("loss", "ce", "bce", "dice", "focal", "iou", "box"):
        torch.testing.assert_close(shared[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)
    for got, expected in zip(shared["segmentation"].logits, plain["segmentation"].logits, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    shared["loss"].backward()
    plain["loss"].backward()
    for (name, p), q in zip(tiny_model.named_parameters(), whole.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-3, msg=name)
    # Checkpointed layers would drop the prefix's cache: the batch then runs whole.
    whole.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = whole(batch)
    assert int(checkpointed["shared_tokens"]) == 0
    torch.testing.assert_close(checkpointed["loss"], plain["loss"])


def test_moe_layers_run_a_loss_pass_whole_and_share_a_prompt_only_without_dropping(
    tiny_cfg, all_tasks, make_batch
):
    """Routers keep their last call's outputs for the routing losses, and a capacity counts a call's tokens."""
    from medplib.data.batch import collate, encode_sample
    from medplib.model.medplib import MedPLIB

    model = init_experts_from_stages(
        MedPLIB(tiny_cfg), MedPLIB(tiny_cfg), MoEConfig(num_experts=2, drop_tokens=False), ("vl", "grounding")
    ).eval()
    assert int(model(make_batch(model, [all_tasks["vqa"], all_tasks["ground_one"]]))["shared_tokens"]) == 0
    prompts = [
        encode_sample(
            [Turn(role="human", text=q)], all_tasks["vqa"][1], model.tokenizer, model.cfg, for_generation=True
        )
        for q in ("What is this?", "Hi")
    ]
    batch = collate(prompts, model.cfg, model.ids.pad)
    calls: list[int] = []
    decoder = model.llm.get_decoder()
    hook = decoder.register_forward_pre_hook(
        lambda _, args, kw: calls.append(kw["inputs_embeds"].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        model.generate(batch, max_new_tokens=1)
        for m in model.moe_ffns:
            m.cfg = m.cfg.model_copy(update={"drop_tokens": True})
        model.generate(batch, max_new_tokens=1)
    hook.remove()
    # The prompt's prefix as a batch of one, then the rows; with dropping, the rows whole.
    assert calls == [1, 2, 2]


def test_generation_on_a_shared_prompt_decodes_what_whole_prompts_decode(rng_image, tiny_model, monkeypatch):
    from medplib.data.batch import collate, encode_sample

    tiny_model.eval()
    cfg = tiny_model.cfg
    questions = ["What is this?", "Hi", "Where is the lesion? Please output the segmentation mask."]
    prompts = [
        encode_sample([Turn(role="human", text=q)], rng_image, tiny_model.tokenizer, cfg, for_generation=True)
        for q in questions
    ]
    batch = collate(prompts, cfg, tiny_model.ids.pad)
    with torch.no_grad():
        shared = tiny_model.generate(batch, max_new_tokens=6, segment=True)
        with monkeypatch.context() as m:
            _without_shared_prefix(m)
            whole = tiny_model.generate(batch, max_new_tokens=6, segment=True)
    assert [g.token_ids for g in shared] == [g.token_ids for g in whole]
    for a, b in zip(shared, whole, strict=True):
        torch.testing.assert_close(
            torch.stack(a.mask_logits), torch.stack(b.mask_logits), atol=1e-4, rtol=1e-4
        )


def test_answers_teacher_forced_on_the_kv_cache_give_the_forward_passes_masks(rng_image, tiny_model):
    """`generate(answers=...)` runs each answer after its prompt on the prompt's KV cache: the hidden states that
    prompt the mask decoder for its `<SEG>`s (one opening the answer, one inside it) are the teacher-forced
    forward pass's over prompt and answer, for prompts of different lengths in one batch, and so are the masks;
    the generation itself is unchanged (the cache is cropped back to the prompt)."""
    from medplib.data.batch import collate, encode_sample

    tiny_model.eval()
    cfg, tok = tiny_model.cfg, tiny_model.tokenizer
    answers = [f"{SEG_TOKEN} and then {SEG_TOKEN}.", f"It is {SEG_TOKEN}."]
    questions = ["Segment both lesions.", "Where is the liver in this abdominal slice, please?"]
    target = np.ones(rng_image.shape[:2], bool)
    full = [
        encode_sample(
            [Turn(role="human", text=q), Turn(role="gpt", text=a)],
            rng_image,
            tok,
            cfg,
            target_masks=[target] * a.count(SEG_TOKEN),
        )
        for q, a in zip(questions, answers, strict=True)
    ]
    prompts = [
        encode_sample([Turn(role="human", text=q)], rng_image, tok, cfg, for_generation=True)
        for q in questions
    ]
    answer_ids = []
    for enc, prompt in zip(full, prompts, strict=True):
        assert enc.input_ids[: len(prompt.input_ids)] == prompt.input_ids
        rest = enc.input_ids[len(prompt.input_ids) :]
        answer_ids.append(rest[: rest.index(tiny_model.ids.eos)])
    assert answer_ids[0][0] == tiny_model.ids.seg and answer_ids[1][0] != tiny_model.ids.seg
    prompted: list[torch.Tensor] = []  # the hidden states each mask decoder call is given
    segment = tiny_model.segment
    tiny_model.segment = lambda batch, rows, hidden: prompted.append(hidden) or segment(batch, rows, hidden)
    try:
        with torch.no_grad():
            seg = tiny_model(collate(full, cfg, tiny_model.ids.pad))["segmentation"]
            plain = tiny_model.generate(
                collate(prompts, cfg, tiny_model.ids.pad), max_new_tokens=4, segment=True
            )
            gens = tiny_model.generate(
                collate(prompts, cfg, tiny_model.ids.pad), max_new_tokens=4, segment=True, answers=answer_ids
            )
    finally:
        del tiny_model.segment
    teacher, generated, both = prompted
    assert [g.token_ids for g in gens] == [g.token_ids for g in plain] and not any(
        g.token_ids == a for g, a in zip(gens, answer_ids, strict=True)
    )
    torch.testing.assert_close(both[: len(generated)], generated)
    torch.testing.assert_close(both[len(generated) :], teacher, atol=1e-5, rtol=1e-4)
    assert [len(g.forced_mask_logits) for g in gens] == [2, 1] and seg.rows == [0, 0, 1]
    forced = [m for g in gens for m in g.forced_mask_logits]
    for got, expected in zip(forced, seg.logits, strict=True):
        torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-4)


def test_masks_without_a_graph_are_decoded_a_few_a_call_as_one_call_decodes_them(
    rng_image, tiny_model, monkeypatch
):
    """Without autograd (generation, a teacher-forced pass at inference) the mask decoder gets `MASKS_PER_DECODE`
    masks a call: its 4,096 image tokens a mask made one call over a batch a few hundred MB of fresh memory. The
    masks are one call's; with a graph (training) all go in one call, so training is unchanged."""
    from medplib.data.batch import collate, encode_sample
    from medplib.model import medplib as medplib_module

    tiny_model.eval()
    cfg, tok = tiny_model.cfg, tiny_model.tokenizer
    questions = [f"Segment region {k}." for k in range(7)]
    prompts = [
        encode_sample([Turn(role="human", text=q)], rng_image, tok, cfg, for_generation=True)
        for q in questions
    ]
    target = np.ones(rng_image.shape[:2], bool)
    full = [
        encode_sample(
            [Turn(role="human", text=q), Turn(role="gpt", text=f"It is {SEG_TOKEN}.")],
            rng_image,
            tok,
            cfg,
            target_masks=[target],
        )
        for q in questions
    ]
    batch, full_batch = collate(prompts, cfg, tiny_model.ids.pad), collate(full, cfg, tiny_model.ids.pad)
    answers = [[tiny_model.ids.seg]] * len(prompts)  # a teacher-forced mask per row beside the generated one
    per_call = medplib_module.MASKS_PER_DECODE
    sizes: list[int] = []
    decode = tiny_model.sam.decode
    monkeypatch.setattr(
        tiny_model.sam, "decode", lambda emb, sparse: sizes.append(len(sparse)) or decode(emb, sparse)
    )

    def run() -> tuple[list, torch.Tensor, list[int], list[int]]:
        sizes.clear()
        with torch.no_grad():
            gens = tiny_model.generate(batch, max_new_tokens=3, segment=True, answers=answers)
            forced = tiny_model(dict(full_batch, sam_embeddings={}))["segmentation"].logits
        calls = list(sizes)
        sizes.clear()
        tiny_model(dict(full_batch, sam_embeddings={}))  # with a graph
        return gens, torch.stack(forced), calls, list(sizes)

    few, few_forced, calls, graph_calls = run()
    monkeypatch.setattr(medplib_module, "MASKS_PER_DECODE", 1000)
    one, one_forced, one_calls, _ = run()
    masks = sum(len(g.mask_logits) + len(g.forced_mask_logits) for g in few)
    assert sum(calls) == masks + len(full) and max(calls) == per_call
    assert one_calls == [masks, len(full)] and graph_calls == [len(full)]
    torch.testing.assert_close(few_forced, one_forced, atol=1e-5, rtol=1e-5)
    for a, b in zip(few, one, strict=True):
        assert a.token_ids == b.token_ids
        got, want = a.mask_logits + a.forced_mask_logits, b.mask_logits + b.forced_mask_logits
        torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-5, rtol=1e-5)


def test_generation_attention_is_the_fused_kernels_in_fp32():
    """A decoding step's attention (one query, grouped KV heads, a padded row) agrees with PyTorch's fused kernel
    to fp32 rounding, in fp32 and under bf16 autocast; a pass over many queries is the fused kernel's own."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from medplib.model.attention import generation_attention

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    b, heads, kv_heads, d, length = 2, 6, 2, 16, 9
    key, value = torch.randn(b, kv_heads, length, d), torch.randn(b, kv_heads, length, d)
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :4] = False  # row 1 is left-padded
    query = torch.randn(b, heads, 1, d)
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, enable_gqa=True
    ).transpose(1, 2)
    for m in (mask, None):
        out, _ = generation_attention(module, query, key, value, m, scaling=d**-0.5)
        expected = (
            reference
            if m is not None
            else torch.nn.functional.scaled_dot_product_attention(
                query, key, value, enable_gqa=True
            ).transpose(1, 2)
        )
        assert out.shape == (b, 1, heads, d)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = generation_attention(module, query.bfloat16(), key.bfloat16(), value.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)
    prompt = torch.randn(b, heads, 5, d)
    causal = torch.ones(5, length, dtype=torch.bool).tril(diagonal=length - 5)[None, None] & mask
    out, _ = generation_attention(module, prompt, key, value, causal, scaling=d**-0.5)
    fused, _ = sdpa_attention_forward(module, prompt, key, value, causal, scaling=d**-0.5)
    assert torch.equal(out, fused)


def test_generation_decodes_its_steps_with_the_generation_attention(rng_image, tiny_model, monkeypatch):
    """generate() runs the prompt and every later step through `generation_attention`; the forward pass keeps the
    preset's kernel (tiny: eager) where it computes gradients, and takes the fused one where it does not."""
    from medplib.data.batch import collate, encode_sample
    from medplib.model import attention

    seen: list[int] = []
    original = attention.generation_attention

    def spy(module, query, *args, **kwargs):
        seen.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    monkeypatch.setitem(attention.AttentionInterface._global_mapping, attention.GENERATION_ATTENTION, spy)
    tiny_model.eval()
    cfg = tiny_model.cfg
    prompt = encode_sample(
        [Turn(role="human", text="What is this?")], rng_image, tiny_model.tokenizer, cfg, for_generation=True
    )
    tiny_model.generate(collate([prompt], cfg, tiny_model.ids.pad), max_new_tokens=3)
    layers = cfg.llm.num_layers
    steps = len(seen) // layers
    assert len(seen) == steps * layers and seen[0] == len(prompt.input_ids) and set(seen[layers:]) == {1}
    assert tiny_model.llm.config._attn_implementation == attention.GENERATION_ATTENTION
    batch = collate([prompt], cfg, tiny_model.ids.pad)
    tiny_model(batch)
    assert tiny_model.llm.config._attn_implementation == cfg.llm.attention == "eager"
    with torch.no_grad():
        tiny_model(batch)
    assert tiny_model.llm.config._attn_implementation == "sdpa"


def test_generation_drops_finished_rows_and_the_others_decode_the_same(rng_image, tiny_model, monkeypatch):
    from transformers import DynamicCache

    from medplib.data.batch import collate, encode_sample

    tiny_model.eval()
    cfg = tiny_model.cfg
    questions = ["What is this?", "Hi", "Where is the lesion?", "Describe the image."]
    prompts = [
        encode_sample([Turn(role="human", text=q)], rng_image, tiny_model.tokenizer, cfg, for_generation=True)
        for q in questions
    ]
    batch = collate(prompts, cfg, tiny_model.ids.pad)
    whole = tiny_model.generate(batch, max_new_tokens=8, segment=True)
    kept: list[list[int]] = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(
        DynamicCache,
        "batch_select_indices",
        lambda cache, idx: (kept.append(idx.tolist()), select(cache, idx))[1],
    )
    steps: list[list[int | None]] = []

    def finish_three(step: list[int | None]) -> list[int]:  # a stop string ending rows 0-2 after one token
        steps.append(step)
        return [0, 1, 2] if len(steps) == 1 else []

    cut = tiny_model.generate(batch, max_new_tokens=8, segment=True, on_step=finish_three)
    # The shared prompt's cache handed to the 4 rows, then the batch shrank to the one row still decoding.
    assert kept == [[0, 0, 0, 0], [3]]
    assert [len(g.token_ids) for g in cut[:3]] == [1, 1, 1]
    assert all(step[:3] == [None, None, None] for step in steps[1:])
    assert cut[3].token_ids == whole[3].token_ids and cut[3].text == whole[3].text
    assert torch.allclose(cut[3].mask_logits[0], whole[3].mask_logits[0], atol=1e-4)


def test_masks_come_back_at_the_original_size_for_odd_aspect_ratios(tiny_model, make_batch):
    tiny_model.eval()
    for h, w in [(30, 90), (90, 30), (17, 17)]:
        image = np.full((h, w, 3), 100, dtype=np.uint8)
        batch = make_batch(tiny_model, [(_sample("Segment.", "<SEG>"), image, [np.ones((h, w), bool)])])
        gens = tiny_model.generate({**batch, "input_ids": batch["input_ids"]}, max_new_tokens=2, segment=True)
        assert gens[0].mask_logits[0].shape == (h, w)


def test_unpad_maps_view_pixels_back_without_stretching():
    # A 20x60 image in a 64-px centre-padded view: a square marked in the view must land on the same image
    # pixels (upstream stretched the padded square over the image).
    geo = Geometry.fit(20, 60, 64, "center")
    view = torch.full((64, 64), -10.0)
    top, left = geo.pad_top, geo.pad_left
    view[top : top + geo.resized_h, left : left + geo.resized_w // 2] = 10.0  # left half of the image
    mask = unpad_mask_logits(view, geo) > 0
    assert mask.shape == (20, 60)
    assert mask[:, :28].all() and not mask[:, 32:].any()


def test_tiny_regions_do_not_vanish_on_the_patch_grid():
    view = torch.zeros(64, 64, dtype=torch.bool)
    view[30, 41] = True  # one pixel: far below a 16-px patch
    cells = region_cells(view, grid=4, min_coverage=0.5, max_points=512)
    assert cells.tolist() == [1 * 4 + 2]


def test_region_far_smaller_than_a_patch_still_trains(rng_image, tiny_model, make_batch):
    sample = _sample("What is at <region></region>?", "A dot.", regions=[Point(x=79, y=47)])
    out = tiny_model(make_batch(tiny_model, [(sample, rng_image, [])]))
    assert torch.isfinite(out["loss"]) and out["ce"] > 0


def test_region_position_starts_silent_and_then_tells_left_from_right(tiny_cfg, rng_image, make_batch):
    """`region.position`: built with the same random draws as the model without it and its extra adapter columns
    at zero, so the untrained region token is unchanged; once those columns train, a region on the left and one
    on the right differ by what the formula says (SAM's encoding of the cells' centres, averaged, through them)."""
    from medplib.model.medplib import MedPLIB

    assert not tiny_cfg.region.position  # off in every preset (README: measured, not yet a win end to end)
    position = tiny_cfg.model_copy(update={"region": tiny_cfg.region.model_copy(update={"position": True})})
    torch.manual_seed(0)
    with_pos = MedPLIB(position)
    torch.manual_seed(0)
    without = MedPLIB(tiny_cfg)
    h, w = rng_image.shape[:2]
    items = [
        (_sample("Which side is <region></region>?", "Left."), rng_image, [], [_mask(h, w, 10, 30, 2, 20)]),
        (_sample("Which side is <region></region>?", "Right."), rng_image, [], [_mask(h, w, 10, 30, 60, 78)]),
    ]
    batch = make_batch(with_pos, items)
    vdim = without.region_fea_adapter.in_features
    assert with_pos.region_fea_adapter.in_features == vdim + position.sam.prompt_embed_dim
    with torch.no_grad():
        assert torch.equal(with_pos.embed(batch), without.embed(batch))
        with_pos.region_fea_adapter.weight[:, vdim:] = torch.randn_like(
            with_pos.region_fea_adapter.weight[:, vdim:]
        )
        at = batch["input_ids"] == with_pos.ids.region_feature
        moved = (with_pos.embed(batch) - without.embed(batch))[at]
    grid = tiny_cfg.vision.grid
    cell_pe = with_pos.sam.prompt_encoder.pe_layer.grid(grid).flatten(1).T
    for k, masks in enumerate(batch["region_masks"]):
        cells = region_cells(
            masks[0], grid, tiny_cfg.region.min_cell_coverage, tiny_cfg.region.max_sample_points
        )
        expected = with_pos.region_fea_adapter.weight[:, vdim:] @ cell_pe[cells].mean(0)
        torch.testing.assert_close(moved[k], expected.detach())
    assert (moved[0] - moved[1]).abs().max() > 1e-3

    out = with_pos(batch)
    out["loss"].backward()
    assert with_pos.region_fea_adapter.weight.grad[:, vdim:].abs().sum() > 0


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_errors_naming_the_problem(tmp_path, rng_image, tiny_model, make_batch):
    from medplib.inference import Predictor

    predictor = Predictor(tiny_model)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="^image: .*broken.png"):
        predictor.predict(str(bad), "What is this?")
    with pytest.raises(ValueError, match=r"^regions\[1\]: .*outside"):
        predictor.encode(
            rng_image, "<region> or <region>?", [Point(x=1, y=1), Box(x0=10, y0=10, x1=500, y1=20)]
        )
    with pytest.raises(ValueError, match=r"^regions\[0\]: .*empty"):
        predictor.predict(rng_image, "What is in <region>?", [np.zeros(rng_image.shape[:2], bool)])
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        load_model_config("huge")
    with pytest.raises(ValueError, match="^question: .*2 <region> markers but 1 region prompts"):
        predictor.predict(rng_image, "<region> and <region>?", [Point(x=1, y=1)])


def test_predictor_returns_text_masks_and_timings(rng_image, tiny_model):
    from medplib.inference import Predictor

    pred = Predictor(tiny_model).predict(
        rng_image, "Segment it.", [Point(x=10, y=10)], max_new_tokens=4, segment=True
    )
    assert isinstance(pred.text, str)
    assert len(pred.masks) == 1 and pred.masks[0].shape == rng_image.shape[:2] and pred.masks[0].dtype == bool
    assert pred.timings["total_s"] >= pred.timings["generate_s"] > 0


def test_a_trained_llava_projector_loads_from_a_file_or_the_base_weights_folder(tmp_path, tiny_cfg):
    """`projector_weights` (LLaVA's mm_projector file) and a base-weights folder holding one (LLaVA-1.5's or the
    llava-hf layout) load into mm_projector; without either the projector is random and says so."""
    from safetensors.torch import save_file

    from medplib.model.medplib import MedPLIB

    torch.manual_seed(0)
    reference = MedPLIB(tiny_cfg)
    assert reference.projector_source is None
    trained = {k: torch.randn_like(v) for k, v in reference.mm_projector.state_dict().items()}
    save_file(
        {f"model.mm_projector.{k}": v for k, v in trained.items()}, str(tmp_path / "mm_projector.safetensors")
    )
    model = MedPLIB(
        tiny_cfg.model_copy(update={"projector_weights": str(tmp_path / "mm_projector.safetensors")})
    )
    assert model.projector_source and all(
        torch.equal(model.mm_projector.state_dict()[k], v) for k, v in trained.items()
    )
    hf = {"multi_modal_projector.linear_1." + k[2:]: v for k, v in trained.items() if k.startswith("0.")}
    hf |= {"multi_modal_projector.linear_2." + k[2:]: v for k, v in trained.items() if k.startswith("2.")}
    (tmp_path / "llava-hf").mkdir()
    save_file(hf, str(tmp_path / "llava-hf" / "model-00001-of-00001.safetensors"))
    from medplib.model.weights import projector_state

    assert all(torch.equal(projector_state(tmp_path / "llava-hf")[k], v) for k, v in trained.items())
    empty = tmp_path / "empty.safetensors"
    save_file({"other.weight": torch.zeros(2)}, str(empty))
    with pytest.raises(ValueError, match="projector_weights"):
        MedPLIB(tiny_cfg.model_copy(update={"projector_weights": str(empty)}))


def test_frozen_linears_in_bf16_give_the_autocast_loss(all_tasks, tiny_model, make_batch):
    from medplib.model.lora import frozen_linears_to_bf16

    prepare_trainable(
        tiny_model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "down_proj"]), ["mm_projector"]
    )
    tiny_model.eval()
    batch = make_batch(tiny_model, list(all_tasks.values()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = tiny_model(batch)["loss"]
    cast = frozen_linears_to_bf16(tiny_model)
    assert cast > 0
    dtypes = {n: p.dtype for n, p in tiny_model.named_parameters()}
    assert all(dtypes[n] == torch.float32 for n, p in tiny_model.named_parameters() if p.requires_grad)
    assert dtypes["llm.base_model.model.model.embed_tokens.weight"] == torch.float32  # tied to lm_head
    assert any(d == torch.bfloat16 for d in dtypes.values())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = tiny_model(batch)["loss"]
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)


class _VocabularyTensors(TorchDispatchMode):
    """Counts the vocabulary-sized matrices (`rows` rows) that PyTorch's operators make inside the block."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows, self.made = rows, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.made += sum(
            isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == self.rows for t in outs
        )
        return out


@pytest.mark.parametrize(
    "autocast",
    [
        False,
        pytest.param(True, marks=pytest.mark.skipif(not has_bf16_kernels(), reason="no bf16 kernels")),
    ],
)
@pytest.mark.parametrize("layers", [None, 1], ids=["input-and-output-rows", "output-rows-only"])
@pytest.mark.parametrize("padding", [False, True], ids=["no-padding-idx", "padding-idx"])
def test_added_token_rows_train_as_peft_trains_them_to_the_bit_without_copying_the_vocabulary(
    tiny_cfg, all_tasks, make_batch, autocast, layers, padding
):
    """The stages' `new_token_rows` run through `_token_rows_forward`: peft's losses and gradients to the bit over
    two steps (the second after an update of the rows), making fewer vocabulary-sized matrices a step. With
    `padding` the embedding has a padding_idx, as a model loaded from an export (the later stages') has."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    from medplib.model.medplib import MedPLIB

    cfg = tiny_cfg.model_copy(update={"llm": tiny_cfg.llm.model_copy(update={"tie_word_embeddings": True})})
    lora = LoraSettings(
        r=4, alpha=8, dropout=0.0, target_modules=["down_proj"], layers=layers, new_token_rows=True
    )
    models = {}
    for way in ("ours", "peft"):
        torch.manual_seed(0)
        models[way] = MedPLIB(cfg)
        if padding:  # an added token's row, so its gradient from the embedding side has to come out zero
            models[way].llm.get_input_embeddings().padding_idx = models[way].ids.seg
        prepare_trainable(models[way], lora, ["mm_projector"])
        wrapped = [m for m in models[way].llm.modules() if isinstance(m, TrainableTokensLayer)]
        assert len(wrapped) == 2  # the embedding and the tied lm_head
        if way == "peft":
            for module in wrapped:
                del module.forward  # the class's own forward again
    batch = make_batch(models["ours"], list(all_tasks.values()))
    vocab = models["ours"].llm.get_input_embeddings().weight.shape[0]
    # Two threads add some fp32 gradients in no fixed order (peft against peft differed now and then at layer 0),
    # so PyTorch's deterministic algorithms here: with them peft against peft is equal to the bit every time.
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            made, losses, grads = {}, {}, {}
            for way, model in models.items():
                model.zero_grad(set_to_none=True)
                with _VocabularyTensors(vocab) as counter:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        loss = model(batch)["loss"]
                    loss.backward()
                made[way] = counter.made
                losses[way] = loss.detach()
                grads[way] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            assert torch.equal(losses["ours"], losses["peft"])
            assert grads["ours"].keys() == grads["peft"].keys()
            assert any("trainable_tokens_delta" in name for name in grads["ours"])
            for name, grad in grads["ours"].items():
                assert grad is not None and torch.equal(grad, grads["peft"][name]), name
            assert made["ours"] < made["peft"]
            with torch.no_grad():
                for model in models.values():
                    for p in model.parameters():
                        if p.grad is not None:
                            p -= 0.1 * p.grad
    finally:
        torch.use_deterministic_algorithms(deterministic)
