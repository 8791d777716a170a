"""What a replica does, without Ray: turn API requests into model jobs, run jobs in batches, build responses.

`MedPLIBService` holds the `Predictor`. Every check that can fail because of the client (the image, the regions,
the limits, the question) happens in `job_from_chat` / `job_from_predict`, which end in `Predictor.encode`, before
a request joins a batch, so one bad request never fails its batch-mates; each raises `APIError` with the HTTP
status, the field at fault and a message saying what was expected. `run_batch` is the one place the model runs
(`Predictor.run`; Serve's `@serve.batch` calls it with up to `max_batch_size` jobs).
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medplib_client import Prediction
from medplib_client.masks import (
    MaskFormatError,
    MaskTooLarge,
    b64decode,
    b64encode,
    decode_rle,
    encode_rle,
    png_decode,
    png_encode,
)
from serve.config import AppArgs
from serve.schemas import (
    AssistantMessage,
    BoxPrompt,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ImagePart,
    MaskEncoding,
    MaskOut,
    MaskPrompt,
    MaskRLE,
    MedPLIBResult,
    ModelCard,
    ModelList,
    PointPrompt,
    PredictRequest,
    PredictResponse,
    PreviewRequest,
    PreviewResponse,
    TextPart,
    Timings,
    Usage,
)

logger = logging.getLogger(__name__)

# Media types a data URL may carry: images Pillow reads, DICOM, NIfTI (often sent as octet-stream or gzip).
_ACCEPTED_MEDIA = (
    "image/",
    "application/dicom",
    "application/octet-stream",
    "application/gzip",
    "application/x-gzip",
    "application/x-nifti",
)
_DATA_URL_HEADER_CHARS = 1024  # "data:<media type>;<parameters>," is at most this long


class APIError(Exception):
    """A request the server will not run; becomes an OpenAI-style error body with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or {
            400: "invalid_request",
            401: "invalid_api_key",
            404: "not_found",
            413: "too_large",
            415: "unsupported_media_type",
            422: "invalid_value",
            503: "unavailable",
            504: "timeout",
        }.get(status, "error")
        self.type = type_ or (
            "authentication_error"
            if status == 401
            else "invalid_request_error"
            if status < 500
            else "server_error"
        )


@dataclass
class Job:
    """One validated request, encoded once for the model (`Predictor.encode`), with its generation settings."""

    encoded: Any  # medplib.data.batch.Encoded: the generation prompt, image views and region masks
    max_new_tokens: int
    temperature: float
    segment: bool
    encode_s: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    return_masks: bool = True
    mask_encoding: MaskEncoding = "both"
    created_s: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])

    @property
    def prompt_tokens(self) -> int:
        return len(self.encoded.input_ids)

    @property
    def run_options(self) -> dict[str, Any]:
        """`Predictor.run`'s generation settings of this job."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop),
            "segment": self.segment,
        }

    @property
    def batch_key(self) -> tuple:
        """Jobs with the same key share a generation pass; a seeded job runs alone, so that its answer does not
        depend on its batch-mates' draws."""
        return (self.max_new_tokens, self.temperature, self.top_p, self.stop, self.segment) + (
            (self.id,) if self.seed is not None else ()
        )


@dataclass
class JobResult:
    """What the model made of one job (a `Prediction`), or the error that stopped it, and its batch."""

    prediction: Prediction | None = None
    batch_size: int = 1
    started_s: float = 0.0  # time.perf_counter() when its model pass began
    error: BaseException | None = None

    @property
    def num_generated_tokens(self) -> int:
        return self.prediction.num_generated_tokens if self.prediction is not None else 0


