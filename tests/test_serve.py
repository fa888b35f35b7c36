"""Serving: the large-picture fill on its own, then `python jobs/serve.py` as a user starts it (a real local Ray
and Serve in a subprocess) answering real HTTP requests: fills whose known pixels are the input's, every kind
of bad input refused with one line while it keeps serving, batching, the page driven in a real headless
Chromium over the DevTools protocol, and moving the `best` alias to a new version. (`serve deploy` on a
`ray start` cluster, whose replicas must set up their own process: tests/test_cluster.py.)

One server serves the tests of this file (module-scoped); the alias test runs last of them, as it changes what is
served.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import requests
import test_evaluate
import torch
import yaml
from helpers import REPO
from mlflow import MlflowClient
from PIL import Image
from ray.serve.schema import ServeDeploySchema

from inpaint import fill, tracking
from inpaint.config import load_config
from inpaint.data import to_float_images, to_uint8_images
from inpaint.evaluate import load_model
from inpaint.masks import apply_holes
from inpaint.models import model_input
from inpaint.serve import SETTINGS, HTTPError, Inpainter, build_app, parse_form, settings_from

trained = test_evaluate.trained  # the tiny model, registered as `tiny` version 1 in a SQLite MLflow store
MAX_PIXELS = 40_000  # the test server's limits, small so that refusing is cheap
MAX_BODY = 150_000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only waits for the first (and the server's replica has one CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def picture(height: int = 40, width: int = 48, seed: int = 0) -> np.ndarray:
    """A smooth picture (as the tiny model learnt on): coarse random blocks."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(coarse.repeat(8, 0).repeat(8, 1)[:height, :width])


def rectangle(height: int, width: int, top: int, left: int, rows: int, cols: int) -> np.ndarray:
    hole = np.zeros((height, width), bool)
    hole[top : top + rows, left : left + cols] = True
    return hole


# ---------------------------------------------------------------------------------------------
# The large-picture fill, without a server


def test_full_mode_is_the_plain_pass(trained):
    image, hole = picture(44, 52), rectangle(44, 52, 10, 12, 11, 11)
    target, mask = to_float_images(image[None]), torch.from_numpy(hole[None, None]).float()
    plain = to_uint8_images(fill.model_fill(trained.model, apply_holes(target, mask), mask))[0]
    expected = np.where(hole[..., None], plain, image)
    np.testing.assert_array_equal(fill.inpaint_image(trained.model, image, hole, mode="full"), expected)


def test_scaled_mode_shrinks_a_large_hole_to_the_training_scale(trained):
    image = picture(300, 451)
    hole = rectangle(300, 451, 100, 200, 40, 50) | rectangle(300, 451, 250, 0, 12, 451)
    patches = fill.plan(image, hole, "scaled", trained.model.train_scale)
    square, stripe = sorted(patches, key=lambda p: p.paste.shape[1])
    assert square.scaled and max(square.masked.shape[1:]) <= 40  # 40 px thick → about 12, with context
    assert 9 <= square.mask[0].sum(0).max() <= 16  # the hole, shrunk to about the training hole size
    assert not stripe.scaled and stripe.paste.sum() == 12 * 451  # 12 px thick already: full resolution
    filled = fill.inpaint_image(trained.model, image, hole, mode="scaled")
    np.testing.assert_array_equal(filled[~hole], image[~hole])
    assert (filled[hole] != image[hole]).any()


def test_fill_many_runs_one_batch_per_input_size(trained):
    batches = []
    counting = trained.model.register_forward_pre_hook(lambda _, inputs: batches.append(tuple(inputs[0].shape)))
    items = [(picture(32, 32, seed), rectangle(32, 32, 8, 8, 10, 10), "full") for seed in range(3)]
    items.append((picture(40, 48), rectangle(40, 48, 8, 8, 10, 10), "full"))
    try:
        out = fill.fill_many(trained.model, items)
    finally:
        counting.remove()
    assert sorted(batches) == [(1, 4, 40, 48), (3, 4, 32, 32)]
    for (image, hole, _), filled in zip(items, out, strict=True):
        np.testing.assert_array_equal(filled, fill.inpaint_image(trained.model, image, hole))


