"""Inference in one process, no Ray, no DeepSpeed launcher, no port: `medplib predict`, the serving replicas and
batch evaluation all go `encode` -> `run`.

    predictor = Predictor.from_pretrained(resolve_model_source("models:/medplib@champion"))
    predictor.predict("scan.png", "Segment the lesion.", [Box(x0=10, y0=10, x1=40, y1=30)], segment=True)
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medplib.data.batch import Encoded, collate, encode_sample
from medplib.data.schema import Box, MaskRef, Point, Turn
from medplib.model.config import load_model_config
from medplib.model.export import is_model_dir
from medplib.model.medplib import MedPLIB
from medplib.model.packaged import medplib_cache_dir
from medplib.prediction import Prediction

log = logging.getLogger(__name__)

Region = Point | Box | MaskRef | np.ndarray
_REGION_MARK = re.compile(r"<region>(</region>)?")
MLFLOW_URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass
class Request:
    image: Any
    question: str
    regions: list[Region] = field(default_factory=list)


class InvalidRequest(ValueError):
    """A request the model cannot take; `field` is the part at fault (image, question, regions) and `index` the
    region's position."""

    def __init__(self, field: str, detail: str, index: int | None = None) -> None:
        self.field, self.detail, self.index = field, detail, index
        super().__init__(f"{field}{'' if index is None else f'[{index}]'}: {detail}")


def find_model_dir(path: Path, max_depth: int = 3) -> Path:
    """The model folder (`medplib.model.export.is_model_dir`) at `path`, inside an MLflow pyfunc model there (its
    `MLmodel` names the export as the `model` artifact), or below `path` (a downloaded run folder); `path` itself
    when none is found (the loader then names what is missing)."""
    if is_model_dir(path):
        return path
    mlmodel = path / "MLmodel"
    if mlmodel.is_file():
        import yaml

        flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
        artifact = (flavor.get("artifacts") or {}).get("model")
        if artifact and is_model_dir(path / artifact["path"]):
            return path / artifact["path"]
    for depth in range(1, max_depth + 1):
        for found in sorted(path.glob("/".join(["*"] * depth))):
            if found.is_dir() and (is_model_dir(found) or (found / "MLmodel").is_file()):
                return find_model_dir(found, 0)
    return path


