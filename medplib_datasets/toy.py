"""A small prepared dataset built in memory, for tests and benches: the same Parquet rows, folder layout and
manifest that `medplib data prepare` writes (`medplib.data.prepared`), without images on disk.

Each image is smooth noise with one bright square (its mask); rows cycle through the three tasks: VQA ("Is there
a square?"), region VQA (a box prompt on the square: "What is in the region?") and grounding ("Segment the
square." -> `<SEG>` with the square's mask). Deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medplib.data.batch import encode_sample
from medplib.data.prepared import MANIFEST_NAME, rows_to_table
from medplib.data.rows import SCHEMA_VERSION, encoded_to_row
from medplib.data.schema import Box, Sample, Turn
from medplib.model.config import MedPLIBConfig, load_model_config
from medplib.tokenizer import build_tokenizer

TASKS = ("vqa", "region_vqa", "grounding")


def _image(
    rng: np.random.Generator, h: int, w: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    noise = rng.normal(90, 25, (h // 4 + 1, w // 4 + 1)).clip(0, 255)
    base = np.kron(noise, np.ones((4, 4)))[:h, :w]
    side = int(rng.integers(min(h, w) // 5, min(h, w) // 2))
    y0, x0 = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    mask = np.zeros((h, w), dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    base[mask] = 220
    return np.repeat(base.astype(np.uint8)[..., None], 3, axis=2), mask, (x0, y0, x0 + side, y0 + side)


def toy_rows(cfg: MedPLIBConfig, n_rows: int, split: str = "train", seed: int = 0) -> list[dict]:
    """`n_rows` rows in `medplib.data.rows` format, cycling vqa / region_vqa / grounding."""
    tokenizer = build_tokenizer(cfg.llm.tokenizer)
    rng = np.random.default_rng([seed, sum(map(ord, split))])
    rows = []
    for i in range(n_rows):
        task = TASKS[i % 3]
        h, w = int(rng.integers(48, 96)), int(rng.integers(48, 96))
        image, mask, box = _image(rng, h, w)
        sid = f"toy-{split}-{i:05d}"
        regions, masks, answer_type = [], [], "open"
        if task == "vqa":
            question, answer, answer_type = "Is there a bright square?", "Yes.", "closed"
        elif task == "region_vqa":
            question, answer = "What is in <region></region>?", "A bright square."
            regions = [Box(x0=box[0], y0=box[1], x1=box[2], y1=box[3])]
        else:
            question, answer = "Segment the bright square.", "It is here <SEG>."
            masks = [mask]
        sample = Sample(
            id=sid,
            image=f"toy/{sid}.png",
            task=task,
            split=split,
            answer_type=answer_type,
            turns=[Turn(role="human", text="<image>\n" + question), Turn(role="gpt", text=answer)],
            regions=regions,
            masks=[f"toy/{sid}_mask.png"] if masks else [],
        )
        enc = encode_sample(sample, image, tokenizer, cfg, target_masks=masks)
        meta = {
            "task": task,
            "modality": "other",
            "split": split,
            "answer_type": answer_type,
            "image_path": sample.image,
            "question": question,
            "answer": answer,
        }
        rows.append(encoded_to_row(enc, meta))
    return rows


def _table(rows: list[dict]) -> pa.Table:
    plain = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in rows]
    return rows_to_table(plain)


def write_toy_prepared(
    output: str | Path, preset: str = "tiny", rows_per_split: dict[str, int] | None = None, seed: int = 0
) -> Path:
    """Write `output/<split>/part-00000.parquet` + `output/manifest.json` (the prepare layout)."""
    output = Path(output)
    cfg = load_model_config(preset)
    rows_per_split = rows_per_split or {"train": 24, "val": 6}
    counts = {}
    for split, n in rows_per_split.items():
        (output / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(_table(toy_rows(cfg, n, split, seed)), output / split / "part-00000.parquet")
        counts[split] = n
    spec = json.dumps({"toy": True, "preset": preset, "rows": rows_per_split, "seed": seed}, sort_keys=True)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model_preset": preset,
        "input_hash": hashlib.sha256(spec.encode()).hexdigest(),
        "config_hash": hashlib.sha256(f"toy-{SCHEMA_VERSION}".encode()).hexdigest(),
        "splits": {s: {"accepted": n} for s, n in counts.items()},
        "source": "medplib_datasets.toy",
    }
    (output / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return output
