"""What speed buys a user: the minutes the default recipe takes to reach given validation hole PSNRs.

Each `LABEL=CHECKOUT` is a checkout of this project (the working tree, or `git worktree add /tmp/before
7c4ea93` for the code before a change). Its `jobs/train.py` runs the default recipe as a user would,
one checkout after the other, each in its own local Ray (whose workers import that checkout's
`inpaint`, through PYTHONPATH) and its own MLflow store. From the run's metric history: the minutes
from the MLflow run's start (Ray's start-up included) to the first epoch whose `val_psnr_hole` reaches
each threshold, the steady images/s (median of epochs 2 and later), and the last epoch's PSNR.

python benchmarks/time_to_quality.py --data ../shared/data/cifar10 --runs before=/tmp/before after=. \\
    --json time_to_quality.json                  # two full default-recipe runs, one after the other
python benchmarks/time_to_quality.py --quick     # CI: a tiny model on synthetic data, seconds of training
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import REPO, TINY_MODEL, load_average, machine, print_table, synthetic_prepared, write_json


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="CIFAR-10 source or prepared dataset (default: $INPAINT_DATA)")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=[f"current={REPO}"],
        metavar="LABEL=CHECKOUT",
        help="checkouts to run, in order (default: this one)",
    )
    parser.add_argument("--thresholds", nargs="+", type=float, metavar="DB", help="default: 19 19.5 (quick: 5 100)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for all")
    parser.add_argument("--quick", action="store_true", help="CI: tiny model and synthetic data")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    args = parser.parse_args()
    runs = [run.partition("=") for run in args.runs]
    if any(not (label and sep and (Path(checkout) / "jobs" / "train.py").is_file()) for label, sep, checkout in runs):
        parser.error("--runs takes LABEL=CHECKOUT, each CHECKOUT a folder holding this project's jobs/train.py")
    args.runs = [(label, Path(checkout).resolve()) for label, _, checkout in runs]
    # quick: one threshold any training reaches and one none does, so that both outcomes show
    args.thresholds = args.thresholds or ([5.0, 100.0] if args.quick else [19.0, 19.5])
    if not args.quick and not (args.data or os.environ.get("INPAINT_DATA")):
        parser.error("--data (or INPAINT_DATA) is needed: the CIFAR-10 training split, or a prepared dataset")
    return args


def commit(checkout: Path) -> str:
    found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return (found.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def train(checkout: Path, data: str, workdir: Path, workers: int, overrides: list[str]) -> tuple[str, str]:
    """One `jobs/train.py` run of `checkout`, its output passed through; returns (tracking URI, run id)."""
    workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{workdir}/mlflow.db"
    command = [sys.executable, str(checkout / "jobs" / "train.py"), "--data", data, "--workers", str(workers)]
    command += ["--tracking-uri", uri, "--json", str(workdir / "result.json"), *(f"--set={s}" for s in overrides)]
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(checkout)}
    subprocess.run(command, cwd=workdir, env=env, check=True)
    return uri, json.loads((workdir / "result.json").read_text())["run_id"]


def time_to_quality(uri: str, run_id: str, thresholds: list[float]) -> dict[str, Any]:
    """Minutes from the run's start to each threshold (None if never reached), from MLflow's history."""
    from mlflow import MlflowClient  # late: MLflow's import is slow

    client = MlflowClient(uri)
    start_ms = client.get_run(run_id).info.start_time
    psnr = sorted(client.get_metric_history(run_id, "val_psnr_hole"), key=lambda m: m.step)
    speed = [m.value for m in client.get_metric_history(run_id, "images_per_s") if m.step >= 2]
    reached = {
        f"{threshold:g}": next(((m.timestamp - start_ms) / 60_000 for m in psnr if m.value >= threshold), None)
        for threshold in thresholds
    }
    return {
        "minutes_to": reached,
        "epochs": len(psnr),
        "last_psnr_hole": psnr[-1].value,
        "images_per_s": statistics.median(speed) if speed else None,
        "psnr_by_epoch": [(m.step, round((m.timestamp - start_ms) / 60_000, 2), m.value) for m in psnr],
    }


def main() -> None:
    args = parse_args()
    print(f"load average {load_average():.2f} before the runs")
    with tempfile.TemporaryDirectory(prefix="time-to-quality-") as tmp:
        data = args.data or os.environ.get("INPAINT_DATA")
        overrides = args.set
        if args.quick:
            data = synthetic_prepared(Path(tmp), 96, 32)
            overrides = [*TINY_MODEL, "train.epochs=2", "train.batch_size=16", *overrides]
        rows = []
        for label, checkout in args.runs:
            print(f"\n== {label}: {checkout} ({commit(checkout)})", flush=True)
            uri, run_id = train(checkout, data, Path(tmp) / label, args.workers, overrides)
            rows.append({"label": label, "commit": commit(checkout), **time_to_quality(uri, run_id, args.thresholds)})
    print(f"\nload average {load_average():.2f} after the runs")
    for row in rows:
        row.update({f"to_{key}": minutes for key, minutes in row["minutes_to"].items()})
    columns = [("label", "code", ""), ("commit", "commit", ""), ("images_per_s", "images/s", ".0f")]
    columns += [(f"to_{t:g}", f"min to {t:g} dB", ".1f") for t in args.thresholds]
    columns += [("epochs", "epochs", "d"), ("last_psnr_hole", "last dB", ".2f")]
    print_table("Time to quality: minutes from the run's start to validation hole PSNR", rows, columns)
    write_json(args.json, {"benchmark": "time_to_quality", "quick": args.quick, "machine": machine(),
                           "thresholds": args.thresholds, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
