"""The HTTP service: FastAPI endpoints over a :class:`~captcha_ocr.predict.Recognizer`.

    captcha-ocr serve outputs/models/captcha_model_latest.pth    # .pth or .onnx
    curl -F file=@image.png http://127.0.0.1:8000/predict

``POST /predict`` reads one image (multipart field ``file``, a raw ``image/*`` or
``application/octet-stream`` body, or JSON ``{"image": "<base64>"}``);
``POST /predict/batch`` reads several (multipart files or JSON ``{"images": [...]}``);
``GET /health`` describes the model. Every bad input gets a 4xx status and a
JSON body ``{"error": "..."}``.

Images are decoded in a worker thread and read by one inference thread. With
batching on, a queue gathers the images of requests that arrive within a few
milliseconds of each other and reads them in one forward pass.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import errno
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from captcha_ocr import __version__
from captcha_ocr.data.images import ImageError, Preprocessing, load_image
from captcha_ocr.predict import DEFAULT_VIEWS, Prediction, Recognizer

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of the service; each has a ``captcha-ocr serve`` option."""

    max_upload_bytes: int = 8 * 2**20
    # A CAPTCHA has a few thousand pixels, and 4 MP decoded as RGBA take 16 MB.
    max_pixels: int = 4_000_000
    max_batch_size: int = 64
    batching: bool = True
    batch_wait_ms: float = 2.0
    batch_max_images: int = 32

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be positive, got {getattr(self, name)}"
            for name in ("max_upload_bytes", "max_pixels", "max_batch_size", "batch_max_images")
            if getattr(self, name) <= 0
        ]
        if self.batch_wait_ms < 0:
            problems.append(f"batch_wait_ms must not be negative, got {self.batch_wait_ms}")
        if problems:
            raise ValueError("; ".join(problems))


