"""The training job end to end: real Ray Train workers (DDP over gloo), a real MLflow SQLite store.

Each job runs as a user runs it, `python jobs/train.py ...`, in a subprocess with its own local Ray.
"""

from __future__ import annotations

import json
import os
import signal
import time

import mlflow
import pytest
import torch
from helpers import METRICS, SMALL_MODEL, finish, metric_steps, registered_epochs, run_job
from mlflow import MlflowClient

from inpaint.config import load_config
from inpaint.data import prepare, read_split, to_float_images
from inpaint.masks import MaskConfig, apply_holes, fixed_masks
from inpaint.metrics import MetricTotals
from inpaint.models import build_model, count_parameters, model_input
from inpaint.train import build_optimizer, training_precision

pytestmark = pytest.mark.ray


def minutes(client: MlflowClient, run_id: str) -> list[float]:
    """The run's `training_minutes`, epoch by epoch."""
    return [m.value for m in sorted(client.get_metric_history(run_id, "training_minutes"), key=lambda m: m.step)]


def test_two_worker_run_is_tracked_and_registered(tiny_data, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = finish(
        run_job(
            ["--data", str(tiny_data), "--workers", "2", "--epochs", "2", "--json", "result.json"]
            + [f"--set={s}" for s in SMALL_MODEL],
            tmp_path,
            uri,
        )
    )
    assert "epoch 2/2" in out and "mlflow ui" in out
    result = json.loads((tmp_path / "result.json").read_text())
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.widths"] == "[8, 16, 32]" and run.data.params["scaling.workers"] == "2"
    assert run.data.tags["train.precision_used"] == training_precision(load_config(None, []))  # "auto" resolved
    for key in METRICS:
        assert metric_steps(client, run.info.run_id, key) == [1, 2], key
    # what the network costs, once at step 0; the clock a study's ASHA may go by, every epoch
    keys = ("model_parameters", "model_gflops_per_image")
    cost = {key: client.get_metric_history(run.info.run_id, key) for key in keys}
    small = load_config(None, SMALL_MODEL).model
    assert [(m.step, m.value) for m in cost["model_parameters"]] == [(0, count_parameters(build_model(small)))]
    assert [m.step for m in cost["model_gflops_per_image"]] == [0] and cost["model_gflops_per_image"][0].value > 0
    assert 0 < minutes(client, run.info.run_id)[0] < minutes(client, run.info.run_id)[1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/epoch_001.png", "samples/epoch_002.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"curves.png", "config.json"}

    # the registered model reproduces the worker's validation metrics of the epoch it came from
    name, version = result["model_uri"].removeprefix("models:/").split("/")
    assert name == "inpaint-fused-unet"
    tags = client.get_model_version(name, version).tags
    epoch = int(tags["epoch"])
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(result["model_uri"])
    images, index = read_split(str(tiny_data), "val")
    images = to_float_images(images)
    masks = fixed_masks(torch.from_numpy(index), 32, 32, MaskConfig(kind="diagonal"), seed=1234)
    with torch.no_grad():
        pred = model(model_input(apply_holes(images, masks), masks))
    totals = MetricTotals()
    totals.update(images, pred, masks)
    ours = totals.compute()
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_psnr_hole")}
    assert ours["psnr_hole"] == pytest.approx(logged[epoch], abs=1e-3)
    assert result["val_psnr_hole"] == pytest.approx(logged[epoch], abs=1e-6)
    assert float(tags["val_psnr_hole"]) == pytest.approx(logged[epoch], abs=1e-3)
    # the run's own columns, which the MLflow UI sorts by, name the epoch it registered and its figures
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["best_epoch"] == epoch and metrics["best_val_psnr_hole"] == pytest.approx(logged[epoch], abs=1e-6)


@pytest.fixture(scope="module")
def one_worker_run(tiny_data, tmp_path_factory) -> dict:
    """One 1-worker run of 2 epochs for two tests, each on a setting of its own: the weights' moving average
    (train.ema_decay), and `--limit 40` on the prepared dataset given relative to the job's folder."""
    root = tmp_path_factory.mktemp("one-worker")
    uri = f"sqlite:///{root}/mlflow.db"
    args = ["--data", os.path.relpath(tiny_data, root), "--limit", "40", "--workers", "1", "--epochs", "2"]
    args += ["--json", "result.json"]
    args += [f"--set={s}" for s in [*SMALL_MODEL, "train.ema_decay=0.9", "tracking.run_name=ema"]]
    out = finish(run_job(args, root, uri))
    return {"root": root, "uri": uri, "out": out, "result": json.loads((root / "result.json").read_text())}


def test_the_weights_moving_average_is_validated_and_registered_when_asked_for(one_worker_run):
    uri, result = one_worker_run["uri"], one_worker_run["result"]
    client = MlflowClient(uri)
    metrics = client.get_run(result["run_id"]).data.metrics
    assert metrics["raw_val_psnr_hole"] != metrics["val_psnr_hole"]  # both weights scored, apart

    name, version = result["model_uri"].removeprefix("models:/").split("/")
    epoch = int(client.get_model_version(name, version).tags["epoch"])
    checkpoints = (one_worker_run["root"] / "runs" / "ema").glob("checkpoint_*/state.pt")
    states = [torch.load(path, weights_only=True) for path in checkpoints]
    (state,) = [state for state in states if state["epoch"] == epoch]
    mlflow.set_tracking_uri(uri)
    registered = mlflow.pytorch.load_model(result["model_uri"]).state_dict()
    raw, averaged = state["model"], {k.removeprefix("module."): v for k, v in state["ema"].items()}
    assert all(torch.equal(registered[key], averaged[key]) for key in registered)
    assert not all(torch.equal(registered[key], raw[key]) for key in registered if key.endswith("weight"))


def test_stopped_run_resumes_and_logs_each_epoch_once(interruptible_data, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--data", str(interruptible_data), "--workers", "2", "--epochs", "3", "--set=tracking.run_name=stopped"]
    args += [f"--set={s}" for s in SMALL_MODEL] + ["--set=train.batch_size=2"]  # epochs of seconds: time to stop
    proc = run_job(args, tmp_path, uri, start_new_session=True)
    lines = []
    deadline = time.monotonic() + 240
    for line in proc.stdout:  # stop the job as a user would (Ctrl-C) once epoch 1 is checkpointed
        lines.append(line)
        if 1 in registered_epochs(tmp_path / "runs" / "stopped"):
            os.killpg(proc.pid, signal.SIGINT)
            break
        assert time.monotonic() < deadline, "".join(lines)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("inpaint").experiment_id])
    assert run.info.status == "KILLED"
    epochs = metric_steps(client, run.info.run_id, "val_loss")
    assert 1 in epochs
    # the job's last word: the run, its last epoch, KILLED, and the command that goes on
    last = out.strip().splitlines()[-1]
    assert last == (
        f"stopped: run stopped after epoch {epochs[-1]} of 3; it is KILLED in MLflow; "
        "go on with: python jobs/train.py --resume stopped"
    ), out[-3000:]

    more = tmp_path / "more.yaml"
    more.write_text("train:\n  epochs: 4\n")  # --config applies on top of the run's saved config
    out = finish(run_job(["--resume", "stopped", "--config", str(more), "--json", "result.json"], tmp_path, uri))
    assert "epoch 4/4" in out and "epoch 1/4" not in out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["run_id"] == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    for key in METRICS:
        assert metric_steps(client, run.info.run_id, key) == [1, 2, 3, 4], key
    clock = minutes(client, run.info.run_id)  # carried over the resume, not counted from 0 again
    assert clock == sorted(clock) and len(set(clock)) == 4, clock
    assert metric_steps(client, run.info.run_id, "model_parameters") == [0]