def test_multipart_bodies_round_trip():
    files = {"image": ("a.png", b"\r\n--x\r\n\x00\xff" * 50, "image/png"), "mask": ("m.png", b"", "image/png")}
    prepared = requests.Request("POST", "http://127.0.0.1/", files=files).prepare()
    content_type = prepared.headers["Content-Type"]
    assert asyncio.run(parse_form(prepared.body, content_type)) == {k: v[1] for k, v in files.items()}
    for body, kind, status in [(b"{}", "application/json", 415), (b"garbage", content_type, 400)]:
        with pytest.raises(HTTPError) as refused:
            asyncio.run(parse_form(body, kind))
        assert refused.value.status == status


def test_the_large_pictures_benchmark_runs(tmp_path):
    """benchmarks/large_pictures.py --quick (a tiny untrained model): every method scored on every hole kind."""
    out = tmp_path / "large.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "large_pictures.py"), "--quick", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert {row["hole"] for row in result["rows"]} == {
        "square 8", "square 16", "square 32", "square 48", "rect 40x50", "stripe 12 wide"
    }  # fmt: skip
    for row in result["rows"]:
        assert all(np.isfinite(row[method]) for method in ("full", "scaled", "telea")), row
    assert "hole PSNR" in proc.stdout and "load average" in proc.stdout


# ---------------------------------------------------------------------------------------------
# A real server


