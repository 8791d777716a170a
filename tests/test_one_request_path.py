"""One request path: the same image, question and box give the same answer and the same mask through
`Predictor.predict`, through the HTTP API and through `medplib eval` on the row prepared from them by the real
prepare code. All three load the same saved `tiny` model directory with their own code."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image

QUESTION = "Segment the structure in <region>."
BOX = (8, 6, 40, 30)  # x0, y0, x1, y1 in pixels of the 48 x 64 image
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """A saved random-init `tiny` model and a one-row MeCoVQA-format dataset (a real PNG, a box region, a target
    mask), prepared with `workflows.data.preprocess.prepare`."""
    from medplib.data.batch import collate
    from medplib.data.schema import Box
    from medplib.inference import Predictor
    from medplib.model.config import load_model_config
    from medplib.model.medplib import MedPLIB
    from workflows.data.preprocess import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("one-path")
    image = np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    torch.manual_seed(0)
    model = MedPLIB(load_model_config("tiny"))
    # Random-init mask logits sit near 0, so at the preset's threshold (0.1) every pixel is foreground; the
    # median probability of this request as the threshold makes the masks compared below about half foreground.
    predictor = Predictor(model)
    encoded = predictor.encode(image, QUESTION, [Box(x0=BOX[0], y0=BOX[1], x1=BOX[2], y1=BOX[3])])
    with torch.inference_mode():
        (gen,) = model.generate(
            collate([encoded], model.cfg, model.ids.pad), max_new_tokens=MAX_NEW_TOKENS, segment=True
        )
    threshold = float(torch.sigmoid(gen.mask_logits[0]).median())
    model.cfg = model.cfg.model_copy(
        update={"sam": model.cfg.sam.model_copy(update={"mask_threshold": threshold})}
    )
    model.save_pretrained(root / "model")

    data = root / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    Image.fromarray(image).save(data / "images" / "scan.png")
    target = np.zeros((48, 64), np.uint8)
    target[10:26, 12:36] = 255
    Image.fromarray(target).save(data / "masks" / "scan_target.png")
    row = {
        "id": "scan-1",
        "image": "images/scan.png",
        "split": "test",
        "modality": "ct",
        "regions": [{"box": list(BOX)}],
        "masks": ["masks/scan_target.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n" + QUESTION},
            {"from": "gpt", "value": "It is here <SEG>."},
        ],
    }
    (data / "one_test.json").write_text(json.dumps([row]))
    result = prepare(data, root / "prepared", PrepareConfig(model_preset="tiny"), engine="local")
    assert result.manifest["counts"]["accepted"] == 1, result.manifest["counts"]
    return {
        "root": root,
        "model": root / "model",
        "image": data / "images" / "scan.png",
        "prepared": root / "prepared",
    }


def test_predictor_http_api_and_eval_agree(case: dict) -> None:
    from fastapi.testclient import TestClient

    from medplib.data.schema import Box
    from medplib.inference import Predictor
    from medplib_client import decode_mask
    from serve.api import LocalBackend, create_api
    from serve.config import AppArgs
    from serve.service import MedPLIBService
    from workflows.cli import main

    # 1. The Predictor, in this process.
    direct = Predictor.from_pretrained(case["model"]).predict(
        case["image"],
        QUESTION,
        [Box(x0=BOX[0], y0=BOX[1], x1=BOX[2], y1=BOX[3])],
        max_new_tokens=MAX_NEW_TOKENS,
        segment=True,
    )

    # 2. The HTTP API of a replica (the FastAPI app over the service, no Ray), loading the model itself.
    service = MedPLIBService(AppArgs(model=str(case["model"])))
    with TestClient(create_api(LocalBackend(service))) as client:
        r = client.post(
            "/v1/predict",
            json={
                "image": base64.b64encode(case["image"].read_bytes()).decode(),
                "question": QUESTION,
                "regions": [{"kind": "box", "x0": BOX[0], "y0": BOX[1], "x1": BOX[2], "y1": BOX[3]}],
                "max_new_tokens": MAX_NEW_TOKENS,
                "segment": True,
                "mask_encoding": "rle",
            },
        )
    assert r.status_code == 200, r.text
    api = r.json()

    # 3. `medplib eval` on the prepared row (a grounding row: decoded with segment=True).
    out = case["root"] / "eval"
    code = main(
        [
            "eval",
            "--model",
            str(case["model"]),
            "--data",
            str(case["prepared"]),
            "--split",
            "test",
            "--out",
            str(out),
            "--engine",
            "local",
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
        ]
    )
    assert code == 0
    (record,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]

    assert len(direct.masks) == 1 and direct.masks[0].shape == (48, 64)
    assert 0 < direct.masks[0].sum() < direct.masks[0].size, "a mask all one value would compare trivially"
    assert api["answer"] == direct.text == record["text"]
    assert (
        api["num_generated_tokens"]
        == direct.num_generated_tokens
        == record["metadata"]["num_generated_tokens"]
    )
    assert api["prompt_tokens"] == record["metadata"]["prompt_tokens"]
    (api_mask,) = [decode_mask(m) for m in api["masks"]]
    (eval_mask_png,) = record["pred_masks"]
    eval_mask = np.array(Image.open(out / eval_mask_png["png"])) > 127
    assert np.array_equal(api_mask, direct.masks[0])
    assert np.array_equal(eval_mask, direct.masks[0])
    assert (
        api["masks"][0]["score"] == pytest.approx(direct.scores[0]) == pytest.approx(eval_mask_png["score"])
    )