class ApiError(Exception):
    """A rejected request, sent back as ``{"error": message}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PredictionOut(BaseModel):
    text: str
    confidence: float
    ms: float


class ErrorOut(BaseModel):
    error: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in (
        (400, "empty body, malformed JSON or invalid base64"),
        (413, "body over the upload limit, too many images, or an image over the pixel limit"),
        (415, "unsupported content type, or data that is not an image"),
        (422, "a JSON or multipart body without the expected fields, or an image that cannot be decoded"),
    )
}

_BINARY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["file"], "properties": {"file": {"type": "string", "format": "binary"}},
    }},
    "image/*": _BINARY,
    "application/octet-stream": _BINARY,
    "application/json": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string", "format": "byte", "description": "base64 of the image file"}},
    }},
}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object",
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
    }},
    "application/json": {"schema": {
        "type": "object", "required": ["images"],
        "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}},
    }},
}}}


@dataclass
class _Job:
    pixels: np.ndarray  # (k, H, W) uint8
    future: asyncio.Future


class MicroBatcher:
    """Reads the images of concurrent requests in shared forward passes.

    A pass starts when a request arrives and waits ``wait_s`` for others, then
    takes queued requests up to ``max_images`` images (a single request larger
    than that goes alone). It skips the wait when ``max_images`` are already
    queued, and when ``in_flight`` (the number of requests being handled) shows
    that every request in progress is already queued. Requests that arrive
    during a pass are queued for the next one, so under load the batches grow
    without any extra waiting.
    """

    def __init__(
        self, predict: Callable[[np.ndarray], list[Prediction]], executor: ThreadPoolExecutor,
        max_images: int, wait_s: float, in_flight: Callable[[], int] | None = None,
    ) -> None:
        self.predict = predict
        self.executor = executor
        self.max_images = max_images
        self.wait_s = wait_s
        self.in_flight = in_flight
        self.passes = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queued_images = 0
        self._current: list[_Job] = []

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._queued_images = 0
        self._task = self._loop.create_task(self._run())

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        waiting = list(self._current)
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for job in waiting:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the service is shutting down"))
        self._task = None

    async def submit(self, pixels: np.ndarray) -> list[Prediction]:
        if self._task is None or self._task.done() or self._loop is not asyncio.get_running_loop():
            self.start()
        job = _Job(pixels, self._loop.create_future())
        self._queued_images += len(pixels)
        self._queue.put_nowait(job)
        return await job.future

    async def _run(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            if self._worth_waiting():
                await asyncio.sleep(self.wait_s)
            count = len(jobs[0].pixels)
            while count < self.max_images and not self._queue.empty():
                job = self._queue.get_nowait()
                jobs.append(job)
                count += len(job.pixels)
            self._queued_images -= count
            self._current = jobs
            await self._forward(jobs)
            self._current = []

    def _worth_waiting(self) -> bool:
        if self.wait_s <= 0 or self._queued_images >= self.max_images:
            return False
        if self.in_flight is None:
            return True
        # One job is taken, the rest are in the queue. Only requests still being
        # read or decoded can join this pass.
        return self.in_flight() > 1 + self._queue.qsize()

    async def _forward(self, jobs: list[_Job]) -> None:
        try:
            pixels = np.concatenate([job.pixels for job in jobs])  # (sum of k, H, W)
            predictions = await self._loop.run_in_executor(self.executor, self.predict, pixels)
        except Exception as error:  # noqa: BLE001 - the error goes to every waiting request
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        self.passes += 1
        start = 0
        for job in jobs:
            end = start + len(job.pixels)
            # A request whose client went away has a cancelled future.
            if not job.future.done():
                job.future.set_result(predictions[start:end])
            start = end


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the body, rejecting it as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _multipart_files(request: Request, body: bytes) -> list[tuple[str, str, bytes]]:
    """Parse a multipart body that was already read, as (field name, file name, data) triples."""
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except StarletteHTTPException as error:
        raise ApiError(400, f"malformed multipart body: {error.detail}") from None
    try:
        return [
            (name, value.filename or name, await value.read())
            for name, value in form.multi_items() if isinstance(value, UploadFile)
        ]
    finally:
        await form.close()


def _base64_image(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise ApiError(422, f"{where} must be a base64 string, got {type(text).__name__}")
    text = "".join(text.split())
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where} is not valid base64") from None
    if not data:
        raise ApiError(400, f"{where} is empty")
    return data


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"malformed JSON body: {error}") from None


def _image_error_status(message: str) -> int:
    if message.startswith("empty"):
        return 400
    if "decompression bomb" in message:
        return 413
    if "not a recognised image format" in message:
        return 415
    return 422


def _decode_all(images: list[tuple[str, bytes]], preprocessing: Preprocessing) -> np.ndarray:
    """Decode named image bytes into uint8 pixels (N, H, W); the first bad one ends the request."""
    pixels = []
    for name, data in images:
        try:
            pixels.append(load_image(data, preprocessing))
        except ImageError as error:
            raise ApiError(_image_error_status(str(error)), f"{name}: {error}") from None
        except Exception as error:  # noqa: BLE001 - Pillow raises many types on hostile files
            raise ApiError(422, f"{name}: cannot decode image ({type(error).__name__})") from None
    return np.stack(pixels)


class Service:
    """The request handling behind the routes: limits, decoding, inference."""

    def __init__(self, recognizer: Recognizer, settings: ServeSettings) -> None:
        self.recognizer = recognizer
        self.settings = settings
        self.preprocessing = dataclasses.replace(recognizer.preprocessing, max_pixels=settings.max_pixels)
        # One inference thread: the backends spread one forward pass over the cores themselves.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captcha-ocr-inference")
        self.in_flight = 0
        self.batcher = MicroBatcher(
            recognizer.predict_pixels, self.executor, settings.batch_max_images, settings.batch_wait_ms / 1000,
            in_flight=lambda: self.in_flight,
        ) if settings.batching else None

    @contextmanager
    def counted(self) -> Iterator[None]:
        """Count a prediction request as in flight while it is handled."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def one_image(self, request: Request) -> tuple[str, bytes]:
        kind = _media_type(request)
        body = await _read_body(request, self.settings.max_upload_bytes)
        if not body:
            raise ApiError(400, "empty request body: send an image file")
        if kind == "multipart/form-data":
            files = {name: data for name, _, data in await _multipart_files(request, body)}
            if "file" not in files:
                raise ApiError(422, "multipart body has no file field named 'file'")
            return "file", files["file"]
        if kind == "application/json":
            payload = _json_body(body)
            if not isinstance(payload, dict) or "image" not in payload:
                raise ApiError(422, 'JSON body must be an object {"image": "<base64>"}')
            return "image", _base64_image(payload["image"], "image")
        if kind.startswith("image/") or kind in ("application/octet-stream", ""):
            return "body", body
        raise ApiError(
            415, f"unsupported content type {kind!r}: send multipart/form-data, image/*, "
            "application/octet-stream or application/json",
        )

    async def many_images(self, request: Request) -> list[tuple[str, bytes]]:
        kind = _media_type(request)
        body = await _read_body(request, self.settings.max_upload_bytes)
        if not body:
            raise ApiError(400, "empty request body: send image files")
        if kind == "multipart/form-data":
            files = await _multipart_files(request, body)
            self._check_count(len(files))
            return [(f"files[{i}] ({filename})", data) for i, (_, filename, data) in enumerate(files)]
        if kind == "application/json":
            payload = _json_body(body)
            if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
                raise ApiError(422, 'JSON body must be an object {"images": ["<base64>", ...]}')
            self._check_count(len(payload["images"]))
            return [(f"images[{i}]", _base64_image(text, f"images[{i}]")) for i, text in enumerate(payload["images"])]
        raise ApiError(415, f"unsupported content type {kind!r}: send multipart/form-data or application/json")

    def _check_count(self, count: int) -> None:
        if count == 0:
            raise ApiError(422, "the request contains no images")
        if count > self.settings.max_batch_size:
            raise ApiError(413, f"{count} images exceed the limit of {self.settings.max_batch_size} per request")

    async def read(self, images: list[tuple[str, bytes]]) -> list[Prediction]:
        pixels = await run_in_threadpool(_decode_all, images, self.preprocessing)
        if self.batcher is not None:
            return await self.batcher.submit(pixels)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.recognizer.predict_pixels, pixels)

    def health(self) -> dict[str, Any]:
        metadata = self.recognizer.metadata
        settings = self.settings
        return {
            "status": "ok",
            "version": __version__,
            "charset": self.recognizer.codec.alphabet,
            "model": {
                "file": Path(str(metadata.get("path", ""))).name,
                "format": metadata.get("format"),
                **{key: metadata.get(key) for key in ("session_id", "epoch", "metrics", "model_config", "ignore_case")},
                "preprocessing": self.preprocessing.to_dict(),
                "label_lengths": self.recognizer.label_lengths,
            },
            "limits": {
                "max_upload_bytes": settings.max_upload_bytes,
                "max_pixels": settings.max_pixels,
                "max_batch_size": settings.max_batch_size,
            },
            "batching": {
                "enabled": settings.batching,
                "wait_ms": settings.batch_wait_ms,
                "max_images": settings.batch_max_images,
                "forward_passes": self.batcher.passes if self.batcher else None,
            },
        }

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.executor.shutdown(wait=False)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# Paths, file names and messages come from clients: escape control characters so
# that one request always gives one log line.
_ESCAPED_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(32), 127)}


