"""Single-process inference: `Predictor.from_pretrained(dir_or_preset).predict(image, question, regions)`.

No Ray, no DeepSpeed launcher, no port: the serving replicas, the batch evaluator and `medplib predict` all call
this class.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medplib.data.batch import collate, encode_sample
from medplib.data.schema import Box, MaskRef, Point, Turn
from medplib.model.config import load_model_config
from medplib.model.medplib import MedPLIB

Region = Point | Box | MaskRef | np.ndarray
_REGION_MARK = re.compile(r"<region>(</region>)?")


@dataclass
class Prediction:
    """The answer, one binary mask per `<SEG>` (original image size), SAM's IoU score per mask, and timings."""

    text: str
    masks: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    num_generated_tokens: int = 0


@dataclass
class Request:
    image: Any
    question: str
    regions: list[Region] = field(default_factory=list)


def resolve_model_source(source: str) -> str:
    """An MLflow model URI (`models:/medplib@champion`, `runs:/ID/model`) is downloaded to a local directory;
    anything else (a model directory, a preset name) passes through. mlflow is imported only when needed."""
    if source.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow

        return mlflow.artifacts.download_artifacts(artifact_uri=source)
    return source


def question_with_regions(question: str, num_regions: int) -> str:
    """Normalise region markers to `<region></region>`; append one per region when the text has none."""
    found = len(_REGION_MARK.findall(question))
    text = _REGION_MARK.sub("<region></region>", question)
    if found == 0 and num_regions:
        return text + "".join(" <region></region>" for _ in range(num_regions))
    if found != num_regions:
        raise ValueError(f"question has {found} <region> markers but {num_regions} region prompts were given")
    return text


class Predictor:
    def __init__(self, model: MedPLIB):
        self.model = model.eval()
        self.cfg = model.cfg

    @classmethod
    def from_pretrained(cls, source: str | Path, dtype: str | None = None, device: str | None = None) -> Predictor:
        """A model directory (`save_pretrained`), or a preset name (`tiny` builds at random init)."""
        path = Path(source)
        if path.is_dir():
            model = MedPLIB.from_pretrained(path, dtype=dtype)
        elif path.exists():
            raise ValueError(f"{path} is a file; --model takes a model directory, an MLflow model URI or a preset")
        else:
            cfg = load_model_config(str(source))
            model = MedPLIB(cfg.model_copy(update={"dtype": dtype}) if dtype else cfg)
        if device:
            model = model.to(device)
        return cls(model)

    def predict(
        self,
        image: Any,
        question: str,
        regions: list[Region] | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        segment: bool = False,
    ) -> Prediction:
        return self.predict_batch(
            [Request(image, question, list(regions or []))],
            max_new_tokens=max_new_tokens, temperature=temperature, segment=segment,
        )[0]  # fmt: skip

    def predict_batch(
        self, requests: list[Request], *, max_new_tokens: int = 64, temperature: float = 0.0, segment: bool = False
    ) -> list[Prediction]:
        """Several requests in one generation pass (what Serve's batching calls)."""
        from medplib.data.image import load_image

        t0 = time.perf_counter()
        encoded = []
        for req in requests:
            image = None if req.image is None else load_image(req.image)
            turns = [Turn(role="human", text=question_with_regions(req.question, len(req.regions)))]
            encoded.append(
                encode_sample(turns, image, self.model.tokenizer, self.cfg, regions=req.regions, for_generation=True)
            )
        batch = collate(encoded, self.cfg, self.model.ids.pad)
        t1 = time.perf_counter()
        with torch.inference_mode():
            gens = self.model.generate(
                batch, max_new_tokens=max_new_tokens, temperature=temperature, segment=segment
            )
        t2 = time.perf_counter()
        out = []
        for gen in gens:
            text = gen.text.replace(self.model.tokenizer.eos_token or "", "").strip()
            out.append(
                Prediction(
                    text=text,
                    masks=[self.model.binarize(m) for m in gen.mask_logits],
                    scores=gen.mask_scores,
                    timings={"preprocess_s": t1 - t0, "generate_s": t2 - t1, "total_s": t2 - t0},
                    num_generated_tokens=len(gen.token_ids),
                )
            )
        return out
