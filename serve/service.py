"""What a replica does, without Ray: turn API requests into model jobs, run jobs in batches, build responses.

`MedPLIBService` holds the `Predictor`. Every check that can fail because of the client (the image, the regions,
the limits, the question) happens in `job_from_chat` / `job_from_predict`, which end in `Predictor.encode`, before
a request joins a batch, so one bad request never fails its batch-mates; each raises `APIError` with the HTTP
status, the field at fault and a message saying what was expected. `run_batch` is the one place the model runs
(`Predictor.run`; Serve's `@serve.batch` calls it with up to `max_batch_size` jobs).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medplib.data.reading import ImageReadError
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
    ErrorBody,
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
    SliceAnswer,
    SliceMask,
    TextPart,
    Timings,
    Usage,
    VolumeJob,
    VolumeRequest,
    VolumeResult,
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


# ReadLimits fields -> the serve config's names for them, for messages.
_LIMIT_NAMES = {
    "max_pixels": "limits.max_image_pixels",
    "max_volume_bytes": "limits.max_volume_bytes",
    "max_files": "limits.max_volume_files",
}


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


def image_error(err: ImageReadError, param: str) -> APIError:
    """413 for an input over a limit (naming the limit), 400 for anything else the readers refused."""
    if err.problem == "too_large":
        detail = err.detail
        if err.limit in _LIMIT_NAMES:
            detail = detail.replace(f"({err.limit})", f"({_LIMIT_NAMES[err.limit]})")
        return APIError(413, f"{param}: {detail}", param, "too_large")
    return APIError(400, f"{param}: not a readable image: {err.detail}", param, "invalid_image")


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


class MedPLIBService:
    """The model plus everything between HTTP bodies and `Predictor.run` (see the module docstring)."""

    def __init__(self, args: AppArgs, predictor: Any | None = None, num_cpus: float = 1.0) -> None:
        import torch

        from medplib.inference import Predictor, resolve_model_source

        self.args = args
        # Every model call, the load included, runs on this one thread (`on_model_thread`): one call at a time per
        # replica, and one OpenMP pool. torch keeps a pool per thread that ran a parallel op, and with more pool
        # threads than CPUs libgomp stops spinning between ops: a model loaded on one thread and run on another
        # generated up to 1.7x slower at 2 torch threads (README, Serving).
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medplib-model")
        self._model_ident = self.model_thread.submit(threading.get_ident).result()
        threads = args.torch_threads or max(1, int(num_cpus))
        self.on_model_thread(torch.set_num_threads, threads)
        if predictor is None:
            device = args.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            t0 = time.perf_counter()
            predictor = self.on_model_thread(
                Predictor.from_pretrained, resolve_model_source(args.model), dtype=args.dtype, device=device
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
        self.last_success_s: float | None = None  # time.monotonic() of the last model call that worked
        self.last_failure: BaseException | None = None
        from medplib.data.schema import Box

        self.volume_store: Any = LocalJobStore()
        self._volume_jobs_running = 0
        self._volume_lock = threading.Lock()  # the job count only: never held while the model runs
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
        opts = req.medplib
        image = self._decode_image(
            parse_data_url(part.image_url.url, param), param, opts.view if opts else None
        )
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
        image = self._decode_image(raw, "image", req.image_view())
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

    def _decode_image(self, data: bytes, param: str, view: Any = None) -> np.ndarray:
        from medplib.data.image import load_image

        try:
            # Headers are checked against the limits before any pixel is decoded or any gzip inflated.
            return load_image(data, view=view, limits=self.args.limits.read_limits())
        except ImageReadError as err:
            raise image_error(err, param) from err

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

    # --- volumes ----------------------------------------------------------------------------------------------------
    def start_volume_job(self, req: VolumeRequest) -> VolumeJob:
        """Check the volume and the request (4xx like any request), then run it slice by slice in a thread; the
        job's state goes to `volume_store` after every batch."""
        from medplib.data.volume import load_volume
        from medplib.inference import InvalidRequest
        from medplib.volume_prediction import parse_slices

        limits = self.args.limits
        raw = (
            parse_data_url(req.image, "image") if req.image.startswith("data:") else _b64(req.image, "image")
        )
        try:
            volume = load_volume(raw, limits.read_limits(), name="image")
        except ImageReadError as err:
            raise image_error(err, "image") from err
        count = volume.num_slices(req.axis)
        if count > limits.max_volume_slices:
            raise APIError(
                413,
                f"image: {count} slices along axis {req.axis}; this server takes at most {limits.max_volume_slices} "
                "(limits.max_volume_slices)",
                "image",
            )
        try:
            selection = parse_slices(req.answer_slices, count)
        except ValueError as err:
            raise APIError(400, str(err), "answer_slices") from err
        if selection == "mask" and not req.segment:
            raise APIError(400, "answer_slices: 'mask' needs segment", "answer_slices")
        max_new = req.max_new_tokens or limits.default_max_tokens
        if max_new > limits.max_tokens:
            raise APIError(
                400,
                f"max_new_tokens: {max_new} exceeds this server's limit of {limits.max_tokens}",
                "max_new_tokens",
            )
        try:  # the question is the same for every slice: one encode says whether it fits
            self.predictor.encode(volume.display_slice(req.axis, 0, req.window), req.question)
        except InvalidRequest as err:
            raise APIError(
                400, f"{'question' if err.field == 'question' else err.field}: {err.detail}", err.field
            ) from err
        with self._volume_lock:
            if self._volume_jobs_running >= limits.max_volume_jobs:
                raise APIError(
                    503,
                    f"{self._volume_jobs_running} volume jobs are running on this replica "
                    f"(limits.max_volume_jobs); try again later",
                    code="busy",
                )
            self._volume_jobs_running += 1
        total = count if req.segment else len(selection) if isinstance(selection, list) else 1
        job = VolumeJob(
            id=f"vol-{uuid.uuid4().hex[:24]}", status="queued", slices_total=total, created=int(time.time())
        )
        self.volume_store.put(job.id, job.model_dump(mode="json"))
        threading.Thread(
            target=self._run_volume_job,
            args=(job, volume, req, max_new),
            name=f"medplib-{job.id}",
            daemon=True,
        ).start()
        return job

    def _run_volume_job(self, job: VolumeJob, volume: Any, req: VolumeRequest, max_new: int) -> None:
        from medplib.volume_prediction import predict_volume

        def progress(done: int, total: int) -> None:
            self.volume_store.put(
                job.id,
                job.model_copy(update={"status": "running", "slices_done": done}).model_dump(mode="json"),
            )

        try:
            pred = predict_volume(
                _ModelThreadPredictor(self),
                volume,
                req.question,
                axis=req.axis,
                window=req.window,
                answer_slices=req.answer_slices,
                segment=req.segment,
                batch_size=self.args.batching.max_batch_size,
                max_new_tokens=max_new,
                temperature=req.temperature,
                progress=progress,
            )
            done = job.model_copy(
                update={
                    "status": "done",
                    "slices_done": job.slices_total,
                    "result": self._volume_result(volume, pred, req),
                }
            )
            self.last_success_s = time.monotonic()
        except Exception as err:  # noqa: BLE001 - reported in the job, with an id in the log
            error_id = uuid.uuid4().hex[:16]
            logger.error("error_id=%s: volume job %s failed: %s", error_id, job.id, err, exc_info=err)
            done = job.model_copy(
                update={
                    "status": "failed",
                    "error": ErrorBody(
                        message=f"the volume job failed (error_id {error_id}); the server log has the details",
                        type="server_error",
                        code="internal_error",
                        error_id=error_id,
                    ),
                }
            )
        finally:
            with self._volume_lock:
                self._volume_jobs_running -= 1
        self.volume_store.put(job.id, done.model_dump(mode="json"))

    @staticmethod
    def _volume_result(volume: Any, pred: Any, req: VolumeRequest) -> VolumeResult:
        import gzip

        import nibabel as nib
        from nibabel.orientations import apply_orientation

        nifti = rle = None
        if pred.mask is not None and req.mask_format in ("nifti", "both"):
            data = nib.Nifti1Image(pred.mask.astype(np.uint8), volume.affine).to_bytes()
            nifti = b64encode(gzip.compress(data, compresslevel=6))
        if pred.mask is not None and req.mask_format in ("rle", "both"):
            ras = apply_orientation(pred.mask, volume.ornt)
            rle = [
                SliceMask(slice=k, rle=MaskRLE(**encode_rle(np.rot90(np.take(ras, k, axis=pred.axis)))))
                for k in pred.mask_slices
            ]
        return VolumeResult(
            answer=pred.answer,
            answers=[SliceAnswer(slice=k, answer=t) for k, t in pred.answers.items()],
            axis=pred.axis,
            slices_read=pred.slices_read,
            answer_slices=pred.answer_slices,
            mask_slices=pred.mask_slices,
            mask_nifti_base64=nifti,
            masks_rle=rle,
        )

    # --- the model --------------------------------------------------------------------------------------------------
    def run_batch(self, jobs: list[Job]) -> list[JobResult]:
        """Run jobs; those with the same generation settings share one `Predictor.run` pass."""
        results: list[JobResult | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.batch_key].append(i)
        for idx in groups.values():
            encoded = [jobs[i].encoded for i in idx]
            started = time.perf_counter()
            kwargs = jobs[idx[0]].run_options
            try:
                preds = self.on_model_thread(self.predictor.run, encoded, **kwargs)
            except ValueError:
                # A client problem the checks missed: run one by one so it fails alone.
                preds = []
                for one in encoded:
                    try:
                        preds.append(self.on_model_thread(self.predictor.run, [one], **kwargs)[0])
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
        started = time.perf_counter()
        try:
            (pred,) = self.on_model_thread(
                self.predictor.run,
                [job.encoded],
                on_text=lambda _row, delta: on_text(delta),
                **job.run_options,
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
        from medplib.data.image import slice_count
        from medplib.data.rows import png_bytes

        raw = (
            parse_data_url(req.image, "image") if req.image.startswith("data:") else _b64(req.image, "image")
        )
        view = req.image_view()
        image = self._decode_image(raw, "image", view)
        try:  # the headers load_image has just read and checked
            count = slice_count(raw, axis=view.axis if view else None, limits=self.args.limits.read_limits())
        except ImageReadError as err:
            raise image_error(err, "image") from err
        h, w = image.shape[:2]
        index = view.slice_index if view else None
        shown = index % count if index is not None else count // 2
        return PreviewResponse(
            png_base64=b64encode(png_bytes(image)), width=w, height=h, num_slices=count, slice_index=shown
        )

    def probe(self) -> None:
        """A one-token prediction with a box prompt on an image encoded once; raises when the model cannot run."""
        self.on_model_thread(self.predictor.run, [self._probe], max_new_tokens=1, segment=True)
        self.last_success_s = time.monotonic()
        self.last_failure = None

    def on_model_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on the model thread, the caller waiting for it (called there, it just runs)."""
        if threading.get_ident() == self._model_ident:
            return fn(*args, **kwargs)
        return self.model_thread.submit(fn, *args, **kwargs).result()

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


class LocalJobStore:
    """Volume job states in this process (`LocalBackend`, one replica); the oldest finished ones are dropped past
    `keep`. The Ray app replaces it with a named actor so that any replica answers a poll."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, job_id: str, state: dict[str, Any]) -> None:
        with self._lock:
            self._jobs[job_id] = state
            self._jobs.move_to_end(job_id)
            finished = [k for k, v in self._jobs.items() if v["status"] in ("done", "failed")]
            for k in finished[: max(0, len(self._jobs) - self.keep)]:
                del self._jobs[k]

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._jobs.get(job_id)


class _ModelThreadPredictor:
    """The replica's predictor for a volume job: each `run` (one batch of slices) is one call on the model thread,
    so the job interleaves with request batches instead of holding the model for the whole volume."""

    def __init__(self, service: MedPLIBService) -> None:
        self.service = service

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return self.service.predictor.encode(*args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self.service.on_model_thread(self.service.predictor.run, *args, **kwargs)
