"""What Ray Train costs: `jobs/train.py` with 1 and 2 workers against a plain PyTorch loop, in one run.

All three train the same model (configs/paper.yaml + --set overrides) on the same prepared data with
the same global batch and the same total thread count:
- plain: one process, `--threads` torch threads, the prepared pixels in memory, the worker loop's
  step (fresh holes, forward, loss, backward, Adam) without Ray;
- `python jobs/train.py` with W workers × threads/W CPUs each and batch/W images per worker, in its
  own local Ray, tracked in its own MLflow store. Its per-epoch `images_per_s` (MLflow) is the speed;
  its output lines, time-stamped here, give the fixed costs: start-up until epoch 1's loop begins,
  validation and checkpoint per epoch, and the finish (model registration) after the last epoch.
Steady state is the mean over epochs 2 and later. Share: of the matmul peak measured in this run.

python benchmarks/ray_overhead.py --json ray_overhead.json
python benchmarks/ray_overhead.py --set train.precision=bf16 --set train.channels_last=true
python benchmarks/ray_overhead.py --quick     # CI: tiny model and data, 2 workers only
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    TINY_MODEL,
    TrainStep,
    count_flops,
    load_average,
    machine,
    matmul_peak,
    paper_config,
    print_table,
    run_train_job,
    share,
    synthetic_prepared,
    write_json,
)

from inpaint.config import Config
from inpaint.data import read_manifest, read_split, to_float_images
from inpaint.train import training_precision


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared dataset (default: synthetic images made here)")
    parser.add_argument("--train-images", type=int, default=4000, help="synthetic training images")
    parser.add_argument("--val-images", type=int, default=500, help="synthetic validation images")
    parser.add_argument("--batch", type=int, default=64, help="images per optimizer step, over all workers")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="total torch threads (default: all cores)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for all")
    parser.add_argument("--workdir", type=Path, help="keep datasets and runs here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="CI: tiny model and data, 2 workers only")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.train_images, args.val_images, args.batch, args.epochs, args.workers = 256, 64, 16, 2, [2]
        args.set = [*TINY_MODEL, *args.set]
    return args


def steady(epochs: list[float]) -> float:
    """The mean over epochs 2 and later (epoch 1 when there is only one)."""
    later = epochs[1:] or epochs
    return sum(later) / len(later)


def plain_loop(cfg: Config, data: str, epochs: int, threads: int) -> list[float]:
    """Images/s per epoch of a single-process loop over the prepared training pixels."""
    torch.set_num_threads(threads)
    pixels, _ = read_split(data, "train")
    _, height, width, _ = pixels.shape
    step = TrainStep(cfg, height, width)
    batch, rates = cfg.train.batch_size, []
    for _ in range(epochs):
        start = time.perf_counter()
        for first in range(0, len(pixels), batch):
            step(to_float_images(pixels[first : first + batch]))
        rates.append(len(pixels) / (time.perf_counter() - start))
    return rates


def job_row(job: dict[str, Any], train_rows: int) -> dict[str, Any]:
    """A job's speed and fixed costs from its epochs' images/s and the times of its output lines."""
    rates = [epoch["images_per_s"] for epoch in job["epochs"]]
    train_s = [train_rows / rate for rate in rates]
    ends = [epoch["end_s"] for epoch in job["epochs"]]
    between = [ends[i] - ends[i - 1] - train_s[i] for i in range(1, len(ends))]
    return {
        "run": f"jobs/train.py, {job['workers']} worker(s) × {job['cpus_per_worker']:g} CPU",
        "workers": job["workers"],
        "batch_per_worker": job["batch_per_worker"],
        "epoch_images_per_s": rates,
        "steady_images_per_s": steady(rates),
        "startup_s": job["startup_s"],
        "epoch1_extra_s": train_s[0] - train_rows / steady(rates),
        "per_epoch_other_s": sum(between) / len(between) if between else None,
        "finish_s": job["wall_s"] - job["last_epoch_line_s"],
        "wall_s": job["wall_s"],
        "ray_cpu_s": job["cpu_s"]["ray"],
        "driver_cpu_s": job["cpu_s"]["driver"],
        "worker_peak_rss_mib": job["worker_peak_rss_mib"],
    }


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="inpaint-ray-overhead-") as tmp:
        workdir = args.workdir or Path(tmp)
        data = args.data or synthetic_prepared(workdir, args.train_images, args.val_images)
        manifest = read_manifest(data)
        train_rows = manifest["splits"]["train"]
        cfg = paper_config([*args.set, f"train.batch_size={args.batch}"])
        torch.set_num_threads(args.threads)
        load_before = load_average()
        peak = matmul_peak(256 if args.quick else 2048, 0.1 if args.quick else 3.0)
        flops = count_flops(cfg.model, manifest["height"], manifest["width"])["train"]
        precision = training_precision(cfg)

        plain = plain_loop(cfg, data, args.epochs, args.threads)
        rows = [
            {
                "run": f"plain PyTorch loop, 1 process × {args.threads} threads",
                "workers": 0,
                "batch_per_worker": args.batch,
                "epoch_images_per_s": plain,
                "steady_images_per_s": steady(plain),
            }
        ]
        print(f"  plain loop: {steady(plain):.1f} img/s", flush=True)
        for workers in args.workers:
            overrides = [*args.set, f"train.batch_size={args.batch // workers}"]
            job = run_train_job(
                data, workdir / f"workers-{workers}", workers, args.threads / workers, args.epochs, overrides
            )
            rows.append(job_row(job, train_rows))
            print(f"  {workers} worker(s): {rows[-1]['steady_images_per_s']:.1f} img/s", flush=True)
        load_after = load_average()

    for row in rows:
        row["share_of_peak"] = share(row["steady_images_per_s"], flops, peak[precision])
        row["vs_plain"] = row["steady_images_per_s"] / rows[0]["steady_images_per_s"]
    print_table(
        f"steady-state training speed (epochs 2+), {train_rows} images/epoch, global batch {args.batch}, "
        f"{precision} matmul peak {peak[precision]:.0f} GFLOP/s",
        rows,
        [
            ("run", "", "s"),
            ("batch_per_worker", "batch/worker", "d"),
            ("steady_images_per_s", "img/s", ".1f"),
            ("share_of_peak", "share", ".1%"),
            ("vs_plain", "vs plain", ".1%"),
        ],
    )
    print_table(
        "fixed costs of a jobs/train.py run (seconds)",
        rows[1:],
        [
            ("run", "", "s"),
            ("startup_s", "to epoch 1", ".1f"),
            ("epoch1_extra_s", "epoch-1 warm-up", ".1f"),
            ("per_epoch_other_s", "val+ckpt/epoch", ".1f"),
            ("finish_s", "finish", ".1f"),
            ("wall_s", "wall", ".1f"),
            ("ray_cpu_s", "Ray procs CPU", ".1f"),
            ("driver_cpu_s", "driver CPU", ".1f"),
        ],
    )
    print(f"\nload average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    write_json(
        args.json,
        {
            "benchmark": "ray_overhead",
            "quick": args.quick,
            "machine": machine(),
            "threads": args.threads,
            "batch": args.batch,
            "epochs": args.epochs,
            "train_images": train_rows,
            "overrides": args.set,
            "load_average": {"before": load_before, "after": load_after},
            "matmul_gflops": peak,
            "train_flops_per_image": flops,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
