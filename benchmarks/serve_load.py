"""A bounded load test of the Serve app: `--requests` POST /inpaint at each concurrency, with dynamic batching
on (the default `max_batch_size`) and off (1), against a local Ray Serve started here; throughput, p50/p95/p99 latency,
errors, and the mean batch the replica formed.

    python benchmarks/serve_load.py --model models:/inpaint-fused-unet@best --json serve_load.json

Every request is one `--size`² picture (scikit-image's `chelsea`, resized) with one `--hole`² square hole at a
seeded place, so that requests share a size and can batch. The clients are threads of this process (on the
same cores as the server: the figures are the whole machine's). `--quick` serves a tiny untrained model
from a checkpoint folder (no `--model` needed) with fewer requests: it shows the script runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import requests
from common import free_port, load_average, machine, png, print_table, quick_checkpoint, write_json
from PIL import Image
from ray import serve

from inpaint import fill, tracking
from inpaint.runtime import configure_process
from inpaint.serve import SETTINGS, build_app


def requests_to_send(count: int, size: int, hole: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """`count` (image PNG, mask PNG) bodies: one picture, holes at seeded places (a few distinct bodies)."""
    import skimage.data  # dev dependency: only the benchmarks need it

    image = np.array(Image.fromarray(skimage.data.chelsea()).resize((size, size), Image.LANCZOS))
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(min(count, 16)):
        mask = np.zeros((size, size), np.uint8)
        top, left = rng.integers(0, size - hole, size=2)
        mask[top : top + hole, left : left + hole] = 255
        bodies.append((png(image), png(mask)))
    return [bodies[i % len(bodies)] for i in range(count)]


def load(url: str, bodies: list[tuple[bytes, bytes]], concurrency: int) -> dict[str, float]:
    """Send every body with `concurrency` clients; latency percentiles (ms), requests/s and errors."""
    sessions = threading.local()

    def one(body: tuple[bytes, bytes]) -> tuple[float, bool]:
        session = getattr(sessions, "session", None) or requests.Session()
        sessions.session = session
        files = {"image": ("image.png", body[0], "image/png"), "mask": ("mask.png", body[1], "image/png")}
        started = time.perf_counter()
        try:
            ok = session.post(f"{url}/inpaint", files=files, timeout=300).status_code == 200
        except requests.RequestException:
            ok = False
        return (time.perf_counter() - started) * 1000, ok

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, bodies))
    wall = time.perf_counter() - started
    latencies = np.array([ms for ms, _ in results])
    return {
        "requests": len(bodies),
        "errors": sum(not ok for _, ok in results),
        "requests_per_s": len(bodies) / wall,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a checkpoint folder")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite)")
    parser.add_argument("--requests", type=int, default=500, help="requests per concurrency and batching setting")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--size", type=int, default=64, help="picture side (px)")
    parser.add_argument("--hole", type=int, default=12, help="hole side (px)")
    parser.add_argument("--mode", choices=fill.MODES, default=SETTINGS["mode"])
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a tiny untrained model, 40 requests")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.quick and not args.model:
        parser.error("--model is required (or --quick)")
    configure_process()
    scratch = tempfile.TemporaryDirectory()
    model = quick_checkpoint(Path(scratch.name)) if args.quick else args.model
    count = 40 if args.quick else args.requests
    bodies = requests_to_send(count, args.size, args.hole)
    tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", include_dashboard=False, configure_logging=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    load_before = load_average()
    print(f"load average {load_before:.2f} before")
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for batching, max_batch_size in (("on", SETTINGS["max_batch_size"]), ("off", 1)):
            settings = {"model": model, "tracking_uri": tracking_uri, "mode": args.mode}
            settings |= {"max_batch_size": max_batch_size, "alias_poll_s": 0, "num_replicas": args.replicas}
            serve.run(build_app(settings), name="inpaint", route_prefix="/")
            load(url, bodies[:8], 4)  # warm up: the first requests pay for imports and allocation
            for concurrency in args.concurrency:
                before = requests.get(f"{url}/healthz", timeout=30).json()
                row = {"batching": batching, "concurrency": concurrency, **load(url, bodies, concurrency)}
                after = requests.get(f"{url}/healthz", timeout=30).json()
                batches = max(after["batches"] - before["batches"], 1)
                row["mean_batch"] = (after["requests"] - before["requests"]) / batches
                rows.append(row)
                print(f"batching {batching}, concurrency {concurrency}: {row['requests_per_s']:.1f} requests/s")
    finally:
        serve.shutdown()
        ray.shutdown()
        scratch.cleanup()
    load_after = load_average()
    columns = [("batching", "batching", ""), ("concurrency", "concurrency", "d"), ("requests", "requests", "d")]
    columns += [("errors", "errors", "d"), ("requests_per_s", "requests/s", ".1f"), ("p50_ms", "p50 ms", ".1f")]
    columns += [("p95_ms", "p95 ms", ".1f"), ("p99_ms", "p99 ms", ".1f"), ("mean_batch", "mean batch", ".2f")]
    title = f"POST /inpaint, {args.size}x{args.size} pictures, one {args.hole}x{args.hole} hole, mode {args.mode}"
    print_table(title, rows, columns)
    print(f"load average {load_after:.2f} after")
    write_json(
        args.json,
        {
            "benchmark": "serve_load",
            "quick": args.quick,
            "model": args.model,
            "settings": {"size": args.size, "hole": args.hole, "mode": args.mode, "replicas": args.replicas},
            "machine": machine(),
            "rows": rows,
            "load_average": {"before": load_before, "after": load_after},
        },
    )
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
