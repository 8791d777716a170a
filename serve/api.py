"""The HTTP API: a FastAPI app built per replica around a `Backend` (Ray Serve's replica, or `LocalBackend`).

`create_api(backend)` returns the app. Routes: `POST /v1/chat/completions` (OpenAI-compatible, multi-turn, SSE
streaming token by token), `POST /v1/predict` (native), `POST /v1/preview` (a file's slice as PNG),
`POST /v1/volumes` + `GET /v1/volumes/{id}` (volume jobs), `GET /v1/models`, `GET /healthz`, the demo page
`GET /demo`, plus FastAPI's `/docs` and `/openapi.json` (bearer scheme declared).

Before a route sees a request, `GuardMiddleware` checks, in this order: the API key (401), the content type of a
POST (415), the body size (413, from Content-Length before any byte is read, and while reading). Every error is
OpenAI's `{"error": {"message", "type", "param", "code"}}`; client mistakes are 4xx naming the field, and an
unexpected exception is a 500 whose `error_id` is logged with the traceback.

The event loop only moves bytes: a POST body is parsed, validated and turned into a job (image and mask decoding,
tokenising) on a small thread pool, with work and memory bounded by the limits, so one costly request never
stalls `/healthz` or the requests behind it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorBody,
    ErrorResponse,
    Health,
    ModelList,
    PredictRequest,
    PredictResponse,
    PreviewRequest,
    PreviewResponse,
    VolumeJob,
    VolumeRequest,
)
from serve.service import APIError, Job, JobResult, MedPLIBService

logger = logging.getLogger("ray.serve.medplib")

# The demo page itself is public (it holds no data); the API calls it makes send the key the user types in.
PUBLIC_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/demo"})
ROUTES = frozenset(
    {"/v1/chat/completions", "/v1/predict", "/v1/preview", "/v1/volumes", "/v1/models", "/healthz", "/demo"}
)
DEMO_PAGE = Path(__file__).with_name("static") / "demo.html"
# Threads that turn request bodies into jobs (JSON, validation, image and mask decoding, tokenising), so the event
# loop only moves bytes and `/healthz` answers whatever a body costs. More threads than cores add memory, not speed.
PARSE_THREADS = 4


class Backend(Protocol):
    """What the API needs from whoever runs the model."""

    service: MedPLIBService
    api_key: str | None
    arriving: int  # requests being parsed, not yet handed to `generate`

    async def generate(self, job: Job) -> JobResult: ...

    async def stream(self, job: Job, on_text: Callable[[str], None]) -> JobResult:
        """Run `job` alone (`MedPLIBService.run_stream`) on the model's thread, `on_text` called from there."""
        ...

    def record_request(self, route: str, status: int, latency_s: float) -> None: ...

    def record_error(self, kind: str) -> None: ...

    def record_result(self, result: JobResult, masks_returned: int) -> None: ...

    async def volume_job(self, job_id: str) -> dict[str, Any] | None: ...


class LocalBackend:
    """Runs jobs one at a time in a thread, no Ray: for tests and for debugging the API in one process."""

    def __init__(self, service: MedPLIBService, api_key: str | None = None) -> None:
        self.service = service
        self.api_key = api_key
        self.arriving = 0
        self.errors: dict[str, int] = {}

    async def generate(self, job: Job) -> JobResult:
        return (await asyncio.to_thread(self.service.run_batch, [job]))[0]

    async def stream(self, job: Job, on_text: Callable[[str], None]) -> JobResult:
        return await asyncio.to_thread(self.service.run_stream, job, on_text)

    def record_request(self, route: str, status: int, latency_s: float) -> None:
        pass

    def record_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def record_result(self, result: JobResult, masks_returned: int) -> None:
        pass

    async def volume_job(self, job_id: str) -> dict[str, Any] | None:
        return self.service.volume_store.get(job_id)


