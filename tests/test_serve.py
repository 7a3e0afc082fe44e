"""The HTTP service: every endpoint, the limits, bad input, batching and a real socket."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import re
import socket
import struct
import subprocess
import sys
import time
import zlib

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from captcha_ocr import commands
from captcha_ocr.cli import build_parser, main
from captcha_ocr.data.images import is_image_file
from captcha_ocr.predict import Prediction, Recognizer
from captcha_ocr.serve import MicroBatcher, ServeSettings, create_app
from tests.conftest import CASES

LIMITS = ServeSettings(max_upload_bytes=256_000, max_batch_size=4, max_pixels=1_000_000, batch_wait_ms=2)
LOG_LINE = re.compile(r"^\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\] \[(INFO|WARNING)\] (.*)$")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def small_header_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A 60-byte PNG whose header claims ``width`` x ``height`` grey pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def images(tiny_trained_model):
    paths = sorted(p for p in tiny_trained_model.val_dir.iterdir() if is_image_file(p))
    return [p.read_bytes() for p in paths[:4]]


@pytest.fixture(scope="module")
def expected(tiny_onnx_model, images):
    return Recognizer.load(tiny_onnx_model).predict_batch(images)


@pytest.fixture(scope="module")
def client(tiny_onnx_model):
    with TestClient(create_app(Recognizer.load(tiny_onnx_model), LIMITS)) as test_client:
        yield test_client


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ------------------------------------------------------------------ endpoints
@pytest.mark.parametrize("style", ["multipart", "raw image", "octet-stream", "json", "json data url"])
def test_predict_every_body_style(client, images, expected, style):
    image = images[0]
    if style == "multipart":
        response = client.post("/predict", files={"file": ("x.png", image, "image/png")})
    elif style == "raw image":
        response = client.post("/predict", content=image, headers={"Content-Type": "image/png"})
    elif style == "octet-stream":
        response = client.post("/predict", content=image, headers={"Content-Type": "application/octet-stream"})
    elif style == "json":
        response = client.post("/predict", json={"image": _b64(image)})
    else:
        response = client.post("/predict", json={"image": "data:image/png;base64," + _b64(image)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"text", "confidence", "ms"}
    assert body["text"] == expected[0].text
    assert body["confidence"] == pytest.approx(expected[0].confidence, abs=1e-6)
    assert body["ms"] > 0


def test_batch_reads_multipart_files_in_order(client, images, expected):
    files = [("files", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    assert [item["text"] for item in response.json()] == [p.text for p in expected]


def test_batch_reads_json_base64_images_in_order(client, images, expected):
    response = client.post("/predict/batch", json={"images": [_b64(image) for image in reversed(images)]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["text"] for item in body] == [p.text for p in reversed(expected)]
    assert all(set(item) == {"text", "confidence", "ms"} for item in body)


def test_health_describes_the_model_and_limits(client, tiny_trained_model):
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["charset"] == "0123456789"
    assert body["model"]["format"] == "captcha-ocr-onnx"
    assert body["model"]["session_id"] == tiny_trained_model.run_dir.name
    assert body["model"]["preprocessing"]["max_pixels"] == LIMITS.max_pixels
    assert body["model"]["label_lengths"] == [4]
    assert body["limits"] == {"max_upload_bytes": 256_000, "max_pixels": 1_000_000, "max_batch_size": 4}
    assert body["batching"]["enabled"] is True


def test_docs_and_openapi_describe_the_endpoints(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/predict/batch", "/health"} <= set(spec["paths"])
    body_types = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/json"} <= set(body_types)


# ------------------------------------------------------------------ bad input
def _truncated(image: bytes) -> bytes:
    return image[: len(image) // 2]


BAD_REQUESTS = {
    "empty body": (400, dict(content=b"", headers={"Content-Type": "image/png"})),
    "text sent as an image": (415, dict(content=b"hello, not an image", headers={"Content-Type": "image/png"})),
    "oversized body": (413, dict(content=b"\x00" * 300_000, headers={"Content-Type": "image/png"})),
    "small-header bomb": (413, dict(content=small_header_bomb(), headers={"Content-Type": "image/png"})),
    "over the pixel limit": (413, dict(content=small_header_bomb(1001, 1000), headers={"Content-Type": "image/png"})),
    "malformed JSON": (400, dict(content=b'{"image": "abc', headers={"Content-Type": "application/json"})),
    "deeply nested JSON": (400, dict(content=b"[" * 50_000, headers={"Content-Type": "application/json"})),
    "bad base64": (400, dict(json={"image": "not base64 at all!"})),
    "base64 of nothing": (400, dict(json={"image": ""})),
    "JSON without an image": (422, dict(json={"picture": "abc"})),
    "JSON image not a string": (422, dict(json={"image": 12})),
    "form-encoded body": (415, dict(content=b"a=b", headers={"Content-Type": "application/x-www-form-urlencoded"})),
    "multipart without 'file'": (422, dict(files={"upload": ("x.png", b"abc", "image/png")})),
    "multipart file that is empty": (400, dict(files={"file": ("x.png", b"", "image/png")})),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_single_requests_get_a_json_4xx(client, name):
    status, request = BAD_REQUESTS[name]
    response = client.post("/predict", **request)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str)
    assert error


def test_truncated_image_is_422(client, images):
    response = client.post("/predict", content=_truncated(images[0]), headers={"Content-Type": "image/png"})
    assert response.status_code == 422
    assert "decode" in response.json()["error"]


def test_bomb_file_beside_the_checkout_is_refused(client):
    bomb = CASES / "bad_files" / "bomb3.png"
    if not bomb.is_file():
        pytest.skip(f"{bomb} is absent")
    response = client.post("/predict", files={"file": ("bomb3.png", bomb.read_bytes(), "image/png")})
    assert response.status_code == 413
    assert "bomb" in response.json()["error"]


def test_bad_batch_requests_get_a_json_4xx(client, images):
    cases = [
        (413, dict(json={"images": [_b64(images[0])] * 5})),
        (413, dict(files=[("files", (f"{i}.png", images[0], "image/png")) for i in range(5)])),
        (422, dict(json={"images": []})),
        (422, dict(json={"images": "abc"})),
        (400, dict(json={"images": [_b64(images[0]), "%%%"]})),
        (415, dict(json={"images": [_b64(images[0]), _b64(b"plain text")]})),
        (415, dict(content=images[0], headers={"Content-Type": "image/png"})),
        (400, dict(content=b"{", headers={"Content-Type": "application/json"})),
    ]
    for status, request in cases:
        response = client.post("/predict/batch", **request)
        assert response.status_code == status, (request.keys(), response.text)
        assert response.json()["error"]


def test_batch_error_names_failing_image(client, images):
    response = client.post("/predict/batch", json={"images": [_b64(images[0]), _b64(b"plain text")]})
    assert response.json()["error"].startswith("images[1]")


def test_unknown_routes_return_json(client):
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get("/predict").status_code == 405


def test_requests_are_logged_with_status_and_time(client, images):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    service_logger = logging.getLogger("captcha_ocr.serve")
    service_logger.addHandler(handler)
    previous_level = service_logger.level
    service_logger.setLevel(logging.INFO)
    try:
        client.post("/predict", content=images[0], headers={"Content-Type": "image/png"})
        client.post("/predict", content=b"junk", headers={"Content-Type": "image/png"})
        client.post("/predict%1B[2Jx", content=b"x")
    finally:
        service_logger.removeHandler(handler)
        service_logger.setLevel(previous_level)
    messages = [(r.levelname, r.getMessage()) for r in records]
    assert re.fullmatch(r"POST /predict 200 [\d.]+ ms from testclient \(1 image\)", messages[0][1])
    level, message = messages[1]
    assert level == "WARNING"
    assert "415" in message
    assert "not a recognised image format" in message
    assert messages[2][1].startswith("POST /predict\\x1b[2Jx 404")


# ------------------------------------------------------------------ batching
def _fake_reader(calls: list[int]):
    def predict(pixels: np.ndarray) -> list[Prediction]:
        calls.append(len(pixels))
        return [Prediction(str(int(image[0, 0])), 1.0) for image in pixels]
    return predict


def test_micro_batcher_shares_passes():
    from concurrent.futures import ThreadPoolExecutor

    calls: list[int] = []

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(_fake_reader(calls), executor, max_images=4, wait_s=0.05)
            requests = [np.full((size, 2, 2), marker, dtype=np.uint8) for marker, size in ((1, 1), (2, 2), (3, 1), (4, 1), (5, 1))]
            results = await asyncio.gather(*(batcher.submit(r) for r in requests))
            await batcher.stop()
            return results

    results = asyncio.run(scenario())
    assert [[p.text for p in result] for result in results] == [["1"], ["2", "2"], ["3"], ["4"], ["5"]]
    assert calls == [4, 2]


def test_micro_batcher_propagates_failure():
    from concurrent.futures import ThreadPoolExecutor

    def broken(pixels):
        raise RuntimeError("inference failed")

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(broken, executor, max_images=8, wait_s=0.01)
            outcomes = await asyncio.gather(
                *(batcher.submit(np.zeros((1, 2, 2), np.uint8)) for _ in range(3)), return_exceptions=True
            )
            await batcher.stop()
            return outcomes

    assert [str(outcome) for outcome in asyncio.run(scenario())] == ["inference failed"] * 3



def test_micro_batcher_skips_wait_when_alone():
    from concurrent.futures import ThreadPoolExecutor

    calls: list[int] = []

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(_fake_reader(calls), executor, max_images=8, wait_s=60, in_flight=lambda: 1)
            # wait_for raises TimeoutError if the batcher waits its 60 s.
            result = await asyncio.wait_for(batcher.submit(np.ones((1, 2, 2), np.uint8)), timeout=10)
            await batcher.stop()
            return result

    assert [p.text for p in asyncio.run(scenario())] == ["1"]
    assert calls == [1]


def test_micro_batcher_waits_for_requests_in_progress():
    from concurrent.futures import ThreadPoolExecutor

    calls: list[int] = []

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(_fake_reader(calls), executor, max_images=8, wait_s=1.0, in_flight=lambda: 2)

            async def late_request():
                await asyncio.sleep(0.1)
                return await batcher.submit(np.full((1, 2, 2), 2, np.uint8))

            results = await asyncio.gather(batcher.submit(np.ones((1, 2, 2), np.uint8)), late_request())
            await batcher.stop()
            return results

    assert [[p.text for p in result] for result in asyncio.run(scenario())] == [["1"], ["2"]]
    assert calls == [2]

@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_read_correctly(tiny_onnx_model, images, expected, batching):
    settings = ServeSettings(batching=batching, batch_wait_ms=20)
    app = create_app(Recognizer.load(tiny_onnx_model), settings)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            responses = await asyncio.gather(*(
                http.post("/predict", content=images[i % len(images)], headers={"Content-Type": "image/png"})
                for i in range(8)
            ))
            health = (await http.get("/health")).json()
        await app.state.service.close()
        return responses, health

    responses, health = asyncio.run(scenario())
    assert [r.json()["text"] for r in responses] == [expected[i % len(images)].text for i in range(8)]
    assert health["batching"]["enabled"] is batching
    if batching:
        assert health["batching"]["forward_passes"] < 8


def test_serve_pth_model(tiny_trained_model, images):
    reader = Recognizer.load(tiny_trained_model.model, device="cpu")
    with TestClient(create_app(reader, ServeSettings(batching=False))) as test_client:
        response = test_client.post("/predict", files={"file": ("x.png", images[1], "image/png")})
        assert response.status_code == 200
        assert response.json()["text"] == reader.predict(images[1]).text
        assert test_client.get("/health").json()["model"]["format"] == "pytorch"


# ------------------------------------------------------------------ command line
def test_serve_cli_defaults_match_library():
    args = build_parser().parse_args(["serve", "model.onnx"])
    defaults = ServeSettings()
    assert args.host == "127.0.0.1"
    assert (args.max_upload_bytes, args.max_pixels, args.max_batch_size) == (
        defaults.max_upload_bytes, defaults.max_pixels, defaults.max_batch_size,
    )
    assert (args.batching, args.batch_wait_ms, args.batch_max_images) == (
        defaults.batching, defaults.batch_wait_ms, defaults.batch_max_images,
    )


def test_missing_server_packages_one_line(monkeypatch, capsys, tiny_onnx_model):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real_find_spec(name, *a))
    assert main(["serve", str(tiny_onnx_model)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "captcha-ocr serve: error: serving needs uvicorn: in the captcha-ocr checkout, pip install -e '.[serve]'"
    assert commands.register_serve in commands.REGISTRARS


def test_busy_port_one_line_error(capsys, tiny_onnx_model):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", str(tiny_onnx_model), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}" in captured.err
    assert "choose another with --port" in captured.err
    assert "Serving" not in captured.err + captured.out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _post(port: int, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_real_server_on_a_loopback_port(tiny_onnx_model, images, expected, tmp_path):
    port = _free_port()
    log_file = tmp_path / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "captcha_ocr", "serve", str(tiny_onnx_model), "--port", str(port), "--log-file", str(log_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _ = _get(port, "/health")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start:\n{server.communicate()[0]}") from None
                time.sleep(0.2)
        assert status == 200
        status, body = _post(port, "/predict", images[0], "image/png")
        assert status == 200
        assert json.loads(body)["text"] == expected[0].text
        status, body = _post(port, "/predict", b"\x89PNG broken", "image/png")
        assert status in (415, 422)
        assert "error" in json.loads(body)
        status, _ = _get(port, "/x%0A%5B2024%5D%20forged")
        assert status == 404
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    lines = [line for line in log_file.read_text(encoding="utf-8").splitlines() if line]
    assert all(LOG_LINE.match(line) for line in lines), lines
    assert any(re.search(r"\] \[INFO\] Serving .* on http://127\.0\.0\.1:\d+", line) for line in lines)
    assert any(re.search(r"\] \[INFO\] POST /predict 200 [\d.]+ ms from 127\.0\.0\.1", line) for line in lines)
    assert any(re.search(r"\] \[WARNING\] POST /predict 4\d\d ", line) for line in lines)
    # The encoded newline in the path must not start a line of its own.
    assert any(re.search(r"\] GET /x.*forged 404 ", line) for line in lines)
    assert "Traceback" not in output