def _download_registered(uri: str, tracking_uri: str | None) -> Path:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> a local copy, downloaded once per registry, name and
    version into `<medplib cache>/mlflow-models/` (a restart or a second replica reuses it)."""
    import hashlib
    import os
    import shutil

    import mlflow
    from mlflow import MlflowClient

    registry = tracking_uri or mlflow.get_registry_uri()
    client = MlflowClient(tracking_uri, registry_uri=registry)
    ref = uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = ref.partition("/")
        version = client.get_model_version(name, number)
    store = hashlib.sha256(registry.encode()).hexdigest()[:12]
    # The run id guards against a store that was wiped and numbered its versions from 1 again.
    dst = medplib_cache_dir() / "mlflow-models" / store / name / f"{version.version}-{version.run_id}"
    if not (dst / ".complete").is_file():
        tmp = dst.with_name(f".{dst.name}.download-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=str(tmp), tracking_uri=tracking_uri
        )
        (Path(local) / ".complete").write_text(uri + "\n")
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(local, dst)
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded %s (version %s) into %s", uri, version.version, dst)
    return dst


def resolve_model_source(source: str, tracking_uri: str | None = None) -> str:
    """A model directory (an export or an MLflow pyfunc model) or a preset name passes through; a registered model
    (`models:/medplib@champion`, `models:/medplib/3`) comes from the download cache; other MLflow URIs
    (`runs:/ID/model`) are downloaded into MLflow's temporary folder. `tracking_uri` defaults to MLflow's own."""
    if source.startswith("models:/") and not source.startswith("models:/m-"):
        source = str(_download_registered(source, tracking_uri))
    elif source.startswith(MLFLOW_URI_PREFIXES):
        import mlflow.artifacts  # only here: reading a local model needs no MLflow

        source = mlflow.artifacts.download_artifacts(
            artifact_uri=source, tracking_uri=tracking_uri, registry_uri=tracking_uri
        )
    path = Path(source)
    return str(find_model_dir(path)) if path.is_dir() else source


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
    def from_pretrained(
        cls, source: str | Path, dtype: str | None = None, device: str | None = None
    ) -> Predictor:
        """A model directory (`save_pretrained`), or a preset name (`tiny` builds at random init)."""
        path = Path(source)
        if path.is_dir():
            model = MedPLIB.from_pretrained(path, dtype=dtype)
        elif path.exists():
            raise ValueError(
                f"{path} is a file; --model takes a model directory, an MLflow model URI or a preset"
            )
        else:
            cfg = load_model_config(str(source))
            model = MedPLIB(cfg.model_copy(update={"dtype": dtype}) if dtype else cfg)
        if device:
            model = model.to(device)
        return cls(model)

    def encode(self, image: Any, question: str, regions: list[Region] | None = None) -> Encoded:
        """One request as model input (the generation prompt, both image views, the region masks). Raises
        `InvalidRequest` naming the field: image, question or regions[k]."""
        from medplib.data.image import load_image
        from medplib.data.transforms import region_to_mask

        regions = list(regions or [])
        if len(regions) > self.cfg.region.max_regions:
            raise InvalidRequest(
                "regions",
                f"{len(regions)} region prompts; this model takes at most "
                f"{self.cfg.region.max_regions} (region.max_regions)",
            )
        array = None
        if image is not None:
            try:
                array = load_image(image)
            except ValueError as err:
                raise InvalidRequest("image", str(err)) from err
        try:
            text = question_with_regions(question, len(regions))
        except ValueError as err:
            raise InvalidRequest("question", str(err)) from err
        masks = []
        for k, region in enumerate(regions):
            if array is None:
                raise InvalidRequest("regions", "a region prompt needs an image", k)
            try:
                # Rasterised once here; encode_sample takes the arrays as they are.
                masks.append(region_to_mask(region, array.shape[:2], self.cfg.region.point_square_px))
            except ValueError as err:
                raise InvalidRequest("regions", str(err), k) from err
        turns = [Turn(role="human", text=text)]
        try:
            return encode_sample(
                turns, array, self.model.tokenizer, self.cfg, regions=masks, for_generation=True
            )
        except ValueError as err:  # the prompt does not fit max_length
            raise InvalidRequest("question", str(err)) from err

    def run(
        self,
        encoded: list[Encoded],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        segment: bool = False,
    ) -> list[Prediction]:
        """Encoded requests in one generation pass (one `generate` call); predictions in input order."""
        t0 = time.perf_counter()
        batch = collate(encoded, self.cfg, self.model.ids.pad)
        t1 = time.perf_counter()
        with torch.inference_mode():
            gens = self.model.generate(
                batch, max_new_tokens=max_new_tokens, temperature=temperature, segment=segment
            )
        t2 = time.perf_counter()
        timings = {"preprocess_s": t1 - t0, "generate_s": t2 - t1, "total_s": t2 - t0}
        eos = self.model.tokenizer.eos_token or ""
        return [
            Prediction(
                text=(gen.text.replace(eos, "") if eos else gen.text).strip(),
                masks=[self.model.binarize(m) for m in gen.mask_logits],
                scores=[float(s) for s in gen.mask_scores],
                timings=dict(timings),
                num_generated_tokens=len(gen.token_ids),
                token_ids=list(gen.token_ids),
            )
            for gen in gens
        ]

    def predict_batch(
        self,
        requests: list[Request],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        segment: bool = False,
    ) -> list[Prediction]:
        """`encode` each request, then `run` them together; the encoding time counts as preprocessing."""
        t0 = time.perf_counter()
        encoded = [self.encode(r.image, r.question, r.regions) for r in requests]
        encode_s = time.perf_counter() - t0
        preds = self.run(encoded, max_new_tokens=max_new_tokens, temperature=temperature, segment=segment)
        for pred in preds:
            pred.timings["preprocess_s"] += encode_s
            pred.timings["total_s"] += encode_s
        return preds

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
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            segment=segment,
        )[0]
