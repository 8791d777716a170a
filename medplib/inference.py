"""Inference in one process, no Ray, no DeepSpeed launcher, no port: `medplib predict`, the serving replicas and
batch evaluation all go `encode` -> `run`.

    predictor = Predictor.from_pretrained(resolve_model_source("models:/medplib@champion"))
    predictor.predict("scan.png", "Segment the lesion.", [Box(x0=10, y0=10, x1=40, y1=30)], segment=True)
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medplib import constants as C
from medplib.cpu import has_bf16_kernels
from medplib.data.batch import Encoded, collate, encode_sample
from medplib.data.schema import Box, MaskRef, Point, Turn
from medplib.model.config import load_model_config
from medplib.model.embedding_cache import EmbeddingCache
from medplib.model.export import is_model_dir
from medplib.model.medplib import Generation, MedPLIB
from medplib.model.packaged import medplib_cache_dir
from medplib.model.packed_linear import pack_linears
from medplib_client import Prediction

log = logging.getLogger(__name__)

Region = Point | Box | MaskRef | np.ndarray
_REGION_MARK = re.compile(r"<region>(</region>)?")
_PLACEHOLDERS = re.compile(
    "|".join(
        re.escape(token)
        for token in (
            C.IMAGE_TOKEN,
            C.IMAGE_START_TOKEN,
            C.IMAGE_END_TOKEN,
            C.REGION_START_TOKEN,
            C.REGION_END_TOKEN,
            C.REGION_FEATURE_TOKEN,
        )
    )
)
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
    version into `<medplib cache>/mlflow-models/` (a restart or a second replica reuses it; from a local store the
    weights are links, `medplib.artifact_files`)."""
    import hashlib
    import os
    import shutil

    import mlflow
    from mlflow import MlflowClient

    from medplib.artifact_files import download_artifacts

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
        local = download_artifacts(version.source, tmp, tracking_uri)
        (local / ".complete").write_text(uri + "\n")
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


