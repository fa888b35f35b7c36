"""Faults injected into real runs: the run survives, and MLflow holds every epoch exactly once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from helpers import METRICS, SMALL_MODEL, metric_steps, registered_epochs, run_job
from mlflow import MlflowClient

pytestmark = pytest.mark.ray


def run_and_kill_rank_1(data, tmp_path, run_name: str, *settings: str) -> tuple[subprocess.Popen, str]:
    """A 2-worker, 3-epoch run on 640 images whose rank-1 worker is SIGKILLed in epoch 2, once Ray Train
    holds epoch 1's checkpoint; the finished job and its output."""
    args = ["--data", str(data), "--workers", "2", "--epochs", "3", "--json", "result.json"]
    settings = (*SMALL_MODEL, "train.batch_size=2", f"tracking.run_name={run_name}", *settings)
    proc = run_job([*args, *(f"--set={s}" for s in settings)], tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    output, killed, deadline = [], None, time.monotonic() + 300
    for line in proc.stdout:
        output.append(line)
        found = re.search(r"pid=(\d+)\) world_rank=1", line) or re.search(r"pid=(\d+), world_rank=1", line)
        if found and killed is None:
            rank1 = int(found.group(1))
        if killed is None and 1 in registered_epochs(tmp_path / "runs" / run_name):
            os.kill(rank1, signal.SIGKILL)
            killed = rank1
        assert time.monotonic() < deadline, "".join(output)
    proc.wait(timeout=60)
    log = "".join(output)
    assert killed is not None, log[-4000:]
    return proc, log


def test_a_run_failing_past_max_failures_ends_failed_naming_the_cause(interruptible_data, tmp_path):
    proc, log = run_and_kill_rank_1(interruptible_data, tmp_path, "no-retries", "scaling.max_failures=0")
    assert proc.returncode == 1, log[-4000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: run no-retries failed (worker 1: "), log[-4000:]
    assert "Error" in errors[0] and "--resume no-retries" in errors[0]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("inpaint").experiment_id])
    assert run.info.status == "FAILED"  # not KILLED: nobody stopped it
    assert run.data.tags["failure"].startswith("worker 1: ") and run.data.tags["failure"] in errors[0]
    # what it trained is kept, each epoch once: epoch 1, and epoch 2 too when it ended before the kill landed
    assert metric_steps(client, run.info.run_id, "val_loss") in ([1], [1, 2])


def test_killed_worker_node_resumes_from_the_last_checkpoint(three_node_deployment, interruptible_data, tmp_path):
    """A job submitted to a cluster of three 1-CPU nodes, 2 workers: the node of a worker that is not the
    head dies (every process of it killed) in epoch 2; the run goes on from its last checkpoint on
    the two nodes left and MLflow holds every epoch once."""
    deployment = three_node_deployment
    args = ["python", "jobs/train.py", "--data", str(interruptible_data), "--workers", "2", "--epochs", "3"]
    settings = [*SMALL_MODEL, "train.batch_size=2", "tracking.run_name=node-kill"]
    settings += [f"scaling.storage_path={deployment.root / 'checkpoints'}", "scaling.max_failures=2"]
    args += [arg for setting in settings for arg in ("--set", setting)]
    deployment.script("submit.sh", "--no-wait", "--submission-id", "node-kill", "--", *args, timeout=60)

    workers = set(deployment.node_ips()[1:])
    deadline, killed, logs = time.monotonic() + 600, [], ""
    while not killed:
        assert time.monotonic() < deadline, logs[-4000:]
        time.sleep(0.5)
        assert deployment.api("/api/jobs/node-kill")["status"] in ("PENDING", "RUNNING"), logs[-4000:]
        logs = deployment.api("/api/jobs/node-kill/logs")["logs"]
        registered = registered_epochs(deployment.root / "checkpoints" / "node-kill")
        if 1 in registered and (on_workers := deployment.train_worker_ips() & workers):  # in epoch 2
            victim = sorted(on_workers)[0]
            killed = deployment.kill_node(victim)
            print(f"\nkilled node {victim}: processes {killed}")
    killed_at, status = time.monotonic(), "RUNNING"
    while status in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, logs[-4000:]
        time.sleep(2)
        status = deployment.api("/api/jobs/node-kill")["status"]
    logs = deployment.api("/api/jobs/node-kill/logs")["logs"]
    (tmp_path / "job.log").write_text(logs)  # the whole log, for a post-mortem
    print(f"\nnode killed: the job ended {time.monotonic() - killed_at:.0f} s later")
    assert status == "SUCCEEDED" and "epoch 3/3" in logs, logs[-5000:]
    assert re.search(r"resumed from the checkpoint of epoch [12]\b", logs), logs[-5000:]
    # the retry is said; the metrics are said once an epoch (the epoch line), not in Ray's report dumps as well
    assert "[FailurePolicy] RETRY" in logs and "Reporting training result" not in logs, logs[-5000:]

    client = MlflowClient(deployment.tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("inpaint").experiment_id], filter_string="attributes.run_name = 'node-kill'"
    )
    assert run.info.status == "FINISHED"
    for key in METRICS:
        assert metric_steps(client, run.info.run_id, key) == [1, 2, 3], key
