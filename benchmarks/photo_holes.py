"""Your own pictures, as a user sends them: the hole PSNR of a served model, through `POST /inpaint` of
`jobs/serve.py` with the server's defaults, against OpenCV Telea and Navier–Stokes, on every photo of a folder at
full resolution.

    python benchmarks/photo_holes.py --model models:/inpaint-photo@best --photos PHOTOS --json photo_holes.json

Holes (`--kinds`): in each photo one square of side 16, 32 and 48 px, fully inside it, and one brush stroke
(`inpaint.masks`, kind "strokes"): a pure function of `--seed` and the photo's index in sorted file order. Each
hole is a request of its own. The script starts `jobs/serve.py --model` on a free port (or calls the running
server at `--url`), sends the photo and the hole as PNG, and counts the known pixels that do not come back as sent.
Telea and Navier–Stokes are computed here (`inpaint.fill`, radius 3). Per hole: PSNR (peak 1) and mean absolute
error over the hole pixels; per kind and over all: their means, model − Telea, and the share of holes where the
model's PSNR beats Telea's. `--quick` serves a tiny untrained model: it shows the script runs, not how good any
model is.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import cv2
import numpy as np
import requests
import torch
from common import REPO, free_port, load_average, machine, png, print_table, quick_checkpoint, write_json
from PIL import Image

from inpaint import fill, masks
from inpaint.data import decode_image, read_image, to_float_images, to_uint8_images
from inpaint.metrics import l1_hole, psnr_hole
from inpaint.pictures import picture_grid

SQUARES = {"square16": 16, "square32": 32, "square48": 48}
KINDS = (*SQUARES, "strokes")
METHODS = ("model", "telea", "ns")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
EXAMPLES = 8  # holes shown in the --picture grid
# what the issue "Your own pictures" asks of the photo model, over all holes
TARGET_GAIN_DB, TARGET_WINS = 1.0, 0.7


def make_hole(kind: str, index: int, height: int, width: int, seed: int) -> np.ndarray:
    """The hole (H, W) bool of `kind` in the photo at `index`: a pure function of (seed, index)."""
    if kind == "strokes":
        stroke = masks.fixed_masks(np.array([index]), height, width, masks.MaskConfig(kind="strokes"), seed)
        return stroke[0, 0].numpy() > 0.5
    side = SQUARES[kind]
    if side > min(height, width):
        raise SystemExit(f"error: photo {index} is {width}x{height}: a {side}-px square does not fit")
    rng = np.random.default_rng([seed, index, side])
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    hole = np.zeros((height, width), bool)
    hole[top : top + side, left : left + side] = True
    return hole


def bounding_box(hole: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the smallest rectangle around the hole."""
    rows, cols = np.nonzero(hole)
    return int(rows.min()), int(cols.min()), int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1


