"""inpaint.tracking against real MLflow: a SQLite store in tmp_path, and a real `mlflow server`."""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from inpaint import pictures, tracking
from inpaint.errors import UserError
from inpaint.models import ModelConfig, build_model


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def steps(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


# ---------------------------------------------------------------------------------------------
# Where runs go


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking.resolve_tracking_uri(None) == "http://tracking:5000"
    assert tracking.resolve_tracking_uri("http://other:5000") == "http://other:5000"
    # relative SQLite paths are pinned to this directory: Ray workers run elsewhere
    assert tracking.resolve_tracking_uri("sqlite:///sub/m.db?timeout=30") == f"sqlite:///{tmp_path}/sub/m.db?timeout=30"


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns", "/abs/mlruns"])
def test_file_stores_are_refused(uri):
    with pytest.raises(UserError, match=r"file store.*sqlite:///PATH/mlflow.db"):
        tracking.resolve_tracking_uri(uri)


def test_check_tracking_sqlite(tmp_path, store):
    tracking.check_tracking(store)
    with pytest.raises(UserError, match="no folder .*missing"):
        tracking.check_tracking(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")


def test_check_tracking_fails_fast_with_nothing_listening():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(UserError, match=f"not reachable at {uri} .*mlflow-server.sh up"):
        tracking.check_tracking(uri, timeout=2)
    assert time.monotonic() - started < 3


def test_ui_command(store):
    assert tracking.ui_command(store) == f"mlflow ui --backend-store-uri {store} --host 127.0.0.1 --port 5000"
    assert tracking.ui_command("http://tracking:5000") == "http://tracking:5000"


# ---------------------------------------------------------------------------------------------
# Runs, params, metrics


def test_flatten_redacts_secrets(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-1234567890")
    config = {
        "train": {"lr": 0.001, "widths": [8, 16], "schedule": None},
        "storage": {"aws_secret_access_key": "abc", "api_token": "xyz", "mask_kind": "square"},
        "note": "https://user:tok-1234567890@host",
        "long": "x" * 7000,
    }
    assert tracking.flatten(config) == {
        "train.lr": "0.001",
        "train.widths": "[8, 16]",
        "train.schedule": "None",
        "storage.aws_secret_access_key": "***",
        "storage.api_token": "***",
        "storage.mask_kind": "square",
        "note": "***",
        "long": "x" * 6000,
    }


def test_runs_params_tags_and_resume(store):
    config = {"model": {"variant": "fused", "widths": [8, 16, 32]}, "train": {"lr": 0.001}, "db_password": "pw"}
    parent = tracking.start_run(store, "exp", "sweep", {"space": "small"})
    run_id = tracking.start_run(store, "exp", "trial-1", config, tags={"team": "vision"}, parent_run_id=parent)
    run = MlflowClient(store).get_run(run_id)
    assert run.data.params == {
        "model.variant": "fused",
        "model.widths": "[8, 16, 32]",
        "train.lr": "0.001",
        "db_password": "***",
    }
    assert run.data.tags["team"] == "vision"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.info.run_name == "trial-1"
    assert run.info.status == "RUNNING"
    # artifacts beside the database, wherever the process that created the experiment ran
    assert Path(run.info.artifact_uri).is_relative_to(Path(store.removeprefix("sqlite:///")).parent / "mlartifacts")

    found, saved = tracking.find_run(store, "exp", "trial-1")
    assert found == run_id
    assert saved == {**config, "db_password": "***"}  # nested and typed, as given

    tracking.end_run(run_id, "FAILED")
    assert MlflowClient(store).get_run(run_id).info.status == "FAILED"
    assert tracking.start_run(store, "exp", "trial-1", {"train": {"lr": 0.5}}, run_id=run_id) == run_id
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params["train.lr"] == "0.001"  # params stay as first logged

    with pytest.raises(UserError, match="no MLflow run named 'nope'"):
        tracking.find_run(store, "exp", "nope")
    with pytest.raises(UserError, match="no MLflow run 0123"):
        tracking.start_run(store, "exp", "x", {}, run_id="0123")


def test_metrics_at_steps(store):
    run_id = tracking.start_run(store, "exp", "run", {})
    for epoch, loss in [(1, 0.9), (2, 0.5), (3, 0.25)]:
        tracking.log_metrics(run_id, {"train_loss": loss, "val_psnr": 20.0 + epoch}, step=epoch)
    tracking.log_metrics_once(run_id, {"train_loss": 0.9, "val_psnr": 21.0}, step=1)  # already there: skipped
    tracking.log_metrics_once(run_id, {"train_loss": 0.1, "val_psnr": 24.0}, step=4)
    assert steps(store, run_id, "train_loss") == [(1, 0.9), (2, 0.5), (3, 0.25), (4, 0.1)]
    assert tracking.metric_history(run_id, ["train_loss", "val_psnr", "never"]) == {
        "train_loss": [0.9, 0.5, 0.25, 0.1],
        "val_psnr": [21.0, 22.0, 23.0, 24.0],
    }
    with pytest.raises(mlflow.exceptions.MlflowException, match="Invalid value"):
        tracking.log_metrics(run_id, {"bad!name": 1.0}, step=5)  # our bug: raised, not buffered forever
    tracking.end_run(run_id, tracking_uri=store)
    assert MlflowClient(store).get_run(run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------
# Pictures


def test_sample_grid_layout_and_hole():
    n, size = 2, 32
    target = torch.rand(n, 3, size, size)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 8:16, 8:16] = 1
    grid = pictures.sample_grid(target * (1 - mask), torch.full_like(target, 2.0), target, mask)
    tile = 4 * size  # enlarged ×4
    assert grid.shape == (n * (tile + 2) + 2, 3 * (tile + 2) + 2, 3)
    assert grid.dtype == np.uint8
    first_input = grid[2 : 2 + tile, 2 : 2 + tile]
    assert (first_input[4 * 8 : 4 * 16, 4 * 8 : 4 * 16] == 128).all()  # the hole, mid-grey
    first_output = grid[2 : 2 + tile, tile + 4 : 2 * tile + 4]
    assert (first_output == 255).all()  # clamped to [0, 1]
    second_truth = grid[tile + 4 : 2 * tile + 4, 2 * tile + 6 : 3 * tile + 6]
    expected = (target[1].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(second_truth[::4, ::4], expected)


def test_pictures_logged_as_png(store, tmp_path):
    run_id = tracking.start_run(store, "exp", "run", {})
    grid = pictures.sample_grid(torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32))
    curves = pictures.curves_figure({"train_loss": [0.9, 0.5, 0.3], "val_loss": [1.0, 0.6, 0.4]}, "losses")
    assert [axes.get_title() for axes in curves.axes] == ["train_loss", "val_loss"]
    tracking.log_picture(run_id, grid, "samples/epoch_001.png")
    tracking.log_picture(run_id, curves, "curves.png", tracking_uri=store)
    grid_png = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples/epoch_001.png")
    with Image.open(grid_png) as png:
        assert png.format == "PNG"
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), grid)
    curves_png = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="curves.png", tracking_uri=store)
    with Image.open(curves_png) as png:
        assert png.format == "PNG" and png.size == (640, 320)  # the figure's 6.4 × 3.2 inches at 100 dpi
        assert len(np.unique(np.asarray(png.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # something was drawn


# ---------------------------------------------------------------------------------------------
# Models


def test_log_model_registers_a_cpu_model_that_loads_anywhere(store, tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=[8, 16, 32], mixer_dim=16, mask_channel=True))
    model.train()
    run_id = tracking.start_run(store, "exp", "run", {})
    example = np.random.default_rng(0).random((1, 4, 32, 32), dtype=np.float32)  # a batch of 1, on purpose
    uri = tracking.log_model(run_id, model, example, "inpaint-test", tags={"val_psnr_hole": "21.5", "epoch": "3"})
    assert uri == "models:/inpaint-test/1"
    assert model.training  # mode restored
    assert MlflowClient(store).get_run(run_id).info.status == "RUNNING"  # the caller ends it
    assert mlflow.active_run() is None

    x = torch.rand(3, 4, 32, 32)  # another batch size than the example's
    with torch.no_grad():
        expected = model.eval()(x)
    loaded = mlflow.pytorch.load_model(uri)
    torch.testing.assert_close(loaded(x), expected)
    pyfunc = mlflow.pyfunc.load_model(uri)
    np.testing.assert_allclose(pyfunc.predict(x.numpy()), expected.numpy(), rtol=1e-5, atol=1e-6)

    version = MlflowClient(store).get_model_version("inpaint-test", "1")
    assert version.tags == {"val_psnr_hole": "21.5", "epoch": "3"}
    assert version.run_id == run_id
    tracking.set_alias("inpaint-test", "champion", "1")
    torch.testing.assert_close(mlflow.pytorch.load_model("models:/inpaint-test@champion")(x), expected)

    files = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model")))
    requirements = (files / "requirements.txt").read_text().splitlines()
    torch_version = torch.__version__.split("+")[0]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements
    assert f"torch=={torch_version}+cpu" in requirements
    assert f"torch=={torch_version}" not in requirements
    assert f"torch=={torch_version}+cpu" in (files / "conda.yaml").read_text()
    assert "-r requirements.txt" in (files / "python_env.yaml").read_text()
    assert (files / "code" / "inpaint" / "models" / "unet.py").is_file()

    # where `inpaint` cannot be imported at all
    script = (
        "import sys, torch, mlflow.pytorch; sys.modules['inpaint'] = None; "
        "print(mlflow.pytorch.load_model(sys.argv[1])(torch.ones(2, 4, 32, 32)).sum().item())"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    out = subprocess.run([sys.executable, "-c", script, uri], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        assert float(out.stdout.split()[-1]) == pytest.approx(model(torch.ones(2, 4, 32, 32)).sum().item(), rel=1e-5)


def test_log_model_unregistered(store):
    run_id = tracking.start_run(store, "exp", "run", {})
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 3, 3, padding=1), torch.nn.Sigmoid())
    uri = tracking.log_model(run_id, model, np.zeros((2, 4, 8, 8), np.float32), tags={"note": "plain"})
    assert uri.startswith("models:/m-")
    logged = MlflowClient(store).get_logged_model(uri.removeprefix("models:/"))
    run = MlflowClient(store).get_run(run_id)
    assert logged.experiment_id == run.info.experiment_id  # not MLflow's "Default" experiment
    assert logged.source_run_id == run_id
    assert logged.tags["note"] == "plain"
    assert [output.model_id for output in run.outputs.model_outputs] == [logged.model_id]
    assert mlflow.pytorch.load_model(uri)(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 8, 8)


# ---------------------------------------------------------------------------------------------
# A real tracking server, stopped and restarted mid-run


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store in `folder`, in its own process group."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}", "--workers", "1"]
        command += ["--artifacts-destination", str(self.folder / "server-artifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runners
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 (the server holds it)
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                    if response.read() == b"OK":
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"mlflow server not up after {timeout} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def test_metrics_survive_a_server_restart(tmp_path, monkeypatch, caplog):
    server = MlflowServer(tmp_path)
    try:
        server.start()
        tracking.check_tracking(server.uri)
        run_id = tracking.start_run(server.uri, "exp", "run", {"train": {"lr": 0.01}})
        tracking.log_metrics(run_id, {"loss": 1.0}, step=1, tracking_uri=server.uri)
        tracking.log_picture(run_id, np.zeros((8, 8, 3), np.uint8), "black.png")

        # Down for longer than the client retries (none here): buffered with a warning, not raised.
        server.stop()
        with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="inpaint.tracking"):
            patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            tracking.log_metrics(run_id, {"loss": 0.5}, step=2, tracking_uri=server.uri)
            tracking.log_metrics_once(run_id, {"loss": 0.4}, step=3, tracking_uri=server.uri)
            tracking.log_metrics_once(run_id, {"loss": 0.4}, step=3, tracking_uri=server.uri)  # buffered already
            tracking.log_picture(run_id, np.zeros((8, 8, 3), np.uint8), "lost.png", tracking_uri=server.uri)
        assert "keeping 1 metric values" in caplog.text  # step 1 went out: only step 2 is kept
        assert "keeping the metrics of step 3" in caplog.text and "lost.png not logged" in caplog.text

        # Down for a few seconds: the client's retries (about a minute, see inpaint.tracking) outlast it.
        restart = threading.Thread(target=server.start)
        restart.start()
        started = time.monotonic()
        tracking.log_metrics(run_id, {"loss": 0.25}, step=4, tracking_uri=server.uri)
        waited = time.monotonic() - started
        restart.join()
        assert waited > 1  # it really was down when the call began
        assert steps(server.uri, run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 0.4), (4, 0.25)]  # none lost, none twice
        tracking.end_run(run_id, tracking_uri=server.uri)
        assert MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"
        png = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="black.png", tracking_uri=server.uri)
        assert Image.open(io.BytesIO(Path(png).read_bytes())).size == (8, 8)
    finally:
        server.stop()