class AnswerText:
    """One answer's text as its tokens arrive, handed out in deltas that add up to the final text: held back while
    a multi-byte character or a possible stop string is incomplete, and trailing whitespace until more text
    follows (the answer is stripped). A stop string ends the text before it."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # what has been handed out
        self.stopped = False

    def _decoded(self) -> str:
        eos = self.tokenizer.eos_token or ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return (text.replace(eos, "") if eos else text).lstrip()

    def _cut_at_stop(self, text: str) -> str:
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.stopped = True
            return text[: min(hits)]
        return text

    def _delta(self, ready: str) -> str:
        ready = ready.rstrip()
        if not ready.startswith(self.text) or len(ready) <= len(self.text):
            return ""
        delta, self.text = ready[len(self.text) :], ready
        return delta

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._cut_at_stop(self._decoded())
        if not self.stopped:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
                return ""
            held = [len(p) for s in self.stop for p in (s[:k] for k in range(1, len(s))) if text.endswith(p)]
            text = text[: len(text) - max(held, default=0)]
        return self._delta(text)

    def finish(self) -> str:
        """The rest of the text once generation ended."""
        return self._delta(self._cut_at_stop(self._decoded()))


def bf16_autocast_default(model: MedPLIB) -> bool:
    """bf16 autocast where it pays: an fp32 model on a CPU with bf16 matrix instructions (~4x its fp32 matmul)."""
    cpu_bf16 = model.device.type == "cpu" and has_bf16_kernels()
    return cpu_bf16 and model.dtype == torch.float32


class Predictor:
    def __init__(self, model: MedPLIB, autocast: bool | None = None):
        self.model = model.eval()
        self.cfg = model.cfg
        # Training's `precision: auto` makes the same choice, so a model is evaluated as it was trained.
        self.autocast = bf16_autocast_default(model) if autocast is None else autocast
        if self.autocast:
            # Autocast keeps its bf16 copy of a weight for a whole region only for leaf tensors that require
            # grad (and outside inference mode, hence `no_grad` in `_inference`); otherwise every decoding step
            # casts all fp32 weights again, a third of a small-preset step on CPU. Nothing here builds a graph.
            model.requires_grad_(True)
        if model.device.type == "cpu" and model.dtype == torch.float32:
            # The LLM's linears (`medplib.model.packed_linear`). Under bf16 autocast a decoding step 25-30%
            # faster, the same products. Not the projector's: PyTorch multiplies its input by another kernel
            # than oneDNN's, so packed it answered in other last bf16 places (2026-12-01). In fp32 (a CPU
            # without bf16 kernels) oneDNN in place of MKL's sgemm, whose few-row products are slow there and
            # change with the batch's row count.
            pack_linears(model.llm)
        # The frozen encoder's outputs of recent images, so an image is encoded once for all the calls that ask
        # about it (a grounding row's generation and teacher-forced pass, a conversation's turns), on CPU by the
        # cache's folded and fused copy (`EmbeddingCache`). `medplib eval` of the untrained small model on 48
        # `test` rows, AVX2-only CPU, 2 threads, 2026-12-01: 228 -> 117 s (it had encoded each image per call, a
        # grounding row's twice), the same 48 answers, 2 of 48 masks one pixel apart.
        self.embedding_cache = EmbeddingCache(None, model, autocast=self.autocast)

    def use_embedding_cache(self, root: str | Path) -> EmbeddingCache:
        """Keep the frozen image encoder's outputs in `root` (`EmbeddingCache`) instead of memory, as this
        predictor computes them (same autocast), so the stages, the evaluation and the samples share one folder."""
        self.embedding_cache = EmbeddingCache(root, self.model, autocast=self.autocast)
        return self.embedding_cache

    @contextlib.contextmanager
    def _inference(self):
        with (
            torch.no_grad(),
            torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.autocast),
        ):
            yield

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

    @cached_property
    def max_token_chars(self) -> int:
        """Most characters of text one token stands for (its longest vocabulary entry)."""
        return max(len(token) for token in self.model.tokenizer.get_vocab())

    def encode(
        self,
        image: Any,
        question: str,
        regions: list[Region] | None = None,
        history: list[tuple[str, str]] | None = None,
    ) -> Encoded:
        """One request as model input (the generation prompt, both image views, the region masks). `history` holds
        the earlier (question, answer) turns of a conversation: the image belongs to the first question and the
        conversation template lays the turns out as in training; region prompts belong to `question`. Raises
        `InvalidRequest` naming the field: image, question, history[k] or regions[k]."""
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
        # A token covers at most `max_token_chars` characters, so a longer text cannot fit: refused before the
        # tokenizer spends time on it.
        max_chars = self.cfg.max_length * self.max_token_chars
        chars = len(question) + sum(len(asked) + len(answered) for asked, answered in history or [])
        if chars > max_chars:
            raise InvalidRequest(
                "question",
                f"the conversation is {chars} characters; the model's context holds {self.cfg.max_length} "
                f"tokens (max_length), at most {max_chars} characters of text: shorten it",
            )
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
        turns = []
        for k, (asked, answered) in enumerate(history or []):
            if _REGION_MARK.search(asked):
                raise InvalidRequest("history", "region prompts belong to the last question", k)
            # Placeholders in an earlier answer (a model can generate them) are not inputs: they go.
            turns += [Turn(role="human", text=asked), Turn(role="gpt", text=_PLACEHOLDERS.sub("", answered))]
        turns.append(Turn(role="human", text=text))
        try:
            return encode_sample(
                turns, array, self.model.tokenizer, self.cfg, regions=masks, for_generation=True
            )
        except ValueError as err:  # the prompt does not fit max_length (PromptTooLong)
            raise InvalidRequest("question", str(err)) from err

    def run(self, encoded: list[Encoded], **options: Any) -> list[Prediction]:
        """Encoded requests in one generation pass; predictions in input order (`options` as `generate` takes
        them: max_new_tokens, temperature, top_p, seed, stop, segment, masks, on_text)."""
        return self.generate(encoded, **options)[0]

    def run_with_answers(
        self, encoded: list[Encoded], answers: list[list[int] | None], **options: Any
    ) -> list[tuple[Prediction, Prediction]]:
        """`run`, and in the same pass each row's ground-truth answer (token ids up to its end of turn, None for
        none) teacher-forced after its prompt (`MedPLIB.generate`'s `answers`): per row the prediction and the
        masks of its answer's `<SEG>`s (`text` empty), as `teacher_forced` gives them for a single-turn row
        without running the prompt again."""
        preds, gens = self.generate(encoded, answers=answers, **options)
        forced = [
            Prediction(
                text="",
                masks=[self.model.binarize(m) for m in gen.forced_mask_logits],
                scores=list(gen.forced_mask_scores),
                timings=dict(pred.timings),
            )
            for pred, gen in zip(preds, gens, strict=True)
        ]
        return list(zip(preds, forced, strict=True))

    def generate(
        self,
        encoded: list[Encoded],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        segment: bool = False,
        masks: bool = True,
        on_text: Callable[[int, str], None] | None = None,
        answers: list[list[int] | None] | None = None,
    ) -> tuple[list[Prediction], list[Generation]]:
        """Encoded requests in one `MedPLIB.generate` call: the predictions in input order and the model's own
        generations (with any teacher-forced `answers`' masks).

        `top_p` is nucleus sampling (with temperature > 0), `seed` seeds the sampler, and generation of a row stops
        at the first of its `stop` strings (not included in the text). `on_text(row, delta)` streams each row's
        answer while it is generated; the deltas add up to the prediction's text. `masks=False`: text only, no
        mask decoded (see `MedPLIB.generate`)."""
        t0 = time.perf_counter()
        self.embedding_cache.fill(encoded)
        batch = collate(encoded, self.cfg, self.model.ids.pad)
        t1 = time.perf_counter()
        texts = [AnswerText(self.model.tokenizer, stop or []) for _ in encoded]
        first_token_s: list[float | None] = [None] * len(encoded)

        def on_step(step: list[int | None]) -> list[int]:
            finished = []
            for row, token in enumerate(step):
                if token is None:
                    continue
                if first_token_s[row] is None:
                    first_token_s[row] = time.perf_counter() - t1
                delta = texts[row].push(token)
                if delta and on_text is not None:
                    on_text(row, delta)
                if texts[row].stopped:
                    finished.append(row)
            return finished

        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        with self._inference():
            gens = self.model.generate(
                batch,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                segment=segment,
                masks=masks,
                generator=generator,
                # The batched path without streaming or stop strings decodes each answer once, at the end.
                on_step=on_step if on_text is not None or stop else None,
                answers=answers,
            )
        t2 = time.perf_counter()
        preds = []
        for row, gen in enumerate(gens):
            text = texts[row]
            if not text.ids:
                text.ids = list(gen.token_ids)
            rest = text.finish()
            if rest and on_text is not None:
                on_text(row, rest)
            timings = {"preprocess_s": t1 - t0, "generate_s": t2 - t1, "total_s": t2 - t0}
            if first_token_s[row] is not None:
                timings["first_token_s"] = first_token_s[row]
            stopped = text.stopped or len(gen.token_ids) < max_new_tokens
            preds.append(
                Prediction(
                    text=text.text,
                    masks=[self.model.binarize(m) for m in gen.mask_logits],
                    scores=[float(s) for s in gen.mask_scores],
                    timings=timings,
                    num_generated_tokens=len(gen.token_ids),
                    token_ids=list(gen.token_ids),
                    finish_reason="stop" if stopped else "length",
                )
            )
        return preds, gens

    def teacher_forced(self, encoded: list[Encoded]) -> list[Prediction]:
        """Masks from the `<SEG>` positions of rows that hold their answer (prepared training rows), as
        upstream's in-training validation scores grounding: the model is fed the ground-truth answer, so this
        measures the mask head apart from whether the model would emit `<SEG>` itself. `text` stays empty."""
        t0 = time.perf_counter()
        self.embedding_cache.fill(encoded)
        batch = collate(encoded, self.cfg, self.model.ids.pad)
        with self._inference():
            seg = self.model(batch).get("segmentation")
        out = [Prediction(text="") for _ in encoded]
        for k, row in enumerate(seg.rows if seg is not None else []):
            out[row].masks.append(self.model.binarize(seg.logits[k].float()))
            out[row].scores.append(float(seg.iou[k]))
        elapsed = time.perf_counter() - t0
        for pred in out:
            pred.timings = {"total_s": elapsed}
        return out

    def predict_batch(
        self,
        requests: list[Request],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        segment: bool = False,
        **run_options: Any,
    ) -> list[Prediction]:
        """`encode` each request, then `run` them together (`run_options`: top_p, seed, stop, on_text); the
        encoding time counts as preprocessing."""
        t0 = time.perf_counter()
        encoded = [self.encode(r.image, r.question, r.regions) for r in requests]
        encode_s = time.perf_counter() - t0
        preds = self.run(
            encoded, max_new_tokens=max_new_tokens, temperature=temperature, segment=segment, **run_options
        )
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
        **run_options: Any,
    ) -> Prediction:
        """One request; `run_options` as `run` takes them (top_p, seed, stop, on_text)."""
        return self.predict_batch(
            [Request(image, question, list(regions or []))],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            segment=segment,
            **run_options,
        )[0]
