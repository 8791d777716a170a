"""`medplib.model.packed_linear`: bf16 inference linears on a packed weight give autocast's products bit for bit;
fp32 ones give nn.Linear's to rounding, each row the same at any row count."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from medplib.cpu import has_bf16_kernels
from medplib.data.batch import collate, encode_sample
from medplib.data.schema import Turn
from medplib.model.packed_linear import PackedLinear, pack_linears

BF16 = has_bf16_kernels()
needs_bf16 = pytest.mark.skipif(
    not BF16,
    reason="no oneDNN bf16 kernels on this CPU: the bf16 path cannot run here (the fp32 tests run the packing)",
)


def test_only_plain_linears_are_packed():
    """Every exact `nn.Linear`, none of its subclasses (they may have a forward of their own)."""

    class Custom(nn.Linear):
        pass

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Custom(4, 4), nn.Sequential(nn.Linear(4, 2)))
    assert pack_linears(net) == 2
    assert [type(m).__name__ for m in net.modules() if isinstance(m, nn.Linear)] == [
        "PackedLinear",
        "Custom",
        "PackedLinear",
    ]


def _layers(bias: bool, out_features: int = 80) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    plain = nn.Linear(48, out_features, bias=bias)
    packed = copy.deepcopy(plain)
    assert pack_linears(packed) == 1 and type(packed) is PackedLinear
    return plain, packed


def _bf16(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(x)


@needs_bf16
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (16, 48), (3, 7, 48)])
def test_packed_products_equal_autocast_bit_for_bit(bias, shape):
    plain, packed = _layers(bias)
    x = torch.randn(*shape)
    want, got = _bf16(plain, x), _bf16(packed, x)
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.bfloat16 in packed._packed  # the packed path ran
    assert packed.state_dict().keys() == plain.state_dict().keys()


@needs_bf16
def test_other_calls_are_nn_linear_and_a_changed_weight_is_packed_again():
    plain, packed = _layers(True)
    x = torch.randn(5, 48)
    assert torch.equal(packed(x), plain(x))  # fp32, with a gradient to record
    assert packed._packed is None
    _bf16(packed, x)
    with torch.no_grad():
        for layer in (plain, packed):
            layer.weight.mul_(-2.0)  # in place, as an optimiser step or load_state_dict
            layer.bias.add_(1.0)
    assert torch.equal(_bf16(packed, x), _bf16(plain, x))
    packed.weight = nn.Parameter(plain.weight.detach().clone() * 3)
    plain.weight = nn.Parameter(plain.weight.detach().clone() * 3)
    assert torch.equal(_bf16(packed, x), _bf16(plain, x))


@needs_bf16
def test_a_used_layer_copies_and_pickles_without_its_packed_weight():
    _, packed = _layers(True)
    x = torch.randn(4, 48)
    want = _bf16(packed, x)
    for again in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert again._packed is None
        assert torch.equal(_bf16(again, x), want)


@needs_bf16
def test_the_predictor_decodes_on_packed_linears_and_answers_the_same(rng_image, tiny_model):
    from medplib.inference import Predictor

    predictor = Predictor(tiny_model)
    assert predictor.autocast
    packed = [m for m in tiny_model.modules() if type(m) is PackedLinear]
    assert packed and not any(type(m) is nn.Linear for m in tiny_model.llm.modules())
    cfg = tiny_model.cfg
    prompts = [
        encode_sample([Turn(role="human", text=q)], rng_image, tiny_model.tokenizer, cfg, for_generation=True)
        for q in ("What is this?", "Where is the lesion?", "Describe the image.")
    ]
    batch = collate(prompts, cfg, tiny_model.ids.pad)
    with predictor._inference():
        got = tiny_model.generate(batch, max_new_tokens=12, segment=True)
    assert torch.bfloat16 in tiny_model.llm.get_output_embeddings()._packed  # the LM head ran packed
    for m in packed:
        m.__class__ = nn.Linear
    with predictor._inference():
        want = tiny_model.generate(batch, max_new_tokens=12, segment=True)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    for a, b in zip(got, want, strict=True):
        assert len(a.mask_logits) == len(b.mask_logits)
        assert all(torch.equal(x, y) for x, y in zip(a.mask_logits, b.mask_logits, strict=True))


# ---- fp32: a CPU without bf16 kernels runs inference in fp32, on oneDNN where a product has enough outputs


@pytest.mark.parametrize("bias", [True, False])
def test_fp32_products_match_nn_linear_and_each_row_is_the_same_at_any_row_count(bias):
    plain, packed = _layers(bias, out_features=4096)  # one row already reaches _FP32_MIN_OUTPUTS
    x = torch.randn(3, 9, 48)
    with torch.no_grad():
        want, got = plain(x), packed(x)
        alone = [packed(row[None]) for row in x.reshape(-1, 48)]
    assert torch.float32 in packed._packed and got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # MKL's few-row products round otherwise than its many-row ones; oneDNN's do not.
    assert all(torch.equal(a[0], b) for a, b in zip(alone, got.reshape(-1, 4096), strict=True))


def test_fp32_small_products_training_and_other_dtypes_stay_nn_linear():
    plain, packed = _layers(True)  # 80 outputs a row
    x = torch.randn(5, 48)
    with torch.no_grad():
        assert torch.equal(packed(x), plain(x))  # 400 outputs: MKL is faster there
        assert torch.equal(packed.double()(x.double()), plain.double()(x.double()))
    packed.float()
    y = packed(torch.randn(64, 48))  # a gradient to record
    y.sum().backward()
    assert packed._packed is None and packed.weight.grad is not None


def test_fp32_packed_weight_follows_changes_and_is_not_copied():
    plain, packed = _layers(True, out_features=4096)
    x = torch.randn(2, 48)
    with torch.no_grad():
        packed(x)
        for layer in (plain, packed):
            layer.weight.mul_(-2.0)
            layer.bias.add_(1.0)
        torch.testing.assert_close(packed(x), plain(x), rtol=1e-5, atol=1e-5)
        want = packed(x)
        for again in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
            assert again._packed is None
            assert torch.equal(again(x), want)


def test_the_fp32_predictor_packs_the_llm_and_scores_as_before(rng_image, tiny_model):
    """Without autocast the Predictor packs the LLM's linears too; its logits are nn.Linear's to rounding."""
    from medplib.inference import Predictor

    cfg = tiny_model.cfg
    prompts = [
        encode_sample([Turn(role="human", text=q)], rng_image, tiny_model.tokenizer, cfg, for_generation=True)
        for q in ("What is this?", "Where is the lesion?")
    ]
    batch = collate(prompts, cfg, tiny_model.ids.pad)
    predictor = Predictor(tiny_model, autocast=False)
    packed = [m for m in tiny_model.modules() if type(m) is PackedLinear]
    assert packed and not any(type(m) is nn.Linear for m in tiny_model.llm.modules())
    head = tiny_model.llm.get_output_embeddings()
    with predictor._inference():
        got = tiny_model(batch, all_logits=True)["logits"]
        tiny_model.generate(batch, max_new_tokens=4)
    assert torch.float32 in head._packed  # the logits of every position: 2 rows x ~100 x 267 outputs
    for m in packed:
        m.__class__ = nn.Linear
    with predictor._inference():
        want = tiny_model(batch, all_logits=True)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