def _log_request(request: Request, status: int, ms: float) -> None:
    client = request.client.host if request.client else "-"
    error = getattr(request.state, "error", None)
    images = getattr(request.state, "images", None)
    if error:
        detail = f": {error}"
    elif images is not None:
        detail = f" ({images} image{'' if images == 1 else 's'})"
    else:
        detail = ""
    level = logging.INFO
    if status >= 500:
        level = logging.ERROR
    elif status >= 400:
        level = logging.WARNING
    line = f"{request.method} {request.url.path} {status} {ms:.1f} ms from {client}{detail}"
    logger.log(level, "%s", line.translate(_ESCAPED_CONTROLS))


def create_app(recognizer: Recognizer, settings: ServeSettings | None = None) -> FastAPI:
    """Build the FastAPI application for ``recognizer``; run it with any ASGI server."""
    service = Service(recognizer, settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if service.batcher is not None:
            service.batcher.start()
        yield
        await service.close()

    app = FastAPI(
        title="captcha-ocr", version=__version__, lifespan=lifespan,
        description="Reads CAPTCHA images with a trained CNN + recurrent + CTC recognizer.",
    )
    app.state.service = service

    @app.middleware("http")
    async def log_requests(request: Request, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            _log_request(request, 500, (time.perf_counter() - started) * 1000)
            raise
        _log_request(request, response.status_code, (time.perf_counter() - started) * 1000)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        request.state.error = error.message
        return _error(error.status, error.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        request.state.error = str(error.detail)
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        request.state.error = "invalid request"
        return _error(422, f"invalid request: {error.errors()}")

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("Unhandled error in %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(error).__name__}")

    @app.post("/predict", response_model=PredictionOut, responses=ERROR_RESPONSES, openapi_extra=PREDICT_BODY,
              summary="Read one image")
    async def predict(request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        with service.counted():
            image = await service.one_image(request)
            prediction = (await service.read([image]))[0]
        request.state.images = 1
        ms = (time.perf_counter() - started) * 1000
        return {"text": prediction.text, "confidence": prediction.confidence, "ms": round(ms, 3)}

    @app.post("/predict/batch", response_model=list[PredictionOut], responses=ERROR_RESPONSES,
              openapi_extra=BATCH_BODY, summary="Read several images; ms is the time of the whole request")
    async def predict_batch(request: Request) -> list[dict[str, Any]]:
        started = time.perf_counter()
        with service.counted():
            images = await service.many_images(request)
            predictions = await service.read(images)
        request.state.images = len(images)
        ms = round((time.perf_counter() - started) * 1000, 3)
        return [{"text": p.text, "confidence": p.confidence, "ms": ms} for p in predictions]

    @app.get("/health", summary="Model, charset, limits and batching")
    async def health() -> dict[str, Any]:
        return service.health()

    return app


def _route_server_logs() -> None:
    """Send uvicorn's own messages through the package's handlers, in the same line format."""
    package_logger = logging.getLogger("captcha_ocr")
    server_logger = logging.getLogger("uvicorn")
    for handler in package_logger.handlers:
        server_logger.addHandler(handler)
    server_logger.setLevel(logging.INFO)
    server_logger.propagate = False


def check_port_free(host: str, port: int) -> None:
    """Raise ValueError when ``host:port`` cannot be bound, before the model loads and anything is logged.

    Every address the host name resolves to is tried, as the server binds them all.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}; check --host") from None
    for family, kind, protocol, _, address in addresses:
        try:
            with socket.socket(family, kind, protocol) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                advice = "stop the program using that port or choose another with --port"
            else:
                advice = "check --host, which must be an address of this machine"
            raise ValueError(f"cannot listen on {host}:{port} ({error.strerror or error}); {advice}") from None


def serve(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    device: str | None = None,
    log_file: str | Path | None = None,
    any_length: bool = False,
    views: int = DEFAULT_VIEWS,
) -> int:
    """Load ``model_path`` and serve requests on ``host:port`` until interrupted."""
    import uvicorn

    from captcha_ocr.record.log import setup_logging

    setup_logging(Path(log_file) if log_file else None, console=True)
    _route_server_logs()
    check_port_free(host, port)
    recognizer = Recognizer.load(model_path, device=device, any_length=any_length, views=views)
    app = create_app(recognizer, settings)
    settings = app.state.service.settings
    logger.info(
        "Serving %s (%s, charset %r, %d views per image, %d member%s) on http://%s:%d; API docs at /docs",
        model_path, recognizer.metadata.get("format"), recognizer.codec.alphabet, recognizer.views,
        recognizer.members, "s" if recognizer.members > 1 else "", host, port,
    )
    logger.info(
        "Limits: %d bytes per request, %d pixels per image, %d images per batch request; batching %s",
        settings.max_upload_bytes, settings.max_pixels, settings.max_batch_size,
        f"on ({settings.batch_wait_ms:g} ms, up to {settings.batch_max_images} images)" if settings.batching else "off",
    )
    if host not in LOOPBACK_HOSTS:
        logger.warning("Listening on %s: the service has no authentication; anyone who can reach it can use it", host)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False)
    return 0