def serve_in_thread(
    backend: Backend, host: str = "127.0.0.1", port: int = 0
) -> tuple[str, Callable[[], None]]:
    """The API of `backend` over real HTTP from a uvicorn thread, no Ray (tests, benchmarks, debugging): returns
    the base URL and a function that stops the server. Port 0 takes a free one."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(create_api(backend), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the API server thread stopped during start-up")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return f"http://{host}:{sock.getsockname()[1]}", stop


def error_json(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> Response:
    # ensure_ascii: a message that quotes the client (a lone surrogate in a tag, say) must still encode
    content = json.dumps(ErrorResponse(error=body).model_dump(exclude_none=True), ensure_ascii=True)
    return Response(content, status_code=status, headers=headers, media_type="application/json")


def api_error_response(err: APIError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return error_json(
        err.status, ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code), headers
    )


def internal_error(backend: Backend | None, exc: BaseException, where: str) -> ErrorBody:
    """Log `exc` with a fresh error id and return the body the client gets (the id, no internals)."""
    error_id = uuid.uuid4().hex[:16]
    logger.error("error_id=%s: %s failed: %s: %s", error_id, where, type(exc).__name__, exc, exc_info=exc)
    if backend is not None:
        backend.record_error("internal")
    return ErrorBody(
        message=f"internal server error (error_id {error_id}); the server log has the details",
        type="server_error",
        code="internal_error",
        error_id=error_id,
    )


class _BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body past the limit; an HTTPException so FastAPI's body parser lets it through."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


class GuardMiddleware:
    """API key, content type and body size checks, request metrics, and the last-resort 500 (pure ASGI)."""

    def __init__(self, app: ASGIApp, backend: Backend, max_request_bytes: int) -> None:
        self.app = app
        self.backend = backend
        self.max_bytes = max_request_bytes

    def _check(self, scope: Scope, path: str) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.backend.api_key
        if key and path not in PUBLIC_PATHS:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if not auth:
                return APIError(
                    401,
                    "missing API key: send the header 'Authorization: Bearer <key>'",
                    "Authorization",
                    "missing_api_key",
                )
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return APIError(401, "invalid API key in the Authorization header", "Authorization")
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return APIError(
                    415, f"Content-Type must be application/json, got {ctype or 'none'!r}", "Content-Type"
                )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return APIError(400, f"Content-Length {length!r} is not a number", "Content-Length")
            if int(length) > self.max_bytes:
                return self._too_large(int(length))
        return None

    def _too_large(self, size: int | None) -> APIError:
        what = f"{size} bytes" if size is not None else "larger than that"
        return APIError(
            413,
            f"request body is {what}; this server takes at most {self.max_bytes} bytes "
            "(limits.max_request_bytes)",
            "body",
            "request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        path = scope["path"]
        path = path[len(root) :] if root and path.startswith(root) else path
        route = path if path in ROUTES else "other"
        started = time.perf_counter()
        state = {"status": 0}

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self._too_large(None).message)
            return message

        try:
            problem = self._check(scope, path)
            if problem is not None:
                self.backend.record_error(problem.code or "client")
                await api_error_response(problem)(scope, receive, send_tracked)
                return
            await self.app(scope, receive_limited, send_tracked)
        except _BodyTooLarge:
            if not state["status"]:
                self.backend.record_error("request_too_large")
                await api_error_response(self._too_large(None))(scope, receive, send_tracked)
        except Exception as exc:  # noqa: BLE001 - the one place an unexpected error becomes a 500
            body = internal_error(self.backend, exc, f"{scope['method']} {path}")
            if not state["status"]:
                await error_json(500, body)(scope, receive, send_tracked)
        finally:
            self.backend.record_request(route, state["status"] or 500, time.perf_counter() - started)


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "body"


def _sse(payload: Any) -> str:
    text = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {text}\n\n"


def parse_body(model: type[BaseModel], raw: bytes, max_values: int) -> Any:
    """A request body as `model`, with FastAPI's errors (400 not JSON, 422 naming the field), in bounded memory:
    the JSON values are counted (every one after the first follows a ',', '[' or '{') before any is built."""
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if values > max_values:
        raise APIError(
            413,
            f"request body holds up to {values} JSON values; this server takes at most {max_values} "
            "(limits.max_json_values)",
            "body",
            "request_too_large",
        )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        error = {"type": "json_invalid", "loc": ("body", err.pos), "msg": "JSON decode error", "input": {}}
        raise RequestValidationError([{**error, "ctx": {"error": err.msg}}]) from err
    except (RecursionError, ValueError) as err:  # nesting past the stack, a 5000-digit number, not UTF-8
        raise APIError(400, f"request body is not usable JSON: {err}", "body", "invalid_json") from err
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = err.errors(include_url=False, include_input=False)
        raise RequestValidationError([{**p, "loc": ("body", *p["loc"])} for p in problems]) from err


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route that reads its body itself (off the event loop): the body's schema."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def create_api(backend: Backend) -> FastAPI:
    """The FastAPI app around `backend` (one per replica)."""
    service = backend.service
    limits = service.args.limits
    api = FastAPI(
        title="MedPLIB",
        version="1",
        description="Biomedical VQA with region prompts and pixel-level grounding. OpenAI-compatible chat "
        "completions (masks in the `medplib` object) and a native /v1/predict.",
    )
    errors = {
        code: {"model": ErrorResponse, "description": text}
        for code, text in [
            (400, "bad request: the message names the field"),
            (401, "missing or wrong API key"),
            (413, "body or image too large"),
            (415, "not JSON, or not an image"),
            (422, "a field failed validation"),
            (500, "server error (with error_id)"),
            (504, "the model did not answer in time"),
        ]
    }

    @api.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> Response:
        backend.record_error(err.code or "client")
        return api_error_response(err)

    @api.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> Response:
        problems = err.errors()
        first = problems[0] if problems else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
        if first.get("type") == "json_invalid":
            backend.record_error("invalid_json")
            detail = first.get("ctx", {}).get("error", first["msg"])
            body = ErrorBody(
                message=f"request body is not valid JSON: {detail}",
                type="invalid_request_error",
                param="body",
                code="invalid_json",
            )
            return error_json(400, body)
        messages = [
            f"{_loc(tuple(p['loc']))}: {p['msg'].removeprefix('Value error, ')}" for p in problems[:5]
        ]
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        backend.record_error("validation")
        return error_json(
            422,
            ErrorBody(
                message="; ".join(messages) + more,
                type="invalid_request_error",
                param=_loc(tuple(first["loc"])),
                code="invalid_value",
            ),
        )

    @api.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(err.status_code)
        backend.record_error(code or f"http_{err.status_code}")
        return error_json(
            err.status_code,
            ErrorBody(
                message=str(err.detail),
                type="invalid_request_error",
                param="body" if err.status_code == 413 else None,
                code=code,
            ),
        )

    api.add_middleware(GuardMiddleware, backend=backend, max_request_bytes=limits.max_request_bytes)
    # Declares the bearer scheme in the OpenAPI schema (so /docs can send the key); GuardMiddleware checks it.
    key = Depends(HTTPBearer(auto_error=False, description="the server's API key (MEDPLIB_API_KEY)"))

    parse_pool = ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="medplib-parse")

    def parse_and_build(model: type[BaseModel], raw: bytes, build: Callable[[Any], Any]) -> tuple[Any, Any]:
        body = parse_body(model, raw, limits.max_json_values)
        return body, build(body)

    async def off_loop(raw: bytes, model: type[BaseModel], build: Callable[[Any], Any]) -> tuple[Any, Any]:
        """(the body as `model`, `build(body)`), both worked out on the parse threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(parse_pool, parse_and_build, model, raw, build)

    async def parse(request: Request, model: type[BaseModel], build: Callable[[Any], Job]) -> tuple[Any, Job]:
        raw = await request.body()
        # Requests on their way to the batch queue; the deployment's batch wait reads the count.
        backend.arriving += 1
        try:
            return await off_loop(raw, model, build)
        finally:
            backend.arriving -= 1

    async def run(job: Job) -> JobResult:
        try:
            result = await asyncio.wait_for(backend.generate(job), timeout=limits.request_timeout_s)
        except asyncio.TimeoutError as err:
            raise APIError(
                504,
                f"the model did not answer within {limits.request_timeout_s:g} s (limits.request_timeout_s)",
                code="timeout",
            ) from err
        if result.error is not None:
            raise result.error
        backend.record_result(result, len(result.prediction.masks) if job.return_masks else 0)
        return result

    async def stream_events(job: Job, include_usage: bool) -> AsyncIterator[str]:
        """SSE events of a streamed completion: each piece of the answer as the model generates it (the model
        thread hands it over through a queue), then the chunk with the masks, then `[DONE]`."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        deadline = loop.time() + limits.request_timeout_s
        yield _sse(service.chat_first_chunk(job))
        model = asyncio.ensure_future(
            backend.stream(job, lambda delta: loop.call_soon_threadsafe(pieces.put_nowait, delta))
        )
        try:
            while not model.done():
                piece = asyncio.ensure_future(pieces.get())
                await asyncio.wait(
                    {piece, model},
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if piece.done():
                    yield _sse(service.chat_delta_chunk(job, piece.result()))
                    continue
                piece.cancel()
                if not model.done():
                    raise APIError(
                        504,
                        f"the model did not answer within {limits.request_timeout_s:g} s (limits.request_timeout_s)",
                        code="timeout",
                    )
            # Pieces queued before the model call returned are all in the queue by now (callbacks run in order).
            while not pieces.empty():
                yield _sse(service.chat_delta_chunk(job, pieces.get_nowait()))
            result = model.result()
            if result.error is not None:
                raise result.error
            backend.record_result(result, len(result.prediction.masks) if job.return_masks else 0)
            for chunk in service.chat_final_chunks(job, result, include_usage):
                yield _sse(chunk)
        except APIError as err:
            backend.record_error(err.code or "client")
            yield _sse(
                ErrorResponse(
                    error=ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code)
                )
            )
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
            yield _sse(
                ErrorResponse(error=internal_error(backend, exc, "POST /v1/chat/completions (stream)"))
            )
        yield _sse("[DONE]")

    stream_doc = {
        "content": {"text/event-stream": {}},
        "description": "a completion, or SSE chunks with stream",
    }

    @api.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={**errors, 200: stream_doc},
        dependencies=[key],
        openapi_extra=_body_doc(ChatCompletionRequest),
    )
    async def chat_completions(request: Request) -> Any:
        """OpenAI chat completion; the `medplib` object of the request carries region prompts, of the response the
        masks. With `stream: true` the answer comes as server-sent events ending in `data: [DONE]`."""
        body, job = await parse(request, ChatCompletionRequest, service.job_from_chat)
        if not body.stream:
            return service.chat_response(job, await run(job))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            stream_events(job, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @api.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=errors,
        dependencies=[key],
        openapi_extra=_body_doc(PredictRequest),
    )
    async def predict(request: Request) -> PredictResponse:
        """Native prediction: image (base64), question, region prompts -> answer, masks, timings."""
        _, job = await parse(request, PredictRequest, service.job_from_predict)
        return service.predict_response(job, await run(job))

    @api.post(
        "/v1/preview",
        response_model=PreviewResponse,
        responses=errors,
        dependencies=[key],
        openapi_extra=_body_doc(PreviewRequest),
    )
    async def preview(request: Request) -> PreviewResponse:
        """The slice of an image file (PNG, JPEG, DICOM, NIfTI) the model sees, as PNG, and how many slices the
        file has: the demo page shows DICOM and NIfTI through it."""
        _, response = await off_loop(await request.body(), PreviewRequest, service.preview)
        return response

    @api.get("/demo", response_class=HTMLResponse, include_in_schema=False)
    async def demo() -> HTMLResponse:
        """The demo page: upload, draw a region, ask, see the mask (it calls /v1/preview and /v1/predict)."""
        return HTMLResponse(DEMO_PAGE.read_text())

    @api.post(
        "/v1/volumes",
        response_model=VolumeJob,
        status_code=202,
        responses=errors,
        dependencies=[key],
        openapi_extra=_body_doc(VolumeRequest),
    )
    async def start_volume(request: Request) -> VolumeJob:
        """A NIfTI or zipped DICOM series and a question -> a job that reads it slice by slice; poll
        `GET /v1/volumes/{id}` for progress and, when done, the answers and the 3-D mask."""
        # Reading the volume and checking the question take CPU: on the parse threads, like any body.
        _, job = await off_loop(await request.body(), VolumeRequest, service.start_volume_job)
        return job

    @api.get(
        "/v1/volumes/{job_id}",
        response_model=VolumeJob,
        responses={401: errors[401], 404: errors[400]},
        dependencies=[key],
    )
    async def volume_status(job_id: str) -> VolumeJob:
        """A volume job's progress (`slices_done` of `slices_total`), then its result or error."""
        state = await backend.volume_job(job_id)
        if state is None:
            raise APIError(
                404, f"job_id: no volume job {job_id!r} (finished jobs are kept for a while only)", "job_id"
            )
        return VolumeJob.model_validate(state)

    @api.get("/v1/models", response_model=ModelList, responses={401: errors[401]}, dependencies=[key])
    async def models() -> ModelList:
        """The model this deployment serves (OpenAI's list format)."""
        return service.models()

    @api.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz() -> Any:
        """Liveness without running the model (Serve's own health check runs a probe); no API key needed."""
        ago = None if service.last_success_s is None else time.monotonic() - service.last_success_s
        if service.last_failure is not None:
            detail = f"last model call failed: {type(service.last_failure).__name__}"
            return JSONResponse(
                Health(
                    status="unhealthy", model=service.name, last_success_s_ago=ago, detail=detail
                ).model_dump(),
                status_code=503,
            )
        return Health(status="ok", model=service.name, last_success_s_ago=ago)

    default_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        # The POST routes read their bodies themselves, so FastAPI does not see the request models: add them.
        if api.openapi_schema is None:
            schema = default_openapi()
            _, defs = models_json_schema(
                [
                    (m, "validation")
                    for m in (ChatCompletionRequest, PredictRequest, PreviewRequest, VolumeRequest)
                ],
                ref_template="#/components/schemas/{model}",
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api