def parse_data_url(url: str, param: str) -> bytes:
    """`data:<media>;base64,<data>` -> bytes. Remote URLs are refused (400), non-image media types get 415."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        raise APIError(
            400,
            f"{param}: only data URLs are accepted (data:image/png;base64,...); this server does not fetch "
            f"remote URLs ({url.split('://', 1)[0]}://...). Send the image inline.",
            param,
            "remote_url_not_supported",
        )
    # The header (media type and parameters) is short: look for its end only near the start, so a long URL
    # without one costs no more than a short one.
    comma = url.find(",", 0, _DATA_URL_HEADER_CHARS)
    if not url.startswith("data:") or comma < 0:
        raise APIError(400, f"{param}: not a data URL; expected data:image/png;base64,<base64 data>", param)
    media, *params = url[len("data:") : comma].split(";")
    media = media.strip().lower()
    if "base64" not in [p.strip().lower() for p in params]:
        raise APIError(
            400,
            f"{param}: the data URL must be base64-encoded (data:{media or 'image/png'};base64,...)",
            param,
        )
    if media and not media.startswith(_ACCEPTED_MEDIA):
        raise APIError(
            415,
            f"{param}: media type {media!r} is not an image; send image/png, image/jpeg, application/dicom, ...",
            param,
        )
    return _b64(url[comma + 1 :], param)


def _b64(text: str, param: str) -> bytes:
    try:
        data = b64decode(text, param)
    except MaskFormatError as err:
        raise APIError(400, str(err), param) from err
    if not data:
        raise APIError(400, f"{param}: no data", param)
    return data


def slice_count(data: bytes) -> int:
    """Slices of a NIfTI volume (along axis 2, the one `load_image` picks from) or frames of a DICOM file; 1 for
    anything else. The demo page's slice slider reads it."""
    import gzip

    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[344:348] in (b"n+1\x00", b"ni1\x00") or data[4:8] == b"n+2\x00":
        import nibabel

        for kind in (nibabel.Nifti1Image, nibabel.Nifti2Image):
            try:
                shape = kind.from_bytes(data).shape
            except Exception:  # noqa: BLE001 - not this NIfTI flavour; load_image reported real errors first
                continue
            return int(shape[2]) if len(shape) >= 3 else 1
    if data[128:132] == b"DICM":
        import pydicom

        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return int(getattr(header, "NumberOfFrames", 1) or 1)
    return 1


