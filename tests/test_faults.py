"""Faults injected into real runs: the run survives, and MLflow holds every epoch exactly once."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from helpers import METRICS, SMALL_MODEL, metric_steps, run_job
from mlflow import MlflowClient

pytestmark = pytest.mark.ray


def test_killed_worker_resumes_from_the_last_checkpoint(tiny_data, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--data", str(tiny_data), "--workers", "2", "--epochs", "3", "--json", "result.json"]
    # small batches: epochs long enough to kill a worker in the middle of one
    proc = run_job([*args, *(f"--set={s}" for s in SMALL_MODEL), "--set=train.batch_size=2"], tmp_path, uri)
    output, killed, deadline = [], None, time.monotonic() + 300
    for line in proc.stdout:
        output.append(line)
        found = re.search(r"pid=(\d+)\) world_rank=1", line) or re.search(r"pid=(\d+), world_rank=1", line)
        if found and killed is None:
            rank1 = int(found.group(1))
        if killed is None and "epoch 2 step" in line:
            os.kill(rank1, signal.SIGKILL)  # mid-epoch 2, after epoch 1's checkpoint
            killed = rank1
        assert time.monotonic() < deadline, "".join(output)
    proc.wait(timeout=60)
    log = "".join(output)
    assert proc.returncode == 0, log[-4000:]
    assert killed is not None, log[-4000:]
    assert "epoch 3/3" in log

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("inpaint").experiment_id])
    assert run.info.status == "FINISHED"
    for key in METRICS:
        assert metric_steps(client, run.info.run_id, key) == [1, 2, 3], key