def navier_stokes_fill(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """OpenCV Navier–Stokes's fill of one picture, as `fill.telea_fill` does Telea's."""
    target, mask = to_float_images(image[None]), torch.from_numpy(hole[None, None]).float()
    filled = to_uint8_images(fill.opencv_fill(masks.apply_holes(target, mask), mask, cv2.INPAINT_NS))[0]
    return np.where(hole[..., None], filled, image)


def hole_scores(truth: np.ndarray, filled: np.ndarray, hole: np.ndarray) -> tuple[float, float]:
    """PSNR (peak 1) and mean absolute error over the hole pixels."""
    target, pred = to_float_images(truth[None]), to_float_images(filled[None])
    mask = torch.from_numpy(hole[None, None]).float()
    return float(psnr_hole(target, pred, mask)[0]), float(l1_hole(target, pred, mask)[0])


@contextmanager
def served(model: str, tracking_uri: str | None, log: Path) -> Iterator[str]:
    """`python jobs/serve.py --model MODEL` on a free port, as a user starts it, until its /healthz answers:
    its URL; stopped with Ctrl-C (SIGINT) afterwards."""
    port = free_port()
    command = [sys.executable, str(REPO / "jobs" / "serve.py"), "--model", model, "--port", str(port)]
    command += ["--tracking-uri", tracking_uri] if tracking_uri else []
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a Ray of its own
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: jobs/serve.py did not come up:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the app not deployed yet
                pass
            time.sleep(1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post(session: requests.Session, url: str, image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The server's fill, asked as a user asks it: the photo and its mask (white = hole) as PNG, no query."""
    files = {"image": ("photo.png", png(image), "image/png")}
    files["mask"] = ("mask.png", png(hole.astype(np.uint8) * 255), "image/png")
    response = session.post(f"{url}/inpaint", files=files, timeout=300)
    if response.status_code != 200:
        raise SystemExit(f"error: POST /inpaint answered {response.status_code}: {response.text[:300]}")
    return decode_image(response.content, "the server's answer", "RGB")


def summarise(rows: list[dict], kinds: list[str]) -> list[dict]:
    """Per kind and over all: mean PSNR and L1 of each method, model − Telea, the model's share of wins."""
    out = []
    for kind in [*kinds, "all"]:
        chosen = [row for row in rows if kind in ("all", row["kind"])]
        summary = {"kind": kind, "holes": len(chosen)}
        for method in METHODS:
            summary[f"psnr_{method}"] = float(np.mean([row[f"psnr_{method}"] for row in chosen]))
            summary[f"l1_{method}"] = float(np.mean([row[f"l1_{method}"] for row in chosen]))
        summary["model_minus_telea"] = summary["psnr_model"] - summary["psnr_telea"]
        summary["wins"] = float(np.mean([row["psnr_model"] > row["psnr_telea"] for row in chosen]))
        summary["known_changed"] = sum(row["known_changed"] for row in chosen)
        out.append(summary)
    return out


def example_grid(examples: list[tuple[np.ndarray, ...]], side: int = 128) -> np.ndarray:
    """masked | model | Telea | truth, a row per hole: a square around the hole, enlarged or shrunk to `side`."""
    columns: list[list[np.ndarray]] = [[], [], [], []]
    holes = []
    for truth, hole, model, telea in examples:
        top, left, height, width = bounding_box(hole)
        size = min(*hole.shape, max(64, 2 * height, 2 * width))
        top = int(np.clip(top + (height - size) // 2, 0, hole.shape[0] - size))
        left = int(np.clip(left + (width - size) // 2, 0, hole.shape[1] - size))
        window = (slice(top, top + size), slice(left, left + size))
        for column, pixels in zip(columns, (truth, model, telea, truth), strict=True):
            column.append(cv2.resize(pixels[window], (side, side), interpolation=cv2.INTER_AREA))
        holes.append(cv2.resize(hole[window].astype(np.uint8), (side, side), interpolation=cv2.INTER_NEAREST))
    tensors = [to_float_images(np.stack(column)) for column in columns]
    mask = torch.from_numpy(np.stack(holes)[:, None]).float()
    return picture_grid(tensors, labels=["masked", "model", "Telea", "truth"], mask=mask)


def score_photos(url: str, photos: list[Path], kinds: list[str], seed: int, every: int) -> tuple[list, list]:
    """A row of scores per hole (the model's fill asked of the server, Telea's and Navier–Stokes's computed here),
    and the first holes' pictures for the example grid."""
    rows, examples, started = [], [], time.perf_counter()
    with requests.Session() as session:
        for index, path in enumerate(photos):
            truth = read_image(path)
            height, width = truth.shape[:2]
            for kind in kinds:
                hole = make_hole(kind, index, height, width, seed)
                fills = {"model": post(session, url, truth, hole), "telea": fill.telea_fill(truth, hole)}
                fills["ns"] = navier_stokes_fill(truth, hole)
                row = {"photo": path.name, "size": f"{width}x{height}", "kind": kind, "hole_pixels": int(hole.sum())}
                row["box"] = list(bounding_box(hole))  # top, left, height, width
                for method, filled in fills.items():
                    row[f"psnr_{method}"], row[f"l1_{method}"] = hole_scores(truth, filled, hole)
                row["known_changed"] = int((fills["model"] != truth).any(-1)[~hole].sum())
                rows.append(row)
                if len(examples) < EXAMPLES:
                    examples.append((truth, hole, fills["model"], fills["telea"]))
            if (index + 1) % every == 0 or index + 1 == len(photos):
                print(f"photos {index + 1}/{len(photos)}, {len(rows)} holes, {time.perf_counter() - started:.0f} s")
    return rows, examples


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, required=True, help="a folder of photos (JPEG, PNG, ...)")
    parser.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a checkpoint folder")
    parser.add_argument("--url", help="a running server to call instead (http://HOST:PORT)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for jobs/serve.py (default: its own)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="hole kinds, comma-separated (default: all)")
    parser.add_argument("--limit", type=int, help="the first N photos only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=10, help="a progress line every N photos")
    parser.add_argument("--quick", action="store_true", help="serve a tiny untrained model (no --model needed)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--picture", type=Path, help="a PNG of the first holes: masked | model | Telea | truth")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.model, args.url, args.quick))) != 1:
        parser.error("give one of --model, --url or --quick")
    args.kinds = args.kinds.split(",")
    if unknown := set(args.kinds) - set(KINDS):
        parser.error(f"unknown hole kind(s) {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")
    if "strokes" in args.kinds and "strokes" not in masks.KINDS:
        parser.error("inpaint.masks has no 'strokes' holes yet: pass --kinds square16,square32,square48")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)[: args.limit]
    if not photos:
        raise SystemExit(f"error: no photos ({', '.join(PHOTO_SUFFIXES)}) in {args.photos}")
    torch.set_num_threads(1)  # the server needs the cores more than the scoring here
    load_before = load_average()
    print(f"load average {load_before:.2f} before")
    started = time.perf_counter()
    with ExitStack() as stack:
        if args.url:
            url = args.url.rstrip("/")
        else:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            model = quick_checkpoint(scratch) if args.quick else args.model
            url = stack.enter_context(served(model, args.tracking_uri, scratch / "serve.log"))
        server_up_s = time.perf_counter() - started
        served_model = requests.get(f"{url}/model", timeout=30).json()
        print(f"{served_model['load_uri']} served at {url} ({server_up_s:.0f} s)")
        rows, examples = score_photos(url, photos, args.kinds, args.seed, args.every)
    wall_s = time.perf_counter() - started

    summary = summarise(rows, args.kinds)
    names = dict(zip(METHODS, ("model", "Telea", "NS"), strict=True))
    columns = [("kind", "holes", ""), ("holes", "n", "d")]
    columns += [(f"psnr_{m}", f"{name} dB", ".2f") for m, name in names.items()]
    columns += [("model_minus_telea", "model − Telea", "+.2f"), ("wins", "model wins", ".0%")]
    columns += [(f"l1_{m}", f"{name} L1", ".4f") for m, name in names.items()]
    columns += [("known_changed", "known px changed", "d")]
    print_table(f"hole PSNR and L1, {len(photos)} photos of {args.photos}, POST /inpaint", summary, columns)
    overall, by_kind = summary[-1], summary[:-1]
    targets = {
        "gain_over_telea": overall["model_minus_telea"] >= TARGET_GAIN_DB,
        "every_kind": all(s["model_minus_telea"] > 0 for s in by_kind),
        "wins": overall["wins"] >= TARGET_WINS,
    }
    print(f"\nthe issue's targets: model − Telea ≥ {TARGET_GAIN_DB} dB over all, > 0 for every kind, wins ≥ 70 %")
    print("met: " + ", ".join(f"{target} {'yes' if met else 'NO'}" for target, met in targets.items()))
    print(f"known pixels changed by the server: {overall['known_changed']}; {wall_s:.0f} s in all")
    if args.picture:
        Image.fromarray(example_grid(examples)).save(args.picture)
        print(f"wrote {args.picture}")
    load_after = load_average()
    print(f"load average {load_after:.2f} after")
    write_json(
        args.json,
        {
            "benchmark": "photo_holes",
            "quick": args.quick,
            "command": shlex.join(["python", *sys.argv]),
            "model": served_model,
            "photos": str(args.photos),
            "kinds": args.kinds,
            "seed": args.seed,
            "machine": machine(),
            "summary": summary,
            "targets": targets,
            "rows": rows,
            "seconds": {"server_up": server_up_s, "wall": wall_s},
            "load_average": {"before": load_before, "after": load_after},
        },
    )
    return 1 if overall["known_changed"] else 0


if __name__ == "__main__":
    sys.exit(main())
