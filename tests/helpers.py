"""What the tests of real jobs share: a tiny dataset, a small model, running a job as a user does."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from inpaint.data import prepare

REPO = Path(__file__).resolve().parents[1]
METRICS = ["train_loss", "val_loss", "val_dice", "val_psnr_hole", "val_l1_hole", "val_ssim", "images_per_s"]
SMALL_MODEL = [
    "model.widths=[8,16,32]",
    "model.mixer_dim=16",
    "train.batch_size=16",
    "train.samples=4",
    "masks.min_size=4",
    "masks.max_size=12",
]


def write_tiny_dataset(root: Path, per_batch: int = 16) -> Path:
    """Smooth 32×32 images (CIFAR-10 python layout), prepared: 4 × `per_batch` train (64 by default),
    32 validation and 8 test rows."""
    rng = np.random.default_rng(0)
    train = 4 * per_batch
    coarse = rng.integers(0, 256, size=(train + 40, 3, 4, 4)).astype(np.uint8)
    images = coarse.repeat(8, axis=2).repeat(8, axis=3)  # (N, 3, 32, 32): planar, as CIFAR stores it
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i + 1}": images[i * per_batch : (i + 1) * per_batch] for i in range(4)}
    batches |= {"data_batch_5": images[train : train + 32], "test_batch": images[train + 32 :]}
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps({b"data": batch.reshape(len(batch), -1), b"labels": [0] * len(batch)}))
    prepare(folder, root / "prepared", val=32, progress=lambda _: None)
    return root / "prepared"


def run_job(args: list[str], cwd: Path, tracking_uri: str, job: str = "train.py", **popen) -> subprocess.Popen:
    """`python jobs/JOB ARGS` in `cwd`, tracking to `tracking_uri`, with a local Ray of its own."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / job), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """The job's output, once it exited 0."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def registered_epochs(run_dir: Path) -> list[int]:
    """The epochs whose checkpoints Ray Train has registered in the run's folder of its storage path.

    A checkpoint counts only once Ray Train's controller has every worker's report of it; a worker lost
    before that takes the epoch with it. Faults meant to resume from a checkpoint wait for this."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being written
        return []
    return [result["metrics"]["epoch"] for result in snapshot["checkpoint_results"]]
