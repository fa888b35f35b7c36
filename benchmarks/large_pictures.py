"""Pictures larger than the training size: hole PSNR of the plain full-resolution pass, the scaled mode
(`inpaint/fill.py`: the network at its training scale around each hole) and OpenCV Telea, on
scikit-image's sample photos with holes of several sizes.

    python benchmarks/large_pictures.py --model models:/inpaint-fused-unet@best --json large_pictures.json

Holes: squares of side 8, 16, 32 and 48 px at `--positions` seeded places per photo; a 40×50 rectangle; and a
full-height stripe 12 px wide (the issue's case on `chelsea`). Every method fills the very same holes; the
known pixels are the photo's, so only the hole is scored. `--quick` builds a tiny untrained model (no
`--model` needed): it shows the script runs, not how good any model is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import TINY_MODEL, load_average, machine, print_table, write_json

from inpaint import fill, tracking
from inpaint.config import load_config
from inpaint.data import to_float_images
from inpaint.evaluate import load_model
from inpaint.metrics import psnr_hole
from inpaint.models import build_model

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
SQUARES = (8, 16, 32, 48)
METHODS = ("full", "scaled", "telea")


def photo(name: str) -> np.ndarray:
    import skimage.data  # dev dependency: only this script needs it

    pixels = getattr(skimage.data, name)()
    return np.stack([pixels] * 3, -1) if pixels.ndim == 2 else pixels[..., :3]


def holes(height: int, width: int, positions: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(kind, hole) pairs: squares of each side at seeded places, a 40×50 rectangle, a 12-px full-height stripe."""
    rng = np.random.default_rng(seed)
    out = []
    for side in SQUARES:
        for _ in range(positions):
            top, left = rng.integers(0, height - side), rng.integers(0, width - side)
            hole = np.zeros((height, width), bool)
            hole[top : top + side, left : left + side] = True
            out.append((f"square {side}", hole))
    for _ in range(positions):
        top, left = rng.integers(0, height - 50), rng.integers(0, width - 40)
        hole = np.zeros((height, width), bool)
        hole[top : top + 50, left : left + 40] = True
        out.append(("rect 40x50", hole))
        stripe = np.zeros((height, width), bool)
        column = rng.integers(0, width - 12)
        stripe[:, column : column + 12] = True
        out.append(("stripe 12 wide", stripe))
    return out


def hole_psnr(image: np.ndarray, filled: np.ndarray, hole: np.ndarray) -> float:
    mask = torch.from_numpy(hole[None, None]).float()
    return float(psnr_hole(to_float_images(image[None]), to_float_images(filled[None]), mask)[0])


def quick_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(None, TINY_MODEL).model).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a checkpoint folder")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite)")
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS), help="scikit-image sample photos")
    parser.add_argument("--positions", type=int, default=4, help="places per hole kind and photo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny untrained model, one photo, one place")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.quick and not args.model:
        parser.error("--model is required (or --quick)")
    torch.set_num_threads(1)
    if args.quick:
        model, photos, positions = quick_model(), ["chelsea"], 1
    else:
        model = load_model(args.model, tracking.resolve_tracking_uri(args.tracking_uri))
        photos, positions = args.photos, args.positions
    load_before = load_average()
    print(f"load average {load_before:.2f} before")

    rows, seconds = [], dict.fromkeys(METHODS, 0.0)
    for name in photos:
        image = photo(name)
        height, width = image.shape[:2]
        scores: dict[str, dict[str, list[float]]] = {}
        for kind, hole in holes(height, width, positions, args.seed):
            fills = {}
            for method in METHODS:
                started = time.perf_counter()
                if method == "telea":
                    fills[method] = fill.telea_fill(image, hole)
                else:
                    fills[method] = fill.inpaint_image(model, image, hole, mode=method)
                seconds[method] += time.perf_counter() - started
            for method, filled in fills.items():
                scores.setdefault(kind, {}).setdefault(method, []).append(hole_psnr(image, filled, hole))
        for kind, by_method in scores.items():
            row = {"photo": f"{name} {width}x{height}", "hole": kind, "holes": len(by_method["full"])}
            row |= {method: float(np.mean(values)) for method, values in by_method.items()}
            row["best"] = max(METHODS, key=lambda m: row[m])
            rows.append(row)

    columns = [("photo", "photo", ""), ("hole", "hole", ""), ("holes", "n", "d")]
    columns += [(m, f"{m} (dB)", ".2f") for m in METHODS] + [("best", "best", "")]
    print_table("hole PSNR: plain full-resolution pass, scaled mode, OpenCV Telea", rows, columns)
    kinds = sorted({row["hole"] for row in rows}, key=lambda k: [row["hole"] for row in rows].index(k))
    summary = []
    for kind in kinds:
        chosen = [row for row in rows if row["hole"] == kind]
        summary.append({"hole": kind, **{m: float(np.mean([row[m] for row in chosen])) for m in METHODS}})
    summary.append({"hole": "all", **{m: float(np.mean([row[m] for row in rows])) for m in METHODS}})
    print_table("mean over photos", summary, [("hole", "hole", "")] + [(m, f"{m} (dB)", ".2f") for m in METHODS])
    print("\nseconds in all: " + ", ".join(f"{m} {s:.1f}" for m, s in seconds.items()))
    load_after = load_average()
    print(f"load average {load_after:.2f} after")
    write_json(
        args.json,
        {
            "benchmark": "large_pictures",
            "quick": args.quick,
            "model": args.model,
            "machine": machine(),
            "rows": rows,
            "summary": summary,
            "seconds": seconds,
            "load_average": {"before": load_before, "after": load_after},
        },
    )


if __name__ == "__main__":
    sys.exit(main())
