"""Time per epoch against dataset size and workers, and peak memory per worker, from real job runs.

Every (size, workers) pair is one `python jobs/train.py` run (configs/paper.yaml + --set overrides)
on synthetic 32×32 images with a fixed validation split, `--batch` images per worker and the cores
shared evenly between the workers. The training seconds of an epoch come from its `images_per_s`
(MLflow); an epoch's wall time (training + validation + checkpoint) from the time-stamped epoch lines;
peak memory is each worker process's peak RSS (VmHWM, which counts the object-store pages it touched).
More workers than this machine holds are projected on paper from the measured per-worker speed of the
largest run: N × (images/s per worker), i.e. each worker on cores of its own and no further cost.

python benchmarks/scaling.py --json scaling.json
python benchmarks/scaling.py --sizes 1000 5000 --workers 2 --batch 128 --set train.lr=2e-3
python benchmarks/scaling.py --quick     # CI: tiny model and data, one size, 2 workers only
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from common import TINY_MODEL, load_average, machine, print_table, run_train_job, synthetic_prepared, write_json

PAPER_EPOCH = 45_000  # CIFAR-10's training images less the validation split


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 5000, 45000], help="training images")
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", type=int, default=64, help="images per worker per step")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--project", nargs="+", type=int, default=[4, 8, 16, 32], help="worker counts on paper")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for all")
    parser.add_argument("--workdir", type=Path, help="keep datasets and runs here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="CI: tiny model and data, one size, 2 workers only")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.val_images, args.batch, args.epochs, args.project = [64], 32, 16, 2, [4]
        args.workers = [2]  # one job: each is a Ray start and a worker group, a minute on 2 cores
        args.set = [*TINY_MODEL, *args.set]
    return args


def scaling_row(size: int, job: dict[str, Any]) -> dict[str, Any]:
    rates = [epoch["images_per_s"] for epoch in job["epochs"]]
    later = rates[1:] or rates
    rate = sum(later) / len(later)
    ends = [epoch["end_s"] for epoch in job["epochs"]]
    walls = [ends[i] - ends[i - 1] for i in range(1, len(ends))]
    return {
        "size": size,
        "workers": job["workers"],
        "cpus_per_worker": job["cpus_per_worker"],
        "batch_per_worker": job["batch_per_worker"],
        "images_per_s": rate,
        "epoch1_train_s": size / rates[0],
        "train_s_per_epoch": size / rate,
        "wall_s_per_epoch": sum(walls) / len(walls) if walls else None,
        "s_per_1k_images": 1000 / rate,
        "worker_peak_rss_mib": max(job["worker_peak_rss_mib"]),
        "driver_peak_rss_mib": job["driver_peak_rss_mib"],
        "job_wall_s": job["wall_s"],
    }


def main() -> None:
    args = parse_args()
    cores = os.cpu_count() or 1
    rows, loads = [], []
    with tempfile.TemporaryDirectory(prefix="inpaint-scaling-") as tmp:
        workdir = args.workdir or Path(tmp)
        for size in args.sizes:
            data = synthetic_prepared(workdir, size, args.val_images)
            for workers in args.workers:
                loads.append(load_average())
                overrides = [*args.set, f"train.batch_size={args.batch}"]
                job = run_train_job(
                    data, workdir / f"{size}-{workers}", workers, cores / workers, args.epochs, overrides
                )
                rows.append(scaling_row(size, job))
                print(f"  {size} images, {workers} worker(s): {rows[-1]['images_per_s']:.1f} img/s", flush=True)
        loads.append(load_average())

    print_table(
        f"time per epoch, {args.batch} images per worker per step, {cores} cores shared by the workers",
        rows,
        [
            ("size", "images", "d"),
            ("workers", "workers", "d"),
            ("images_per_s", "img/s", ".1f"),
            ("epoch1_train_s", "epoch 1 train s", ".1f"),
            ("train_s_per_epoch", "train s/epoch", ".1f"),
            ("wall_s_per_epoch", "wall s/epoch", ".1f"),
            ("s_per_1k_images", "s/1k img", ".2f"),
            ("worker_peak_rss_mib", "worker RSS MiB", ".0f"),
            ("driver_peak_rss_mib", "driver RSS MiB", ".0f"),
        ],
    )
    largest = max(rows, key=lambda row: (row["size"], row["workers"]))
    per_worker = largest["images_per_s"] / largest["workers"]
    projected = [
        {"workers": n, "images_per_s": n * per_worker, "epoch_s": PAPER_EPOCH / (n * per_worker)} for n in args.project
    ]
    print_table(
        f"on paper: N workers × {per_worker:.1f} img/s per worker (measured: {largest['workers']} worker(s) × "
        f"{largest['cpus_per_worker']:g} CPU, {largest['size']} images)",
        projected,
        [("workers", "workers", "d"), ("images_per_s", "img/s", ".0f"), ("epoch_s", f"s per {PAPER_EPOCH} img", ".0f")],
    )
    print(f"\nload average (1 min) before each run and at the end: {', '.join(f'{load:.2f}' for load in loads)}")
    write_json(
        args.json,
        {
            "benchmark": "scaling",
            "quick": args.quick,
            "machine": machine(),
            "batch_per_worker": args.batch,
            "epochs": args.epochs,
            "overrides": args.set,
            "load_average": loads,
            "rows": rows,
            "projected": {"per_worker_images_per_s": per_worker, "rows": projected},
        },
    )


if __name__ == "__main__":
    main()