class MedPLIBService:
    """The model plus everything between HTTP bodies and `Predictor.run` (see the module docstring)."""

    def __init__(self, args: AppArgs, predictor: Any | None = None, num_cpus: float = 1.0) -> None:
        import torch

        from medplib.inference import Predictor, resolve_model_source

        self.args = args
        threads = args.torch_threads or max(1, int(num_cpus))
        torch.set_num_threads(threads)
        if predictor is None:
            device = args.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            t0 = time.perf_counter()
            predictor = Predictor.from_pretrained(
                resolve_model_source(args.model), dtype=args.dtype, device=device
            )
            logger.info(
                "loaded %s on %s in %.1f s (%d torch threads)",
                args.model,
                device,
                time.perf_counter() - t0,
                threads,
            )
        self.predictor = predictor
        self.model_cfg = predictor.cfg
        self.name = args.served_name()
        self.created = int(time.time())
        self.max_regions = min(args.limits.max_regions or 10**9, self.model_cfg.region.max_regions)
        self._lock = threading.Lock()
        self.last_success_s: float | None = None  # time.monotonic() of the last model call that worked
        self.last_failure: BaseException | None = None
        from medplib.data.schema import Box

        probe = np.zeros((32, 32, 3), dtype=np.uint8)
        probe[8:24, 8:24] = 200
        self._probe = predictor.encode(probe, "probe", [Box(x0=8, y0=8, x1=24, y1=24)])

    # --- requests -> jobs ------------------------------------------------------------------------------------------
    def job_from_chat(self, req: ChatCompletionRequest) -> Job:
        if req.model and req.model not in (self.name, "default"):
            raise APIError(
                404,
                f"model: {req.model!r} is not served here; GET /v1/models lists {self.name!r}",
                "model",
                "model_not_found",
            )
        # The conversation: user and assistant turns alternate, starting and ending with the user (system and
        # developer messages are not given to the model: it knows one system prompt).
        turns = [(i, m) for i, m in enumerate(req.messages) if m.role in ("user", "assistant")]
        if not any(m.role == "user" for _, m in turns):
            raise APIError(
                400, "messages: no user message; the last user message holds the question", "messages"
            )
        for k, (i, m) in enumerate(turns):
            expected = "user" if k % 2 == 0 else "assistant"
            if m.role != expected:
                raise APIError(
                    400,
                    f"messages[{i}]: expected a {expected} message: a conversation alternates user and assistant "
                    "turns, starting with the user",
                    f"messages[{i}]",
                    "invalid_conversation",
                )
        if turns[-1][1].role != "user":
            raise APIError(
                400,
                "messages: the conversation must end with a user message (the question to answer)",
                "messages",
                "invalid_conversation",
            )
        texts = []
        for i, m in turns:
            text = "\n".join(p.text for p in m.content if isinstance(p, TextPart)).strip()
            if not text and m.role == "user":
                raise APIError(
                    400,
                    f"messages[{i}].content: the user message has no text (the question)",
                    f"messages[{i}].content",
                )
            texts.append(text)
        last = turns[-1][0]
        images = [(i, j, p) for i, m in turns for j, p in enumerate(m.content) if isinstance(p, ImagePart)]
        if not images:
            raise APIError(
                400,
                "messages: no image; add an image_url content part with a data URL "
                '({"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}})',
                "messages",
                "missing_image",
            )
        first = turns[0][0]
        if len(images) > 1 or images[0][0] != first:
            i, j, _ = images[-1] if len(images) > 1 else images[0]
            raise APIError(
                400,
                f"messages[{i}].content[{j}]: MedPLIB takes one image per conversation, in the first user message "
                f"(messages[{first}]); start a new conversation for another image",
                f"messages[{i}].content[{j}]",
                "image_not_in_first_turn",
            )
        i, j, part = images[0]
        param = f"messages[{i}].content[{j}].image_url.url"
        image = self._decode_image(parse_data_url(part.image_url.url, param), param)
        opts = req.medplib
        regions: list[tuple[str, Any]] = []
        if opts:
            regions += [(f"medplib.points[{k}]", p) for k, p in enumerate(opts.points)]
            regions += [(f"medplib.boxes[{k}]", b) for k, b in enumerate(opts.boxes)]
            regions += [(f"medplib.masks[{k}]", m) for k, m in enumerate(opts.masks)]
        max_tokens = req.max_completion_tokens or req.max_tokens
        job = self._job(
            image,
            texts[-1],
            regions,
            max_tokens,
            req.temperature or 0.0,
            segment=bool(opts and opts.segment),
            return_masks=opts.return_masks if opts else True,
            mask_encoding=opts.mask_encoding if opts else "both",
            tokens_param="max_tokens",
            regions_param="medplib",
            question_param=f"messages[{last}].content",
            history=list(zip(texts[:-1:2], texts[1:-1:2], strict=True)),
            history_params=[f"messages[{i}].content" for i, _ in turns[:-1:2]],
        )
        job.top_p = req.top_p if req.top_p is not None else 1.0
        job.seed = req.seed
        job.stop = tuple(req.stop or [])
        return job

    def job_from_predict(self, req: PredictRequest) -> Job:
        raw = (
            parse_data_url(req.image, "image") if req.image.startswith("data:") else _b64(req.image, "image")
        )
        image = self._decode_image(raw, "image", req.slice_index)
        regions = [(f"regions[{k}]", r) for k, r in enumerate(req.regions)]
        return self._job(
            image,
            req.question,
            regions,
            req.max_new_tokens,
            req.temperature,
            segment=req.segment,
            return_masks=req.return_masks,
            mask_encoding=req.mask_encoding,
            tokens_param="max_new_tokens",
            regions_param="regions",
            question_param="question",
        )

    def _decode_image(self, data: bytes, param: str, slice_index: int | None = None) -> np.ndarray:
        from PIL import Image

        from medplib.data.image import ImageReadError, load_image

        limit = self.args.limits.max_image_pixels
        try:  # header only: refuse an oversized image before decoding its pixels
            with Image.open(io.BytesIO(data)) as peek:
                w, h = peek.size
        except Image.DecompressionBombError as err:
            raise APIError(413, f"{param}: image too large to decode ({err})", param) from err
        except Exception:  # not a Pillow format (DICOM, NIfTI) or not an image: load_image decides
            w = h = 0
        if w * h > limit:
            raise APIError(
                413,
                f"{param}: image is {w}x{h} = {w * h} pixels; this server takes at most {limit} "
                "(limits.max_image_pixels)",
                param,
            )
        try:
            image = load_image(data, slice_index=slice_index)
        except ImageReadError as err:
            raise APIError(
                400, f"{param}: not a readable image: {err.detail}", param, "invalid_image"
            ) from err
        except Image.DecompressionBombError as err:
            raise APIError(413, f"{param}: image too large to decode ({err})", param) from err
        h, w = image.shape[:2]
        if w * h > limit:
            raise APIError(
                413,
                f"{param}: image is {w}x{h} = {w * h} pixels; this server takes at most {limit} "
                "(limits.max_image_pixels)",
                param,
            )
        return image

    def _region(self, prompt: Any, param: str, image_hw: tuple[int, int]) -> Any:
        from medplib.data.schema import Box, Point

        if isinstance(prompt, PointPrompt):
            return Point(x=prompt.x, y=prompt.y)
        if isinstance(prompt, BoxPrompt):
            return Box(x0=prompt.x0, y0=prompt.y0, x1=prompt.x1, y1=prompt.y1)
        if isinstance(prompt, MaskPrompt):
            limits = self.args.limits
            # RLE problems are the schema's 422s, as when the form itself is wrong; a PNG that will not decode is 400.
            field, status = (f"{param}.rle", 422) if prompt.rle is not None else (f"{param}.png_base64", 400)
            try:
                if prompt.rle is not None:
                    rle = {"size": prompt.rle.size, "counts": prompt.rle.counts}
                    return decode_rle(rle, image_hw, limits.max_image_pixels, limits.max_mask_runs)
                return png_decode(_b64(prompt.png_base64 or "", field), image_hw)
            except MaskTooLarge as err:
                limit = {"runs": "limits.max_mask_runs", "pixels": "limits.max_image_pixels"}[err.limit]
                raise APIError(413, f"{field}: {err} ({limit})", field, "mask_too_large") from err
            except MaskFormatError as err:
                raise APIError(status, f"{field}: {err}", field, "invalid_mask") from err
        raise APIError(400, f"{param}: unknown region prompt", param)  # pragma: no cover - pydantic's union

    def _job(
        self,
        image: np.ndarray,
        question: str,
        prompts: list[tuple[str, Any]],
        max_tokens: int | None,
        temperature: float,
        *,
        segment: bool,
        return_masks: bool,
        mask_encoding: MaskEncoding,
        tokens_param: str,
        regions_param: str,
        question_param: str,
        history: list[tuple[str, str]] | None = None,
        history_params: list[str] | None = None,
    ) -> Job:
        from medplib.inference import InvalidRequest

        limits = self.args.limits
        if len(prompts) > self.max_regions:
            raise APIError(
                400,
                f"{regions_param}: {len(prompts)} region prompts; this model takes at most "
                f"{self.max_regions}",
                regions_param,
                "too_many_regions",
            )
        max_new = max_tokens or limits.default_max_tokens
        if max_new > limits.max_tokens:
            raise APIError(
                400,
                f"{tokens_param}: {max_new} exceeds this server's limit of {limits.max_tokens}",
                tokens_param,
            )
        regions = [self._region(p, param, image.shape[:2]) for param, p in prompts]
        started = time.perf_counter()
        try:
            # The one prompt build and region rasterisation of this request; the job carries the result.
            encoded = self.predictor.encode(image, question, regions, history)
        except InvalidRequest as err:
            if err.field == "regions" and err.index is not None:
                param, code = prompts[err.index][0], "invalid_region"
            elif err.field == "history" and err.index is not None and history_params:
                param, code = history_params[err.index], "invalid_conversation"
            else:
                param, code = {"question": question_param}.get(err.field, err.field), None
            raise APIError(400, f"{param}: {err.detail}", param, code) from err
        return Job(
            encoded=encoded,
            max_new_tokens=max_new,
            temperature=temperature,
            segment=segment,
            encode_s=time.perf_counter() - started,
            return_masks=return_masks,
            mask_encoding=mask_encoding,
        )

    # --- the model --------------------------------------------------------------------------------------------------
    def run_batch(self, jobs: list[Job]) -> list[JobResult]:
        """Run jobs; those with the same generation settings share one `Predictor.run` pass."""
        results: list[JobResult | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.batch_key].append(i)
        with self._lock:  # one model call at a time per replica (the probe shares the model)
            for idx in groups.values():
                encoded = [jobs[i].encoded for i in idx]
                started = time.perf_counter()
                kwargs = jobs[idx[0]].run_options
                try:
                    preds = self.predictor.run(encoded, **kwargs)
                except ValueError:
                    # A client problem the checks missed: run one by one so it fails alone.
                    preds = []
                    for one in encoded:
                        try:
                            preds.append(self.predictor.run([one], **kwargs)[0])
                        except ValueError as err:
                            preds.append(APIError(400, str(err)))
                        except Exception as err:  # noqa: BLE001 - reported per job, as a 500
                            self.last_failure = err
                            preds.append(err)
                except Exception as err:  # noqa: BLE001 - the model cannot run: every job of the group fails
                    self.last_failure = err
                    preds = [err] * len(idx)
                for i, pred in zip(idx, preds, strict=True):
                    if isinstance(pred, BaseException):
                        results[i] = JobResult(error=pred, batch_size=len(idx), started_s=started)
                    else:
                        self.last_success_s = time.monotonic()
                        self.last_failure = None
                        results[i] = JobResult(pred, batch_size=len(idx), started_s=started)
        return [r if r is not None else JobResult(error=RuntimeError("job not run")) for r in results]

    def run_stream(self, job: Job, on_text: Any) -> JobResult:
        """One job alone, its answer handed to `on_text(delta)` while it is generated (the streaming path beside
        `run_batch`); errors come back in the result, as there."""
        with self._lock:
            started = time.perf_counter()
            try:
                (pred,) = self.predictor.run(
                    [job.encoded], on_text=lambda _row, delta: on_text(delta), **job.run_options
                )
            except ValueError as err:
                return JobResult(error=APIError(400, str(err)), started_s=started)
            except Exception as err:  # noqa: BLE001 - reported to the client as a 500 with an error id
                self.last_failure = err
                return JobResult(error=err, started_s=started)
            self.last_success_s = time.monotonic()
            self.last_failure = None
            return JobResult(pred, batch_size=1, started_s=started)

    def preview(self, req: PreviewRequest) -> PreviewResponse:
        """The slice of an image file the model would see, as PNG, with the file's slice count."""
        from medplib.data.rows import png_bytes

        raw = (
            parse_data_url(req.image, "image") if req.image.startswith("data:") else _b64(req.image, "image")
        )
        image = self._decode_image(raw, "image", req.slice_index)
        count = slice_count(raw)
        h, w = image.shape[:2]
        shown = req.slice_index if req.slice_index is not None else count // 2 if count > 1 else 0
        return PreviewResponse(
            png_base64=b64encode(png_bytes(image)), width=w, height=h, num_slices=count, slice_index=shown
        )

    def probe(self) -> None:
        """A one-token prediction with a box prompt on an image encoded once; raises when the model cannot run."""
        with self._lock:
            self.predictor.run([self._probe], max_new_tokens=1, segment=True)
            self.last_success_s = time.monotonic()
            self.last_failure = None

    def needs_probe(self) -> bool:
        recent = (
            self.last_success_s is not None
            and time.monotonic() - self.last_success_s < self.args.health_probe_interval_s
        )
        return self.last_failure is not None or not recent

    # --- results -> responses ---------------------------------------------------------------------------------------
    def _masks(self, job: Job, result: JobResult) -> list[MaskOut]:
        if not job.return_masks:
            return []
        out = []
        pred = result.prediction
        for k, (mask, score) in enumerate(zip(pred.masks, pred.scores, strict=True)):
            h, w = mask.shape
            out.append(
                MaskOut(
                    index=k,
                    size=[h, w],
                    score=score,
                    area=int(mask.sum()),
                    rle=MaskRLE(**encode_rle(mask)) if job.mask_encoding in ("rle", "both") else None,
                    png_base64=b64encode(png_encode(mask)) if job.mask_encoding in ("png", "both") else None,
                )
            )
        return out

    def _timings(self, job: Job, result: JobResult) -> Timings:
        t = result.prediction.timings
        return Timings(
            queue_s=max(0.0, result.started_s - job.created_s),
            preprocess_s=job.encode_s + t.get("preprocess_s", 0.0),
            generate_s=t.get("generate_s", 0.0),
            model_s=t.get("total_s", 0.0),
            server_s=time.perf_counter() - job.created_s,
            batch_size=result.batch_size,
            first_token_s=t.get("first_token_s"),
        )

    @staticmethod
    def _finish(job: Job, result: JobResult) -> str:
        return result.prediction.finish_reason

    def _usage(self, job: Job, result: JobResult) -> Usage:
        return Usage(
            prompt_tokens=job.prompt_tokens,
            completion_tokens=result.num_generated_tokens,
            total_tokens=job.prompt_tokens + result.num_generated_tokens,
        )

    def chat_response(self, job: Job, result: JobResult) -> ChatCompletion:
        return ChatCompletion(
            id=f"chatcmpl-{job.id}",
            created=int(time.time()),
            model=self.name,
            choices=[
                Choice(
                    message=AssistantMessage(content=result.prediction.text),
                    finish_reason=self._finish(job, result),
                )
            ],
            usage=self._usage(job, result),
            medplib=MedPLIBResult(masks=self._masks(job, result), timings=self._timings(job, result)),
        )

    def chat_first_chunk(self, job: Job) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=f"chatcmpl-{job.id}",
            created=int(time.time()),
            model=self.name,
            choices=[ChunkChoice(delta=Delta(role="assistant", content=""))],
        )

    def chat_delta_chunk(self, job: Job, delta: str) -> ChatCompletionChunk:
        """A piece of the answer, sent as soon as the model has generated it."""
        return ChatCompletionChunk(
            id=f"chatcmpl-{job.id}",
            created=int(time.time()),
            model=self.name,
            choices=[ChunkChoice(delta=Delta(content=delta))],
        )

    def chat_final_chunks(
        self, job: Job, result: JobResult, include_usage: bool
    ) -> Iterator[ChatCompletionChunk]:
        """After the answer: the chunk with `finish_reason`, the masks and timings, then usage if asked for."""
        cid, created = f"chatcmpl-{job.id}", int(time.time())
        yield ChatCompletionChunk(
            id=cid,
            created=created,
            model=self.name,
            choices=[ChunkChoice(delta=Delta(), finish_reason=self._finish(job, result))],
            medplib=MedPLIBResult(masks=self._masks(job, result), timings=self._timings(job, result)),
        )
        if include_usage:
            yield ChatCompletionChunk(
                id=cid, created=created, model=self.name, choices=[], usage=self._usage(job, result)
            )

    def predict_response(self, job: Job, result: JobResult) -> PredictResponse:
        return PredictResponse(
            id=f"pred-{job.id}",
            model=self.name,
            answer=result.prediction.text,
            masks=self._masks(job, result),
            num_generated_tokens=result.num_generated_tokens,
            prompt_tokens=job.prompt_tokens,
            timings=self._timings(job, result),
        )

    def models(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=self.name,
                    created=self.created,
                    source=self.args.model,
                    max_regions=self.max_regions,
                    max_tokens=self.args.limits.max_tokens,
                )
            ]
        )