BAD_INPUT = {
    "unknown key": (["--set", "model.fusoin=add"], "unknown config key 'model.fusoin'"),
    "no workers": (["--workers", "0"], "scaling.workers"),
    "too many workers": (["--workers", "64"], "64 workers × 1 CPU need 64 CPUs but the Ray cluster has"),
    "no cluster": (["--address", "127.0.0.1:1"], "no Ray cluster at '127.0.0.1:1'"),
    "no server": (["--tracking-uri", "http://127.0.0.1:1"], "MLflow tracking server not reachable at http://127.0.0.1:1"),
    "no data": (["--data", "/nonexistent/cifar"], "/nonexistent/cifar"),
    "hole too big": (["--set", "masks.max_size=40"], "masks.max_size = 40 is larger than the 32×32 images"),
    "sizes swapped": (["--set", "masks.min_size=9", "--set", "masks.max_size=5"],
                      "masks.min_size = 9 is larger than max_size (5)"),
    "limit too small": (["--limit", "9"], "data.limit = 9 must be at least 10"),
}  # fmt: skip


@pytest.fixture(scope="module")
def bad_input_jobs(tiny_data, tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Every bad-input job started at once (each stops within seconds, mostly importing): name → exit, output."""
    jobs = {}
    for name, (args, _) in BAD_INPUT.items():
        root = tmp_path_factory.mktemp("bad-input")
        data = [] if "--data" in args else ["--data", str(tiny_data)]
        jobs[name] = run_job([*data, *args], root, f"sqlite:///{root}/mlflow.db")
    try:
        outputs = {name: proc.communicate(timeout=300)[0] for name, proc in jobs.items()}
    finally:  # one that hangs fails its test without leaving the others running
        for proc in jobs.values():
            proc.kill()
    return {name: (jobs[name].returncode, out) for name, out in outputs.items()}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_stops_with_one_line(bad_input_jobs, case):
    returncode, out = bad_input_jobs[case]
    assert returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and BAD_INPUT[case][1] in errors[0], out
    assert "Traceback" not in out


def test_limit_applies_to_a_prepared_dataset(one_worker_run):
    """--limit on an already-prepared dataset (64 training, 32 validation images) keeps the first N images,
    split 9:1 as a limited source is, without preparing anything again; given as a path relative to where the
    job runs, which the workers (in other folders) read too."""
    assert "data: 36 training and 4 validation images" in one_worker_run["out"]
    run = MlflowClient(one_worker_run["uri"]).get_run(one_worker_run["result"]["run_id"])
    assert (run.data.tags["data.train_rows"], run.data.tags["data.val_rows"]) == ("36", "4")
    assert not (one_worker_run["root"] / "data").exists()  # nothing prepared


def test_a_dataset_without_validation_images_is_refused_in_one_line(hf_file, tmp_path):
    prepare(hf_file, tmp_path / "no-val", val=0, progress=lambda _: None)
    proc = run_job(["--data", str(tmp_path / "no-val")], tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert [line for line in out.splitlines() if line.startswith("error:")] == [
        f"error: {tmp_path / 'no-val'} has no validation images: prepare it again with --val N (jobs/prepare.py), "
        "N at least 1"
    ]


@pytest.mark.parametrize("steps_per_epoch, warmup_steps", [(100, 20), (2, 1), (1, 1)])
def test_the_learning_rate_warms_up_to_train_lr_and_never_past_it(steps_per_epoch, warmup_steps):
    """`train.warmup_epochs` 0.2: a fifth of an epoch of steps, rising to `train.lr`; with fewer steps than
    that takes, the first step is at the full rate, not a multiple of it."""
    cfg = load_config(None, ["train.lr=0.002", "train.warmup_epochs=0.2", "train.epochs=3"])
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), cfg, steps_per_epoch)
    rates = []
    for _ in range(3 * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(rates) == pytest.approx(0.002) and rates.index(max(rates)) == warmup_steps - 1
    assert rates[:warmup_steps] == sorted(rates[:warmup_steps]) and rates[-1] < 0.002 / 2  # then the cosine