@pytest.fixture(scope="module")
def registry(trained) -> SimpleNamespace:
    """`tiny` version 1 (the trained fixture's) as `@best`, and a version 2 with other weights, each run with
    validation metrics."""
    uri = trained.tracking_uri
    client = MlflowClient(uri)
    run1 = client.get_model_version("tiny", "1").run_id
    tracking.log_metrics(run1, {"val_psnr_hole": 12.5, "val_dice": 0.5}, step=1, tracking_uri=uri)
    second = copy.deepcopy(trained.model)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in second.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=noise) * param.abs().mean())
    run2 = tracking.start_run(uri, "inpaint", "tiny-2", load_config(None, test_evaluate.TINY_MODEL).to_dict())
    tracking.log_metrics(run2, {"val_psnr_hole": 13.5, "val_dice": 0.51}, step=1, tracking_uri=uri)
    example = model_input(torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32)).numpy()
    assert tracking.log_model(run2, second, example, registered_name="tiny", tracking_uri=uri) == "models:/tiny/2"
    tracking.end_run(run2, tracking_uri=uri)
    client.set_registered_model_alias("tiny", "best", "1")
    return SimpleNamespace(uri=uri, run1=run1, run2=run2, first=trained.model, second=load_model("models:/tiny/2", uri))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: list[str], cwd: Path, tracking_uri: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "serve.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    """`python jobs/serve.py --model models:/tiny@best` on a free port (polling the alias every second), up
    until its /healthz answers; stopped with Ctrl-C (SIGINT) at the end, which must end it cleanly."""
    port = free_port()
    args = ["--model", "models:/tiny@best", "--port", str(port), "--alias-poll-s", "1"]
    args += ["--max-pixels", str(MAX_PIXELS), "--max-body-bytes", str(MAX_BODY)]
    root = tmp_path_factory.mktemp("serve")
    log = open(root / "serve.log", "w")  # noqa: SIM115  (closed below)
    proc = start_server(args, root, registry.uri)
    pump = threading.Thread(target=lambda: [log.write(line) or log.flush() for line in proc.stdout], daemon=True)
    pump.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, (root / "serve.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no /healthz in 180 s:\n" + (root / "serve.log").read_text()[-4000:]
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:  # not listening yet, or the app not deployed yet
            pass
        time.sleep(1)
    yield SimpleNamespace(url=url, proc=proc, log=root / "serve.log", port=port)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
        pump.join(timeout=10)
        log.close()
    assert proc.returncode == 0, (root / "serve.log").read_text()[-4000:]


def post(url: str, image: bytes, mask: bytes, **params: str) -> requests.Response:
    files = {"image": ("image.png", image, "image/png"), "mask": ("mask.png", mask, "image/png")}
    return requests.post(f"{url}/inpaint", files=files, params=params, timeout=120)


def decoded(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        return np.array(image.convert("RGB"))


def close(a: np.ndarray, b: np.ndarray, levels: int = 1) -> bool:
    """Equal to a uint8 level (a float rounding may differ between processes)."""
    return int(np.abs(a.astype(int) - b.astype(int)).max()) <= levels


@pytest.mark.ray
def test_inpaint_fills_the_hole_and_keeps_every_known_pixel(server, registry):
    image, hole = picture(40, 48), rectangle(40, 48, 6, 10, 14, 20)
    image[hole] = (255, 0, 255)  # the hole's content must not matter
    response = post(server.url, png(image), png(hole.astype(np.uint8) * 255))
    filled = decoded(response)
    assert filled.shape == image.shape
    np.testing.assert_array_equal(filled[~hole], image[~hole])
    assert (filled[hole] != image[hole]).any(axis=-1).mean() > 0.9
    assert response.headers["X-Model-Version"] == "models:/tiny/1" and response.headers["X-Inpaint-Mode"] == "scaled"
    assert close(filled, fill.inpaint_image(registry.first, image, hole, mode="scaled"))
    assert float(response.headers["X-Inpaint-Ms"]) > 0


@pytest.mark.ray
def test_full_mode_and_telea_answer_as_the_library_does(server, registry):
    image, hole = picture(36, 44, seed=3), rectangle(36, 44, 20, 5, 9, 30)
    jpeg = io.BytesIO()
    Image.fromarray(image).save(jpeg, format="JPEG", quality=95)  # any format Pillow reads
    with Image.open(io.BytesIO(jpeg.getvalue())) as decoded_jpeg:
        image = np.array(decoded_jpeg.convert("RGB"))
    mask = png(hole.astype(np.uint8) * 255)
    full = decoded(post(server.url, jpeg.getvalue(), mask, mode="full"))
    assert close(full, fill.inpaint_image(registry.first, image, hole))
    telea_fill = decoded(post(server.url, jpeg.getvalue(), mask, method="telea"))
    np.testing.assert_array_equal(telea_fill, fill.telea_fill(image, hole))
    assert (telea_fill[hole] != full[hole]).any()


@pytest.mark.ray
def test_concurrent_requests_of_one_size_are_batched(server, registry):
    cases = [(picture(32, 32, seed), rectangle(32, 32, 4 + seed, 6, 10, 10)) for seed in range(12)]
    before = requests.get(f"{server.url}/healthz", timeout=10).json()
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda c: post(server.url, png(c[0]), png(c[1].astype(np.uint8) * 255)), cases))
    after = requests.get(f"{server.url}/healthz", timeout=10).json()
    for (image, hole), response in zip(cases, responses, strict=True):
        assert close(decoded(response), fill.inpaint_image(registry.first, image, hole, mode="scaled"))
    assert after["requests"] - before["requests"] == 12
    assert after["batches"] - before["batches"] < 12, after  # some requests shared a batch
    assert after["largest_batch"] > 1


def bad_requests() -> dict[str, tuple[dict, int, str]]:
    """name → (requests.post keyword arguments, status, what the message says)."""
    image, hole = picture(40, 48), rectangle(40, 48, 6, 10, 14, 20)
    mask = png(hole.astype(np.uint8) * 255)
    files = lambda i, m: {"files": {"image": ("i", i, "image/png"), "mask": ("m", m, "image/png")}}  # noqa: E731
    big = picture(240, 240)  # 57,600 pixels, over MAX_PIXELS; about 1 KB as PNG
    return {
        "not an image": (files(b"GIF89a but not really", mask), 400, "the image field is not an image"),
        "mask of another size": (files(png(image), png(np.zeros((20, 20), np.uint8) + 255)), 400, "the mask is 20x20"),
        "mask with no hole": (files(png(image), png(np.zeros((40, 48), np.uint8))), 400, "the mask has no hole"),
        "image over the size limit": (files(png(big), png(np.full((240, 240), 255, np.uint8))), 413, "240x240"),
        "body over the byte limit": (files(os.urandom(MAX_BODY), mask), 413, f"limit of {MAX_BODY} bytes"),
        "wrong content type": ({"json": {"image": "x"}}, 415, "multipart/form-data"),
        "no mask field": ({"files": {"image": ("i", png(image), "image/png")}}, 400, "no mask field"),
        "unknown method": ({**files(png(image), mask), "params": {"method": "magic"}}, 400, "method must be"),
    }


@pytest.mark.ray
@pytest.mark.parametrize("case", list(bad_requests()))
def test_bad_input_gets_one_clear_4xx_and_the_server_goes_on(server, case):
    kwargs, status, message = bad_requests()[case]
    response = requests.post(f"{server.url}/inpaint", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and message in body["error"] and "\n" not in body["error"], body
    good = post(server.url, png(picture(16, 16)), png(rectangle(16, 16, 4, 4, 6, 6).astype(np.uint8) * 255))
    assert good.status_code == 200
    assert requests.get(f"{server.url}/healthz", timeout=10).json()["status"] == "ok"


@pytest.mark.ray
def test_a_streamed_body_over_the_byte_limit_is_refused_before_it_ends(server):
    """A chunked body (no Content-Length) past the limit, whose last chunk is never sent: the answer must come
    while the body is still unfinished, so the server stopped reading at the limit rather than waiting for it all."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.putrequest("POST", "/inpaint")
        connection.putheader("Content-Type", "multipart/form-data; boundary=b")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        chunk = os.urandom(2**14)
        for _ in range(MAX_BODY // len(chunk) + 2):  # past the limit; no terminating `0` chunk follows
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        response = connection.getresponse()  # a server reading the whole body first never answers: timeout
        status, body = response.status, json.loads(response.read())
    finally:
        connection.close()
    assert status == 413, body
    assert list(body) == ["error"] and f"over the limit of {MAX_BODY} bytes" in body["error"], body
    assert "\n" not in body["error"]
    good = post(server.url, png(picture(16, 16)), png(rectangle(16, 16, 4, 4, 6, 6).astype(np.uint8) * 255))
    assert good.status_code == 200


def test_a_model_uri_that_does_not_load_stops_at_start_naming_it(registry, tmp_path):
    proc = start_server(["--model", "models:/tiny@nonesuch", "--port", str(free_port())], tmp_path, registry.uri)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("error: cannot load the MLflow model models:/tiny@nonesuch"), out


@pytest.mark.ray
def test_the_server_listens_on_loopback_only(server):
    if not shutil.which("ip"):
        pytest.skip("no `ip` command (iproute2) to list this machine's addresses")
    listed = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    addresses = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", listed)
    outside = sorted(a for a in addresses if not a.startswith("127."))
    if not outside:
        pytest.skip("this machine has no address but loopback")
    with socket.socket() as sock:
        sock.settimeout(5)
        assert sock.connect_ex((outside[0], server.port)) != 0, f"port {server.port} answers on {outside[0]}"


# ---------------------------------------------------------------------------------------------
# The page, in a real headless Chromium driven over the DevTools protocol


class DevTools:
    """A headless Chromium and one page of it, driven by DevTools protocol commands over its WebSocket."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "no chromium: apt-get install -y chromium"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
        flags += ["--disable-component-update", "--disable-sync", "--remote-debugging-port=0", "--window-size=1200,900"]
        self.proc = subprocess.Popen(
            [binary, *flags, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and self.proc.poll() is None, "chromium did not start"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        pages = [
            t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"
        ]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.next_id = 0

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.2)
        return value

    def mouse(self, kind: str, x: float, y: float, buttons: int) -> None:
        self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=buttons, clickCount=1)

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.mark.ray
def test_the_page_fills_a_dragged_hole_in_chromium(server, registry, tmp_path):
    image = picture(96, 128, seed=5)
    path = tmp_path / "upload.png"
    Image.fromarray(image).save(path)
    browser = DevTools(tmp_path / "profile")
    try:
        browser.send("Page.enable")
        browser.send("Page.navigate", url=f"{server.url}/")
        browser.wait_for("document.body && document.body.dataset.state === 'empty'")
        browser.wait_for("document.getElementById('model').textContent.includes('version 1')")
        root = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(path)])
        browser.wait_for("document.body.dataset.state === 'ready' && canvas.width === 128")

        box = json.loads(
            browser.js(
                "JSON.stringify({left: canvas.getBoundingClientRect().left + canvas.clientLeft,"
                " top: canvas.getBoundingClientRect().top + canvas.clientTop, width: canvas.clientWidth})"
            )
        )
        scale = box["width"] / 128  # CSS pixels per picture pixel: the page shows it 256 wide
        assert scale == 2
        start = (box["left"] + 30.25 * scale, box["top"] + 20.25 * scale)
        end = (box["left"] + 70.75 * scale, box["top"] + 61.75 * scale)
        browser.mouse("mousePressed", *start, buttons=1)
        browser.mouse("mouseMoved", (start[0] + end[0]) / 2, (start[1] + end[1]) / 2, buttons=1)
        browser.mouse("mouseMoved", *end, buttons=1)
        browser.mouse("mouseReleased", *end, buttons=0)
        holes = json.loads(browser.js("JSON.stringify(window.holes)"))
        assert len(holes) == 1 and np.abs(np.subtract(holes[0], [30, 20, 41, 42])).max() <= 1, holes
        button = json.loads(browser.js("JSON.stringify(document.getElementById('inpaint').getBoundingClientRect())"))
        centre = (button["left"] + button["width"] / 2, button["top"] + button["height"] / 2)
        browser.mouse("mousePressed", *centre, buttons=1)
        browser.mouse("mouseReleased", *centre, buttons=0)
        state = browser.wait_for(
            "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
        )
        assert state == "done", browser.js("document.getElementById('status').textContent")
        shown = browser.js(
            """fetch(document.getElementById('out-model').src).then(r => r.arrayBuffer()).then(b => {
                 let s = ''; for (const x of new Uint8Array(b)) s += String.fromCharCode(x); return btoa(s); })"""
        )
        times = browser.js("[...document.querySelectorAll('figcaption span')].map(s => s.textContent).join(' | ')")
        if os.environ.get("INPAINT_UPDATE_DOCS") == "1":  # the README's picture of the page
            shot = browser.send("Page.captureScreenshot", format="png")["data"]
            (REPO / "docs" / "serve-page.png").write_bytes(base64.b64decode(shot))
    finally:
        browser.close()
    with Image.open(io.BytesIO(base64.b64decode(shown))) as png_image:
        filled = np.array(png_image.convert("RGB"))
    left, top, width, height = holes[0]
    hole = rectangle(96, 128, top, left, height, width)
    np.testing.assert_array_equal(filled[~hole], image[~hole])  # nothing else changed
    assert (filled[hole] != image[hole]).any(axis=-1).mean() > 0.5  # the hole did
    assert close(filled, fill.inpaint_image(registry.first, image, hole, mode="scaled"))
    assert times.count("ms on the server") == 2, times


# ---------------------------------------------------------------------------------------------
# Last: moving the alias changes what is served


@pytest.mark.ray
def test_moving_the_alias_serves_the_new_version_without_dropping_requests(server, registry):
    described = requests.get(f"{server.url}/model", timeout=10).json()
    assert described["name"] == "tiny" and described["version"] == "1" and described["alias"] == "best"
    assert described["run_id"] == registry.run1 and described["metrics"]["val_psnr_hole"] == 12.5
    image, hole = picture(32, 40, seed=9), rectangle(32, 40, 8, 8, 12, 12)
    statuses, stop = [], threading.Event()

    def keep_asking():
        while not stop.is_set():
            statuses.append(post(server.url, png(image), png(hole.astype(np.uint8) * 255)).status_code)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        time.sleep(1)
        MlflowClient(registry.uri).set_registered_model_alias("tiny", "best", "2")
        deadline = time.monotonic() + 60
        while requests.get(f"{server.url}/model", timeout=10).json()["version"] != "2":
            assert time.monotonic() < deadline, "still version 1 a minute after the alias moved"
            time.sleep(0.5)
        time.sleep(1)
    finally:
        stop.set()
        asker.join(timeout=120)
    assert statuses and set(statuses) == {200}, statuses
    described = requests.get(f"{server.url}/model", timeout=10).json()
    assert described["run_id"] == registry.run2 and described["metrics"]["val_psnr_hole"] == 13.5
    response = post(server.url, png(image), png(hole.astype(np.uint8) * 255))
    assert response.headers["X-Model-Version"] == "models:/tiny/2"
    filled = decoded(response)
    assert close(filled, fill.inpaint_image(registry.second, image, hole, mode="scaled"))
    assert not close(filled, fill.inpaint_image(registry.first, image, hole, mode="scaled"))
    assert requests.get(f"{server.url}/healthz", timeout=10).json()["reloads"] >= 1


# ---------------------------------------------------------------------------------------------
# The Serve configs of deploy/ (no cluster here: parsed with Serve's own schema, checked against the app)


@pytest.mark.parametrize("name", ["serve-config.yaml", "kuberay-rayservice.yaml"])
def test_the_serve_configs_describe_this_app(name):
    text = (REPO / "deploy" / name).read_text()
    document = yaml.safe_load(text)
    if document.get("kind") == "RayService":
        assert document["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
        assert document["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
        document = yaml.safe_load(document["spec"]["serveConfigV2"])
    else:
        assert document["http_options"]["host"] == "127.0.0.1"  # safe by default
    config = ServeDeploySchema.model_validate(document)
    (app,) = config.applications
    module, _, attribute = app.import_path.partition(":")
    assert (module, attribute) == ("inpaint.serve", "build_app")
    (deployment,) = app.deployments
    assert deployment.name == Inpainter.name
    assert set(deployment.user_config) == set(SETTINGS)  # every setting spelled out, none unknown
    settings_from(deployment.user_config)
    assert deployment.autoscaling_config["min_replicas"] >= 1
    build_app(app.args)  # builds without Ray running
