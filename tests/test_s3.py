"""Data, checkpoints and MLflow artifacts on object storage, against a real S3 API: moto's server, started and
stopped by deploy/s3-server.sh as a user does, which checks every request's signature. Never mocked calls.

One server serves the module (`s3`); the test of a store that goes away mid-prepare puts a TCP relay of its
own in front of it, and the cluster test starts its own with `deploy/local-cluster.sh up --s3`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from helpers import METRICS, REPO, SMALL_MODEL, metric_steps
from mlflow import MlflowClient

DEPLOY = REPO / "deploy"
BUCKET = "inpaint"
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_exports(path: Path) -> dict[str, str]:
    """The `export NAME=VALUE` lines of an env file."""
    lines = (line.removeprefix("export ") for line in path.read_text().splitlines() if line.startswith("export "))
    return dict(line.split("=", 1) for line in lines)


class S3Server:
    """A moto S3 server run by deploy/s3-server.sh in `run_dir`; `env` is a shell's environment after
    `source s3.env` (and nothing else of AWS's)."""

    def __init__(self, run_dir: Path, host: str = "127.0.0.1"):
        self.run_dir, self.host, self.port = run_dir, host, free_port()

    def script(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(DEPLOY / "s3-server.sh"), *args, "--run-dir", str(self.run_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert not check or proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def up(self) -> str:
        out = self.script("up", "--host", self.host, "--port", str(self.port), "--bucket", BUCKET).stdout
        self.exports = read_exports(self.run_dir / "s3.env")
        self.server_id = read_state(self.run_dir / "s3.state")["SERVER_ID"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | self.exports
        self.env.pop("RAY_ADDRESS", None)
        self.env["PYTHONUNBUFFERED"] = "1"
        return out

    def pids(self) -> list[int]:
        mark = f"INPAINT_S3={self.server_id}".encode()
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
        return found

    def down(self) -> None:
        out = self.script("down").stdout
        assert "down: 1 processes stopped" in out, out
        assert not self.pids()

    def fs(self) -> pafs.S3FileSystem:
        """The bucket as this test process reads it, with the server's own key."""
        return pafs.S3FileSystem(
            access_key=self.exports["AWS_ACCESS_KEY_ID"],
            secret_key=self.exports["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=self.exports["AWS_ENDPOINT_URL"],
            region=self.exports["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str) -> set[str]:
        """Every object under s3://inpaint/PREFIX/, relative to it."""
        selector = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
        infos = self.fs().get_file_info(selector)
        return {info.path.removeprefix(f"{BUCKET}/{prefix}/") for info in infos if info.type == pafs.FileType.File}

    def read_json(self, key: str) -> dict | None:
        try:
            with self.fs().open_input_stream(f"{BUCKET}/{key}") as file:
                return json.loads(file.read())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def secrets(self) -> list[str]:
        return [self.exports["AWS_ACCESS_KEY_ID"], self.exports["AWS_SECRET_ACCESS_KEY"]]


def read_state(path: Path) -> dict[str, str]:
    """A state file of NAME=VALUE lines (deploy/*.sh write them)."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def job(
    name: str, args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python jobs/NAME ARGS` as a user runs it, in `cwd`, with a local Ray of its own."""
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / name), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """A job refused in one line: exit 2, a single `error:` line, no traceback."""
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    return errors[0]


def settings(*values: str) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    out = server.up()  # (a failed `up` takes down what it started)
    try:
        assert f"endpoint              http://127.0.0.1:{server.port}" in out and "s3://inpaint" in out, out
        assert (server.run_dir / "s3.env").stat().st_mode & 0o077 == 0  # the key is for its owner only
        assert not any(secret in out for secret in server.secrets())
        yield server
    finally:
        server.down()


@pytest.fixture(scope="module")
def s3_data(s3, tiny_data) -> str:
    """The tiny dataset's source prepared onto S3 by jobs/prepare.py."""
    uri = f"s3://{BUCKET}/tiny"
    proc = job("prepare.py", ["--source", str(tiny_data.parent / "cifar-10-batches-py"), "--out", uri, "--val", "32"],
               s3.env, tiny_data.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not any(secret in proc.stdout + proc.stderr for secret in s3.secrets())
    return uri


@pytest.fixture(scope="module")
def mlflow_s3(s3, tmp_path_factory) -> Iterator[str]:
    """An MLflow server (deploy/mlflow-server.sh) whose artifacts live in s3://inpaint/mlflow."""
    run_dir = tmp_path_factory.mktemp("mlflow")

    def script(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(DEPLOY / "mlflow-server.sh"), *args, "--run-dir", str(run_dir)],
                              env=s3.env, capture_output=True, text=True, timeout=180)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    out = script("up", "--port", str(free_port()), "--artifacts", f"s3://{BUCKET}/mlflow").stdout
    assert f"s3://{BUCKET}/mlflow (served through the server)" in out, out
    try:
        yield read_state(run_dir / "mlflow.state")["TRACKING_URI"]
    finally:
        script("down")


# ---------------------------------------------------------------------------------------------
# Prepared data


def test_prepare_writes_shards_then_the_manifest_to_s3(s3, s3_data, tiny_data, tmp_path, monkeypatch):
    from inpaint.data import read_manifest, read_split

    assert s3.keys("tiny") == {
        "train/part-00000.parquet",
        "val/part-00000.parquet",
        "test/part-00000.parquet",
        "manifest.json",  # and no *.tmp left: each object was moved into place
    }
    for name, value in s3.exports.items():
        monkeypatch.setenv(name, value)
    local, remote = read_manifest(tiny_data), read_manifest(s3_data)
    assert remote["splits"] == local["splits"] and remote["source"] == local["source"]
    for split in ("train", "val"):
        assert np.array_equal(read_split(s3_data, split)[0], read_split(tiny_data, split)[0])
    again = job("prepare.py", ["--source", remote["source"], "--out", s3_data, "--val", "32"], s3.env, tmp_path)
    assert again.returncode == 0 and "is already prepared" in again.stderr, again.stdout + again.stderr


# ---------------------------------------------------------------------------------------------
# Training on S3 data, checkpoints on S3, MLflow artifacts on S3


def test_train_on_a_folder_of_pictures_in_s3(s3, tmp_path):
    """A user's pictures under s3://inpaint/photos/ (nested, mixed formats and sizes, one corrupt), trained on
    as they are: Ray Data reads them from the bucket, the workers crop them."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    fs = s3.fs()
    for i, (height, width, fmt) in enumerate([(40, 56, "PNG"), (48, 36, "JPEG"), (64, 64, "WEBP"), (36, 50, "PNG"),
                                              (50, 40, "JPEG"), (44, 44, "PNG")]):  # fmt: skip
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format=fmt)
        with fs.open_output_stream(f"{BUCKET}/photos/{'a/b/' if i % 2 else ''}p{i}.{fmt.lower()}") as file:
            file.write(buffer.getvalue())
    with fs.open_output_stream(f"{BUCKET}/photos/a/broken.jpg") as file:
        file.write(b"not a picture")
    env = s3.env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    args = ["--data", f"s3://{BUCKET}/photos", "--workers", "2", "--epochs", "1", "--json", "result.json"]
    args += settings(*SMALL_MODEL, "data.crop_size=32", "data.val_share=0.3", "masks.kind=mixed")
    proc = job("train.py", args, env, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "epoch 1/1" in out, out[-4000:]
    assert f"train: left out 1 unreadable file(s) of 5: s3://{BUCKET}/photos/a/broken.jpg (" in out, out[-4000:]
    assert "data: 4 training and 2 validation images" in out  # the seeded share: p0.png and a/b/p5.png validate
    assert not any(secret in out for secret in s3.secrets())
    run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(json.loads((tmp_path / "result.json").read_text())["run_id"])
    assert run.data.params["data.path"] == f"s3://{BUCKET}/photos" and run.data.params["data.image_size"] == "[32, 32]"


def s3_registered_epochs(s3: S3Server, run_name: str) -> list[int]:
    """The epochs whose checkpoints Ray Train has registered, read from the run's folder on S3."""
    snapshot = s3.read_json(f"ckpt/{run_name}/checkpoint_manager_snapshot.json") or {}
    return [result["metrics"]["epoch"] for result in snapshot.get("checkpoint_results", [])]


@pytest.fixture(scope="module")
def s3_run(s3, mlflow_s3, interruptible_data, tmp_path_factory) -> dict:
    """A 2-worker run on S3 data, its checkpoints on S3 and MLflow's artifacts there, for the tests below: rank 1
    is SIGKILLed in epoch 2, once epoch 1's checkpoint is registered on S3, and the run goes on (2 epochs); then
    `--resume --epochs 3` adds an epoch. Both jobs' output, and the second's --json result."""
    root = tmp_path_factory.mktemp("s3-run")
    pafs.copy_files(str(interruptible_data), f"{BUCKET}/interruptible", destination_filesystem=s3.fs())
    env = s3.env | {"MLFLOW_TRACKING_URI": mlflow_s3}
    args = ["--data", f"s3://{BUCKET}/interruptible", "--workers", "2", "--epochs", "2"]
    args += settings(*SMALL_MODEL, "train.batch_size=2", "tracking.run_name=s3-kill")
    args += settings(f"scaling.storage_path=s3://{BUCKET}/ckpt")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), *args], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    output, rank1, killed, checked, deadline = [], None, None, 0.0, time.monotonic() + 300
    for line in proc.stdout:
        output.append(line)
        found = re.search(r"pid=(\d+)\) world_rank=1", line) or re.search(r"pid=(\d+), world_rank=1", line)
        if found and rank1 is None:
            rank1 = int(found.group(1))
        if killed is None and rank1 and time.monotonic() - checked > 0.5:
            checked = time.monotonic()
            if 1 in s3_registered_epochs(s3, "s3-kill"):
                os.kill(rank1, signal.SIGKILL)
                killed = rank1
        assert time.monotonic() < deadline, "".join(output)[-4000:]
    proc.wait(timeout=60)
    killed_log = "".join(output)
    assert killed and proc.returncode == 0, killed_log[-4000:]

    resumed = job("train.py", ["--resume", "s3-kill", "--epochs", "3", "--json", "result.json"], env, root)
    resumed_log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, resumed_log[-4000:]
    return {"root": root, "env": env, "killed": killed_log, "resumed": resumed_log,
            "result": json.loads((root / "result.json").read_text())}  # fmt: skip


@pytest.mark.ray
def test_killed_worker_resumes_from_s3_and_resume_continues_the_run(s3, mlflow_s3, s3_run):
    """The killed worker's run goes on from the checkpoint read back from S3; `--resume` from S3 again."""
    log = s3_run["killed"]
    assert "resumed from the checkpoint of epoch 1" in log and "epoch 2/2" in log, log[-4000:]
    log = s3_run["resumed"]
    assert "resumed from the checkpoint of epoch 2" in log and "epoch 3/3" in log, log[-4000:]
    assert 3 in s3_registered_epochs(s3, "s3-kill")
    client = MlflowClient(mlflow_s3)
    (run,) = client.search_runs([client.get_experiment_by_name("inpaint").experiment_id],
                                filter_string="attributes.run_name = 's3-kill'")  # fmt: skip
    assert run.info.status == "FINISHED" and run.info.run_id == s3_run["result"]["run_id"]
    for key in METRICS:
        assert metric_steps(client, run.info.run_id, key) == [1, 2, 3], key
    # nothing local: data, checkpoints, runs all on S3 (the --json result aside)
    assert sorted(p.name for p in s3_run["root"].iterdir()) == ["result.json"]


@pytest.mark.ray
def test_train_reads_s3_writes_checkpoints_and_artifacts_there_and_models_load(s3, mlflow_s3, s3_run, tmp_path):
    data = f"s3://{BUCKET}/interruptible"
    assert not any(secret in s3_run["killed"] + s3_run["resumed"] for secret in s3.secrets())
    # the checkpoints Ray Train keeps (the best 2 of the 3 epochs) are on S3, and only they
    snapshot = s3.read_json("ckpt/s3-kill/checkpoint_manager_snapshot.json")
    kept = {result["checkpoint_dir_name"] for result in snapshot["checkpoint_results"]}
    written = {key.split("/")[0] for key in s3.keys("ckpt/s3-kill") if key.endswith("/state.pt")}
    assert len(kept) == 2 and written == kept, (kept, written)
    result = s3_run["result"]
    client = MlflowClient(mlflow_s3)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:/")
    artifacts = {key.split("/artifacts/", 1)[-1] for key in s3.keys("mlflow") if run.info.run_id in key}
    samples = {f"samples/epoch_00{epoch}.png" for epoch in (1, 2, 3)}
    assert {"curves.png", "config.json", *samples} <= artifacts, artifacts
    assert any(key.endswith("/MLmodel") for key in s3.keys("mlflow")), "the model's files are on S3"
    logged = json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert data in logged and not any(secret in logged for secret in s3.secrets())

    # the registered model loads through the server, from S3, in the evaluation and inpaint jobs
    env = s3_run["env"]
    name, version = result["model_uri"].removeprefix("models:/").split("/")
    client.set_registered_model_alias(name, "best", version)
    evaluated = job("evaluate.py", ["--model", f"models:/{name}@best", "--data", data, "--json", "eval.json"],
                    env, tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-4000:]
    assert json.loads((tmp_path / "eval.json").read_text())["rows"]
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "image.png")
    hole = np.zeros((32, 32), np.uint8)
    hole[8:16, 8:16] = 255
    Image.fromarray(hole).save(tmp_path / "mask.png")
    filled = job("inpaint_image.py", ["--model", f"models:/{name}@best", "--image", "image.png", "--mask", "mask.png",
                                      "--out", "filled.png"], env, tmp_path)  # fmt: skip
    assert filled.returncode == 0 and (tmp_path / "filled.png").exists(), filled.stdout + filled.stderr


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the bucket and the fix, nothing written, no traceback


def test_bad_object_store_input_is_answered_in_one_line(s3, s3_data, tiny_data, tmp_path):
    source = str(tiny_data.parent / "cifar-10-batches-py")
    closed = f"http://127.0.0.1:{free_port()}"
    wrong = "wrong-secret-0123456789"
    cases = [
        ({"AWS_ENDPOINT_URL": closed}, "bad-1",
         f"cannot reach the object store at {closed} for bucket 'inpaint'", "AWS_ENDPOINT_URL"),
        ({}, "no-such-bucket",
         f"bucket 'no-such-bucket' does not exist at {s3.exports['AWS_ENDPOINT_URL']}", "aws s3 mb s3://no-such-bucket"),
        ({"AWS_SECRET_ACCESS_KEY": wrong}, "bad-3",
         "refused access to bucket 'inpaint'", "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ]  # fmt: skip
    empty = f"s3://{BUCKET}/nothing-here"  # a prefix that holds no prepared dataset
    stores = itertools.count()

    # Every job stops within seconds, mostly importing: all of them at once, each with a tracking store of its own.
    with ThreadPoolExecutor(16) as pool:

        def start(name: str, args: list[str], extra: dict[str, str] | None = None) -> Future:
            env = s3.env | (extra or {}) | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/{next(stores)}.db"}
            return pool.submit(job, name, args, env, tmp_path)

        refused = []
        for extra, prefix, message, fix in cases:
            out = "s3://no-such-bucket/x" if prefix == "no-such-bucket" else f"s3://{BUCKET}/{prefix}"
            # training names the same problem, before any Ray work, for the data and for the checkpoints
            train_args = ["--data", out, *settings(f"scaling.storage_path=s3://{BUCKET}/ckpt")]
            prepare = start("prepare.py", ["--source", source, "--out", out], extra)
            refused.append(((prepare, start("train.py", train_args, extra)), prefix, message, fix))
        no_bucket = start("train.py", ["--data", s3_data, *settings("scaling.storage_path=s3://no-such-bucket/ckpt")])
        train_empty = start("train.py", ["--data", empty])
        evaluate_empty = start("evaluate.py", ["--model", "models:/m/1", "--data", empty])
        # credentials in the URI are refused, and not repeated
        in_uri = start("prepare.py", ["--source", source, "--out", f"s3://AKIAX:{wrong}@inpaint/x"])

    for jobs, prefix, message, fix in refused:
        for refusal in jobs:
            line = one_error_line(refusal.result())
            assert message in line and fix in line and wrong not in line, line
        assert not s3.keys(prefix), "nothing is written"
    assert "bucket 'no-such-bucket' does not exist" in (line := one_error_line(no_bucket.result())), line
    line = one_error_line(train_empty.result())
    assert f"{empty} holds no prepared dataset" in line and f"--out {empty}" in line, line
    line = one_error_line(evaluate_empty.result())
    assert f"{empty} is not a prepared dataset" in line and f"--out {empty}" in line, line
    line = one_error_line(in_uri.result())
    assert "credentials in the URI" in line and wrong not in line, line

    # the MLflow server refuses artifacts in a bucket it cannot use, before it starts
    proc = subprocess.run([str(DEPLOY / "mlflow-server.sh"), "up", "--port", str(free_port()), "--run-dir",
                           str(tmp_path / "mlflow"), "--artifacts", "s3://no-such-bucket/mlflow"],
                          env=s3.env, capture_output=True, text=True, timeout=60)  # fmt: skip
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "bucket 'no-such-bucket' does not exist" in lines[0], lines
    assert not (tmp_path / "mlflow" / "mlflow.state").exists()


class Relay:
    """A TCP relay to the S3 server that goes away (closes every connection and its port) when a request
    for a `val/` object comes through: the store stopping after the train split was written."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.stopped = target, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            threading.Thread(target=self.pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(server, client, False), daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if upstream and re.search(rb"^(PUT|POST) /\S*/val/", data, re.MULTILINE):
                    self.stop()
                    return
                sink.sendall(data)
        except OSError:
            pass

    def stop(self) -> None:
        self.stopped.set()
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_a_store_lost_mid_prepare_leaves_no_manifest_and_the_next_run_redoes_it(s3, interruptible_data, tmp_path):
    source = str(interruptible_data.parent / "cifar-10-batches-py")
    relay = Relay(("127.0.0.1", s3.port))
    try:
        env = s3.env | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}"}
        proc = job("prepare.py", ["--source", source, "--out", f"s3://{BUCKET}/midway", "--val", "32"], env, tmp_path)
    finally:
        relay.stop()
    assert relay.stopped.is_set()
    line = one_error_line(proc)
    assert f"cannot reach the object store at http://127.0.0.1:{relay.port} for bucket 'inpaint'" in line, line
    assert "no manifest.json, the next run redoes it" in line, line
    written = s3.keys("midway")
    assert "train/part-00000.parquet" in written and "manifest.json" not in written, written

    again = job("prepare.py", ["--source", source, "--out", f"s3://{BUCKET}/midway", "--val", "32"], s3.env, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "removing train/ left by an interrupted run" in again.stderr, again.stderr
    assert s3.keys("midway") == {
        "train/part-00000.parquet",
        "val/part-00000.parquet",
        "test/part-00000.parquet",
        "manifest.json",
    }
    assert s3.read_json("midway/manifest.json")["splits"] == {"train": 640, "val": 32, "test": 8}


class Silent:
    """A store that hangs: a TCP listener that accepts every connection and never answers; `asked` is set
    once the first connection comes."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.asked = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)  # held open, never read: the request waits for an answer
            self.asked.set()

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            sock.close()


def test_a_store_that_never_answers_is_reported_within_20_s(tmp_path):
    """From its first connection to the store, the check (and a job's pre-flight check of its data) exits with
    the one-line error in 20 s; pyarrow's S3 defaults took 100 s. The clock starts at that connection, not at
    the command, so that imports on a busy machine do not count against the store's bound."""
    silent = Silent()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env |= {
        "AWS_ENDPOINT_URL": silent.endpoint,
        "AWS_ACCESS_KEY_ID": "hanging",
        "AWS_SECRET_ACCESS_KEY": "hanging",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "PYTHONPATH": str(REPO),  # this checkout's inpaint, whichever one the environment installed
    }
    commands = {
        "checking it": [sys.executable, "-m", "inpaint.storage", "check", f"s3://{BUCKET}/prefix"],
        "reading the data": [sys.executable, str(REPO / "jobs" / "train.py"), "--data", f"s3://{BUCKET}/tiny"],
    }
    try:
        for doing, command in commands.items():
            silent.asked.clear()
            proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)  # fmt: skip
            try:
                assert silent.asked.wait(timeout=300), "the command never asked the store"
                stdout, stderr = proc.communicate(timeout=20)
            finally:
                proc.kill()
                proc.wait()
            line = one_error_line(subprocess.CompletedProcess(command, proc.returncode, stdout, stderr))
            assert f"cannot reach the object store at {silent.endpoint} for bucket 'inpaint' while {doing}" in line
            assert "point AWS_ENDPOINT_URL at a reachable one" in line, line
    finally:
        silent.close()


def test_the_checks_s3_filesystem_is_what_pyarrow_resolves_with_short_timeouts(monkeypatch):
    """The endpoint, region and credentials come from the URI and the AWS settings exactly as from_uri reads
    them; only the check's timeouts are ours, and without them the filesystem is from_uri's own."""
    from inpaint import storage

    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")  # the S3 one wins, in pyarrow and here
    for uri in (f"s3://{BUCKET}/x", f"s3://{BUCKET}/x?region=eu-west-3&scheme=http"):
        resolved = pafs.FileSystem.from_uri(uri)[0].__reduce__()[1][0]
        assert resolved["endpoint_override"] == "http://127.0.0.1:2"
        fs, path = storage.filesystem(uri, storage.CHECK_TIMEOUTS)
        assert path == f"{BUCKET}/x"
        ours = {name: float(storage.CHECK_TIMEOUTS[name]) for name in ("connect_timeout", "request_timeout")}
        assert fs.__reduce__()[1][0] == resolved | ours
        assert storage.filesystem(uri)[0].__reduce__()[1][0] == resolved


# ---------------------------------------------------------------------------------------------
# The cluster path: nodes in their own network namespaces, no folder shared


@pytest.mark.ray
def test_a_cluster_job_keeps_everything_on_s3_and_nothing_in_shared_folders(tmp_path, tiny_data):
    """deploy/local-cluster.sh up --s3: two nodes of 1 CPU, each with its own working directory and temp dir, an
    S3 server where every node reaches it, MLflow's artifacts there. A submitted job reads its data from S3, writes
    checkpoints there, and writes nothing into the checkout the job was shipped from."""
    from conftest import Deployment, free_ports

    deploy = Deployment(tmp_path, nodes=2, cpus_per_node=1)
    gcs_port, dashboard_port, mlflow_port, s3_port = free_ports(4)
    started = time.time()
    try:
        deploy.script("local-cluster.sh", "up", "--nodes", "2", "--cpus-per-node", "1", "--s3", "--s3-port",
                      str(s3_port), "--port", str(gcs_port), "--dashboard-port", str(dashboard_port))  # fmt: skip
        deploy.cluster = deploy.read_vars(deploy.cluster_dir / "cluster.state")
        deploy.env |= deploy.read_vars(deploy.cluster_dir / "cluster.env")
        deploy.dashboard = deploy.env["RAY_API_SERVER_ADDRESS"]
        s3 = S3Server(deploy.cluster_dir / "s3")
        s3.exports = read_exports(s3.run_dir / "s3.env")
        s3.server_id = read_state(s3.run_dir / "s3.state")["SERVER_ID"]
        host = deploy.env["INPAINT_SERVICE_HOST"]
        assert s3.exports["AWS_ENDPOINT_URL"] == f"http://{host}:{s3_port}"  # where the nodes reach it
        deploy.env |= s3.exports  # as `source cluster.env` does
        deploy.script("mlflow-server.sh", "up", "--host", host, "--port", str(mlflow_port),
                      "--artifacts", f"s3://{BUCKET}/mlflow")  # fmt: skip
        deploy.mlflow = deploy.read_vars(deploy.mlflow_dir / "mlflow.state")
        deploy.tracking_uri = deploy.mlflow["TRACKING_URI"]

        data = f"s3://{BUCKET}/prepared"
        prepared = job("prepare.py", ["--source", str(tiny_data.parent / "cifar-10-batches-py"), "--out", data,
                                      "--val", "32"], deploy.env, tmp_path)  # fmt: skip
        assert prepared.returncode == 0, prepared.stdout + prepared.stderr
        entrypoint = ["python", "jobs/train.py", "--data", data, "--workers", "2", "--epochs", "1"]
        entrypoint += settings(*SMALL_MODEL, "tracking.run_name=s3-cluster", f"scaling.storage_path=s3://{BUCKET}/ckpt")
        status, logs = deploy.submit(entrypoint, "inpaint-s3-cluster", timeout=400)
        (tmp_path / "job.log").write_text(logs)
        assert status == "SUCCEEDED" and "epoch 1/1" in logs, logs[-5000:]
        assert not any(secret in logs for secret in s3.secrets())
        worker_ips = set(re.findall(r"\(RayTrainWorker pid=\d+, ip=([\d.]+)\)", logs))
        assert worker_ips & set(deploy.node_ips()[1:]), logs[-5000:]  # DDP spans the nodes

        assert any(key.endswith("/state.pt") for key in s3.keys("ckpt/s3-cluster")), "checkpoints on S3"
        client = MlflowClient(deploy.tracking_uri)
        (run,) = client.search_runs([client.get_experiment_by_name("inpaint").experiment_id],
                                    filter_string="attributes.run_name = 's3-cluster'")  # fmt: skip
        assert run.info.status == "FINISHED"
        assert any(run.info.run_id in key and key.endswith("curves.png") for key in s3.keys("mlflow"))
        assert not list((deploy.mlflow_dir / "artifacts").rglob("*.png")), "artifacts only on S3"

        # each node ran in its own folders: the job's copy of the project was unpacked in each node's temp dir
        temp_root = Path(deploy.cluster["TEMP_ROOT"])
        for k in (1, 2):
            assert list(temp_root.glob(f"n{k}/session_*/runtime_resources/working_dir_files/*")), k
            assert (temp_root / f"n{k}" / "cwd").is_dir() and (temp_root / f"n{k}" / "tmp").is_dir()
        written = written_since(REPO, started)
        assert not written, f"the job wrote into the shared checkout: {written[:20]}"
    finally:
        deploy.down()  # asserts that nothing of the cluster, the MLflow server or the S3 server is left
    assert not s3.pids()


SOURCE_SUFFIXES = {".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".txt", ".cfg", ".ini", ".lock"}
SKIPPED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "inpaint.egg-info"}


def written_since(root: Path, since: float) -> list[str]:
    """Files under `root` modified after `since`, leaving out sources and caches (people edit those meanwhile):
    what a job would leave (data, checkpoints, databases, pictures, logs)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED]
        for name in files:
            path = Path(folder, name)
            try:
                if path.suffix not in SOURCE_SUFFIXES and path.stat().st_mtime > since:
                    found.append(str(path.relative_to(root)))
            except OSError:
                continue
    return found


def test_the_kuberay_job_keeps_data_and_checkpoints_in_object_storage():
    """No pod shares a folder with another: the RayJob's data and checkpoints are URIs, its pods mount no
    volume but shared memory, and every pod gets the store's credentials from one Secret."""
    import shlex

    import yaml

    (rayjob,) = yaml.safe_load_all((DEPLOY / "kuberay-rayjob.yaml").read_text())
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[words.index("--data") + 1].startswith("s3://")
    assert any(word.startswith("scaling.storage_path=s3://") for word in words)
    cluster = rayjob["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert all("persistentVolumeClaim" not in volume for volume in pod.get("volumes", []))
        for container in pod["containers"]:
            assert {"secretRef": {"name": "inpaint-s3"}} in container["envFrom"], container["name"]
