"""The registered model behind Ray Serve: `POST /inpaint`, `GET /model`, `GET /healthz`, and a web page at `/`.

One deployment (`Inpainter`) is the HTTP ingress and holds the model: a request's work is a few milliseconds of
network, so a second hop between deployments would cost more than it spreads. Its settings are its
`user_config` (`SETTINGS`), which Serve hands to `reconfigure` in place, without restarting replicas: a
`serve deploy` of a changed config takes effect with no request dropped. A model URI naming an alias
(`models:/NAME@ALIAS`) is re-resolved every `alias_poll_s` seconds and on every reconfigure; a new version is
loaded beside the old one, which serves until the new one is ready and is then swapped in between two batches.

Requests are batched dynamically (`@serve.batch`): the network inputs of requests that arrive together and
share a size go through the network as one batch (`fill.fill_many`). `max_batch_size: 1` turns it off.

Bad input gets one `{"error": "..."}` line with a 4xx status, and the replica goes on serving.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at runtime.
import asyncio
import io
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image
from ray import serve
from ray.serve import Application
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from inpaint import fill, runtime, tracking
from inpaint.data import ImageTooLarge, decode_image
from inpaint.errors import UserError
from inpaint.evaluate import load_model
from inpaint.models import InpaintingNetwork

logger = logging.getLogger("ray.serve")

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MODEL = "models:/inpaint-fused-unet@best"
ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
METHODS = ("model", "telea")
SETTINGS: dict[str, Any] = {
    "model": DEFAULT_MODEL,  # models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a checkpoint folder
    "tracking_uri": None,  # None: $MLFLOW_TRACKING_URI on the replica, else ./mlflow.db there
    "mode": "scaled",  # the default of POST /inpaint's `mode` (fill.MODES); see docs/serving.md
    "max_batch_size": 8,  # 1 turns batching off
    "batch_wait_timeout_s": 0.01,  # how long a batch waits for more requests
    "alias_poll_s": 30.0,  # how often an alias is re-resolved; 0: only on reconfigure
    "max_pixels": 2048 * 2048,  # a larger image gets 413
    "max_body_bytes": 20 * 2**20,  # a larger request body gets 413
    "reload": 0,  # change it (serve deploy) to re-resolve the alias at once
}


class HTTPError(Exception):
    """A request the server refuses: its status and the one line that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def settings_from(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """SETTINGS with `overrides` applied; an unknown key or a bad value is a UserError naming it."""
    unknown = set(overrides or {}) - set(SETTINGS)
    if unknown:
        raise UserError(f"unknown serve setting(s) {', '.join(sorted(unknown))}; known: {', '.join(SETTINGS)}")
    settings = {**SETTINGS, **(overrides or {})}
    if settings["mode"] not in fill.MODES:
        raise UserError(f"mode must be one of {', '.join(fill.MODES)}, got {settings['mode']!r}")
    for key in ("max_batch_size", "max_pixels", "max_body_bytes"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise UserError(f"{key} must be a whole number of at least 1, got {settings[key]!r}")
    return settings


# ---------------------------------------------------------------------------------------------
# The model and what it is


@dataclass(frozen=True)
class Served:
    """A loaded model and what `GET /model` says of it."""

    model: InpaintingNetwork
    info: dict[str, Any] = field(default_factory=dict)


def resolve(uri: str, tracking_uri: str) -> dict[str, Any]:
    """What `uri` names now: for a registered model its name, version, alias, run and validation metrics, and
    `load_uri`, the URI that pins that version."""
    info: dict[str, Any] = {"uri": uri, "load_uri": uri, "tracking_uri": tracking_uri}
    alias, version = ALIAS_URI.match(uri), VERSION_URI.match(uri)
    if not (alias or version):
        return info
    client = MlflowClient(tracking_uri)
    try:
        if alias:
            found = client.get_model_version_by_alias(alias["name"], alias["alias"])
        else:
            found = client.get_model_version(version["name"], version["version"])
        run = client.get_run(found.run_id) if found.run_id else None
    except MlflowException as err:
        raise UserError(f"cannot load the MLflow model {uri} from {tracking_uri} ({err.message})") from None
    info |= {
        "name": found.name,
        "version": str(found.version),
        "aliases": sorted(found.aliases),
        "alias": alias["alias"] if alias else None,
        "run_id": found.run_id,
        "run_name": run.info.run_name if run else None,
        "metrics": {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith("val_")} if run else {},
        "load_uri": f"models:/{found.name}/{found.version}",
    }
    return info


def load_served(uri: str, tracking_uri: str) -> Served:
    """The model `uri` names now, loaded; a UserError naming the URI if it does not load."""
    info = resolve(uri, tracking_uri)
    model = load_model(info["load_uri"], tracking_uri)
    return Served(model, info | {"loaded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


# ---------------------------------------------------------------------------------------------
# Requests


async def parse_form(body: bytes, content_type: str) -> dict[str, bytes]:
    """The fields of a multipart/form-data body (name → bytes), by Starlette's parser (python-multipart);
    the body is read already, under the byte limit (`read_body`)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise HTTPError(415, "send multipart/form-data with the fields image and mask (white = hole)")

    async def chunks():
        yield body

    try:
        parser = MultiPartParser(Headers({"content-type": content_type}), chunks(), max_part_size=len(body) + 1)
        form = await parser.parse()
    except MultiPartException as err:
        raise HTTPError(400, f"the multipart body is malformed ({err}); send the fields image and mask") from None
    return {
        name: await value.read() if isinstance(value, UploadFile) else value.encode()
        for name, value in form.multi_items()
    }


def decode_field(data: bytes, name: str, mode: str, max_pixels: int) -> np.ndarray:
    """The picture in field `name` (`inpaint.data.decode_image`); its refusal as the answer: 413 over the pixel
    limit, else 400."""
    try:
        return decode_image(data, f"the {name} field", mode, max_pixels=max_pixels)
    except ImageTooLarge as err:
        raise HTTPError(413, str(err)) from None
    except UserError as err:
        raise HTTPError(400, str(err)) from None


def read_inputs(fields: dict[str, bytes], max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """The image (H, W, 3) and its holes (H, W) bool from the form's fields, checked."""
    missing = [name for name in ("image", "mask") if name not in fields]
    if missing:
        raise HTTPError(400, f"the form has no {' or '.join(missing)} field; send the fields image and mask")
    image = decode_field(fields["image"], "image", "RGB", max_pixels)
    hole = decode_field(fields["mask"], "mask", "L", max_pixels) > 127
    if hole.shape != image.shape[:2]:
        (height, width), (mask_height, mask_width) = image.shape[:2], hole.shape
        raise HTTPError(
            400, f"the mask is {mask_width}x{mask_height} but the image is {width}x{height}; draw it at its size"
        )
    if not hole.any():
        raise HTTPError(400, "the mask has no hole: paint the pixels to fill white (above 127) on black")
    return image, hole


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    too_big = HTTPError(413, f"the request body is over the limit of {limit} bytes; send a smaller image")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------
# The deployment

api = FastAPI(title="inpaint", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(HTTPError)
async def _refused(request: Request, err: HTTPError) -> JSONResponse:
    return JSONResponse({"error": str(err)}, status_code=err.status)


# max_surge_percent: a redeploy that replaces replicas starts each new one before an old one stops.
@serve.deployment(name="Inpainter", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64, max_surge_percent=100)
@serve.ingress(api)
class Inpainter:
    """A replica: the model, its settings, and counters of what it did."""

    def __init__(self) -> None:
        runtime.configure_process()  # a replica is a process of its own: under `serve deploy`, nothing else does it
        self.settings: dict[str, Any] = {}
        self.served: Served | None = None
        self.stats = {"requests": 0, "refused": 0, "batches": 0, "largest_batch": 0, "reloads": 0}
        self._poller: asyncio.Task | None = None
        self._reloading = asyncio.Lock()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """New settings (at start, and on every `serve deploy` that changes them): reload if what the model URI
        names has changed, and apply the batch settings."""
        settings = settings_from(user_config)
        settings["tracking_uri"] = tracking.resolve_tracking_uri(settings["tracking_uri"])
        self.settings = settings
        self.fill_batch.set_max_batch_size(settings["max_batch_size"])
        self.fill_batch.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])
        await self.reload()
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def reload(self) -> bool:
        """Load what the model URI names now, if it is not what is served; the old model serves meanwhile."""
        async with self._reloading:
            uri, tracking_uri = self.settings["model"], self.settings["tracking_uri"]
            current = self.served.info if self.served else {}
            if self.served is not None and current.get("uri") == uri:
                info = await asyncio.to_thread(resolve, uri, tracking_uri)
                if info["load_uri"] == current["load_uri"] and "version" in info:
                    return False
            served = await asyncio.to_thread(load_served, uri, tracking_uri)
            if self.served is not None:
                self.stats["reloads"] += 1
                logger.info("serving %s (was %s)", served.info["load_uri"], current.get("load_uri"))
            self.served = served
            return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings["alias_poll_s"] or 5)
            if self.settings["alias_poll_s"] and ALIAS_URI.match(self.settings["model"]):
                try:
                    await self.reload()
                except Exception as err:  # the registry away for a while: keep serving what is loaded
                    logger.warning("could not re-resolve %s: %s", self.settings["model"], err)

    def process_settings(self) -> dict[str, str | None]:
        """This replica's values of the process-wide settings (`runtime.ENVIRONMENT`), for a deployment handle
        (`handle.process_settings.remote()`; no HTTP route): what a replica on a cluster really runs with."""
        return {name: os.environ.get(name) for name in runtime.ENVIRONMENT}

    def check_health(self) -> None:
        if self.served is None:
            raise RuntimeError("no model loaded")

    # the defaults until `reconfigure` applies the deployment's own
    @serve.batch(max_batch_size=SETTINGS["max_batch_size"], batch_wait_timeout_s=SETTINGS["batch_wait_timeout_s"])
    async def fill_batch(self, items: list[tuple[np.ndarray, np.ndarray, str]]) -> list[tuple[np.ndarray, str]]:
        """The model's fills of requests that arrived together (those of one size go through it as one batch),
        each with the URI of the version that filled it."""
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        served = self.served  # a reload swaps `self.served`, never this batch's model
        filled = await asyncio.to_thread(fill.fill_many, served.model, items)
        return [(pixels, str(served.info["load_uri"])) for pixels in filled]

    @api.post("/inpaint")
    async def inpaint(self, request: Request, method: str = "model", mode: str | None = None) -> Response:
        """The image with its holes (white in the mask) filled by the model or by Telea, as PNG."""
        self.stats["requests"] += 1
        try:
            mode = mode or self.settings["mode"]
            if method not in METHODS or mode not in fill.MODES:
                raise HTTPError(
                    400, f"method must be one of {', '.join(METHODS)} and mode one of {', '.join(fill.MODES)}"
                )
            body = await read_body(request, self.settings["max_body_bytes"])
            fields = await parse_form(body, request.headers.get("content-type", ""))
            image, hole = read_inputs(fields, self.settings["max_pixels"])
        except HTTPError:
            self.stats["refused"] += 1
            raise
        started = time.perf_counter()
        headers = {"X-Inpaint-Method": method, "Cache-Control": "no-store"}
        if method == "telea":
            filled = await asyncio.to_thread(fill.telea_fill, image, hole)
        else:
            filled, version = await self.fill_batch((image, hole, mode))
            headers |= {"X-Inpaint-Mode": mode, "X-Model-Version": version}
        headers["X-Inpaint-Ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"
        return Response(png_bytes(filled), media_type="image/png", headers=headers)

    @api.get("/model")
    async def model(self) -> dict[str, Any]:
        """Which model version is served, with its run, alias and validation metrics."""
        info = {k: v for k, v in self.served.info.items() if k != "tracking_uri"}
        return info | {"default_mode": self.settings["mode"], "max_batch_size": self.settings["max_batch_size"]}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.served.info.get("load_uri"), **self.stats}

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @api.get("/static/{name:path}")
    async def static(self, name: str) -> Response:
        """A file of the page (its sample pictures): only those shipped in inpaint/static."""
        files = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}
        if name not in files:
            raise HTTPError(404, f"no file {name}")
        media = {".jpg": "image/jpeg", ".png": "image/png", ".json": "application/json"}
        return Response(files[name].read_bytes(), media_type=media.get(files[name].suffix, "text/plain"))


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application (`serve deploy`'s `import_path: inpaint.serve:build_app`): `args` are SETTINGS, plus
    `num_replicas` if given. A config's `deployments: [{name: Inpainter, user_config: ...}]` overrides the
    settings, and its `num_replicas` or `autoscaling_config` the replicas."""
    args = dict(args or {})
    replicas = {"num_replicas": args.pop("num_replicas")} if "num_replicas" in args else {}
    return Inpainter.options(user_config=settings_from(args), **replicas).bind()
