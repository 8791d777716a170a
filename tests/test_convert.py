"""`medplib convert-upstream`: a tiny MoE model written in upstream MedPLIB key names round-trips exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from medplib.model.config import load_model_config
from medplib.model.convert import KEY_RULES, convert_upstream, from_upstream, read_checkpoint, to_upstream
from medplib.model.medplib import MedPLIB


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A tiny MoE model (2 experts in both layers), its config file, and its weights in upstream names, perturbed
    so that nothing can pass by coinciding with a fresh random init."""
    cfg = load_model_config("tiny")
    cfg = cfg.model_copy(update={"name": "tiny-moe", "moe": cfg.moe.model_copy(update={"enabled": True})})
    cfg_path = tmp_path_factory.mktemp("cfg") / "tiny_moe.json"
    cfg.save(cfg_path)
    torch.manual_seed(0)
    model = MedPLIB(cfg)
    gen = torch.Generator().manual_seed(1)
    upstream = {
        k: (v + 0.1 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v.clone()
        for k, v in to_upstream(model.state_dict()).items()
    }
    return model, cfg_path, upstream


def _write_upstream_dir(path, model, upstream):
    """An upstream-style HF directory: two .bin shards with an index, a tokenizer, a config.json."""
    path.mkdir()
    # A derived buffer that older transformers saved: skipped on import, not reported.
    upstream = dict(upstream, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    keys = sorted(upstream)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in shards.items():
        torch.save({k: upstream[k] for k in part}, path / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(
        json.dumps(
            {"model_type": "llava_llama", "hidden_size": 64, "num_hidden_layers": 2, "rms_norm_eps": 1e-6}
        )
    )
    model.tokenizer.save_pretrained(path)
    torch.save({}, path / "training_args.bin")  # present in HF training dirs; must be ignored


def test_upstream_names_cover_the_model(tiny_moe):
    model, _, upstream = tiny_moe
    names = set(upstream)
    assert "model.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.1.down_proj.weight" in names
    assert "model.layers.0.mlp.deepspeed_moe.gate.wg.weight" in names
    assert "model.text_hidden_fcs.0.2.weight" in names
    assert "model.visual_model.mask_decoder.iou_token.weight" in names
    assert "model.mm_projector.2.bias" in names and "lm_head.weight" in names
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.encoder.layers.0.") for k in names)
    assert "model.region_fea_adapter.weight" in names
    assert len(names) == len(model.state_dict())
    assert len(KEY_RULES) == 13


def test_round_trip_through_a_model_directory(tiny_moe, tmp_path):
    model, cfg_path, upstream = tiny_moe
    src = tmp_path / "MedPLIB-tiny-2e"
    _write_upstream_dir(src, model, upstream)
    assert len(read_checkpoint(src)) == len(upstream) + 1
    dst = convert_upstream(src, tmp_path / "ours", preset=cfg_path)
    loaded = MedPLIB.from_pretrained(dst)
    back = to_upstream(loaded.state_dict())
    assert set(back) == set(upstream)
    for k, v in upstream.items():
        assert torch.equal(back[k], v), k
    # The imported experts route and compute: one forward through the converted LLM.
    with torch.no_grad():
        logits = loaded.llm(torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(logits).all()


def test_single_safetensors_file_with_a_tokenizer_dir(tiny_moe, tmp_path):
    model, cfg_path, upstream = tiny_moe
    save_file({k: v.contiguous() for k, v in upstream.items()}, tmp_path / "medplib.safetensors")
    model.tokenizer.save_pretrained(tmp_path / "tok")
    from workflows.cli import main

    rc = main(
        [
            "convert-upstream",
            str(tmp_path / "medplib.safetensors"),
            str(tmp_path / "out"),
            "--preset",
            str(cfg_path),
            "--tokenizer",
            str(tmp_path / "tok"),
        ]
    )
    assert rc == 0
    back = to_upstream(MedPLIB.from_pretrained(tmp_path / "out").state_dict())
    assert all(torch.equal(back[k], v) for k, v in upstream.items())


def test_every_unplaceable_key_is_named(tiny_moe, tmp_path):
    model, cfg_path, upstream = tiny_moe
    bad = dict(upstream)
    bad["model.some_new_head.weight"] = torch.zeros(3)
    bad["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(64, 64)  # layer 7 of a 2-layer model
    bad["model.mm_projector.0.weight"] = torch.zeros(5, 5)
    del bad["model.visual_model.mask_decoder.iou_token.weight"]
    with pytest.raises(ValueError) as err:
        from_upstream(bad, model.state_dict(), source="ckpt")
    msg = str(err.value)
    assert "model.some_new_head.weight" in msg
    assert "model.layers.7.self_attn.q_proj.weight -> llm.model.layers.7.self_attn.q_proj.weight" in msg
    assert "model.mm_projector.0.weight (5, 5) -> mm_projector.0.weight (64, 32)" in msg
    assert "sam.mask_decoder.iou_token.weight" in msg
    # Through the file-level entry point, with the path in the message.
    save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "bad.safetensors")
    model.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model.some_new_head.weight"):
        convert_upstream(tmp_path / "bad.safetensors", tmp_path / "out", preset=cfg_path)
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_and_existing_output_are_refused(tiny_moe, tmp_path):
    _, cfg_path, upstream = tiny_moe
    save_file({k: v.contiguous() for k, v in upstream.items()}, tmp_path / "m.safetensors")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        convert_upstream(tmp_path / "m.safetensors", tmp_path / "out", preset=cfg_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        convert_upstream(tmp_path / "m.safetensors", tmp_path / "taken", preset=cfg_path)


def test_shards_outside_the_folder_and_pickled_objects_are_refused(tiny_moe, tmp_path, caplog):
    import argparse
    import logging

    from workflows.cli import main

    model, cfg_path, upstream = tiny_moe
    src = tmp_path / "src"
    _write_upstream_dir(src, model, upstream)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    (tmp_path / "secret.bin").write_bytes(b"not yours")
    (src / "linked.bin").symlink_to(tmp_path / "secret.bin")
    for name in ("../secret.bin", str(tmp_path / "secret.bin"), "linked.bin"):
        index["weight_map"]["model.norm.weight"] = name
        (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=f"names shards outside .*{name.split('/')[-1]}"):
            read_checkpoint(src)

    # A .bin with objects besides tensors: refused without unpickling them, saying what to do instead.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"model.norm.weight": torch.ones(64), "args": argparse.Namespace(lr=1e-4)}, pickled / "m.bin")
    model.tokenizer.save_pretrained(pickled)
    with pytest.raises(ValueError, match="convert it to safetensors") as err:
        read_checkpoint(pickled / "m.bin")
    assert "weights_only=False" in str(err.value) and "m.safetensors" in str(err.value)
    with caplog.at_level(logging.ERROR, logger="medplib"):
        rc = main(["convert-upstream", str(pickled), str(tmp_path / "out"), "--preset", str(cfg_path)])
    assert rc == 2 and "convert it to safetensors" in caplog.text
    assert "Traceback" not in caplog.text and not (tmp_path / "out").exists()
