"""Shared fixtures: tiny datasets, written to tmp_path in the formats users bring."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def random_split(count: int, height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)
    return images, rng.integers(0, 10, size=count).astype(np.int64)


@pytest.fixture
def cifar_splits() -> Splits:
    """CIFAR-10-shaped arrays: 5 train batches of 4 images, 6 test images, 32x32 HWC."""
    return {"train": random_split(20, 32, 32, seed=1), "test": random_split(6, 32, 32, seed=2)}


@pytest.fixture
def cifar_folder(tmp_path: Path, cifar_splits: Splits) -> Path:
    """`cifar-10-batches-py` as the CIFAR-10 python version lays it out (rows in planar CHW order)."""
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (train_images, train_labels), (test_images, test_labels) = cifar_splits["train"], cifar_splits["test"]
    batches = {
        f"data_batch_{i + 1}": (train_images[4 * i : 4 * i + 4], train_labels[4 * i : 4 * i + 4]) for i in range(5)
    }
    batches["test_batch"] = (test_images, test_labels)
    for name, (images, labels) in batches.items():
        batch = {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), b"labels": labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


@pytest.fixture
def cifar_archive(tmp_path: Path, cifar_folder: Path) -> Path:
    """The same batches as `cifar-10-python.tar.gz`."""
    archive = tmp_path / "archive" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_folder, arcname="cifar-10-batches-py")
    return archive


@pytest.fixture
def write_hf_parquet() -> Callable[..., Path]:
    """Write a Hugging Face image-layout Parquet file; images are arrays or PIL images (saved as PNG) or bytes."""

    def write(path: Path, images: list, labels: list[int] | None = None) -> Path:
        blobs = []
        for image in images:
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            if isinstance(image, Image.Image):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")  # lossless: pixels compare exactly
                image = buffer.getvalue()
            blobs.append(image)
        img = pa.array(
            [{"bytes": blob, "path": None} for blob in blobs],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
        labels = list(range(len(blobs))) if labels is None else labels
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"img": img, "label": pa.array(labels, pa.int64())}), path)
        return path

    return write


@pytest.fixture
def hf_splits() -> Splits:
    """Arrays for the Parquet sources: 6 high, 8 wide, so that a height/width mix-up shows."""
    return {"train": random_split(12, 6, 8, seed=3), "test": random_split(5, 6, 8, seed=4)}


@pytest.fixture
def hf_file(tmp_path: Path, hf_splits: Splits, write_hf_parquet) -> Path:
    """One Parquet file holding the train split."""
    images, labels = hf_splits["train"]
    return write_hf_parquet(tmp_path / "train.parquet", list(images), labels.tolist())


@pytest.fixture
def hf_folder(tmp_path: Path, hf_splits: Splits, write_hf_parquet) -> Path:
    """A folder of shards, as the Hugging Face Hub lays them out: two train shards, one test file, nested."""
    folder = tmp_path / "hf"
    (train_images, train_labels), (test_images, test_labels) = hf_splits["train"], hf_splits["test"]
    write_hf_parquet(
        folder / "data" / "train-00000-of-00002.parquet", list(train_images[:7]), train_labels[:7].tolist()
    )
    write_hf_parquet(
        folder / "data" / "train-00001-of-00002.parquet", list(train_images[7:]), train_labels[7:].tolist()
    )
    write_hf_parquet(folder / "data" / "test-00000-of-00001.parquet", list(test_images), test_labels.tolist())
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared dataset of 104 smooth 32×32 images, for real training runs (see helpers.py)."""
    from helpers import write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def interruptible_data(tmp_path_factory) -> Path:
    """640 smooth training images: at batch size 2, epochs of seconds even on a fast machine, long enough
    for a test to stop or break a run in the middle of one."""
    from helpers import write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("interruptible"), per_batch=160)


# ---------------------------------------------------------------------------------------------
# deploy/: a Ray cluster of two nodes and an MLflow server, started and stopped by the deploy scripts
# as a user does (tests/test_cluster.py, tests/test_browser.py). Self-contained: nothing above uses it.


class Deployment:
    """A local cluster (deploy/local-cluster.sh) and an MLflow server (deploy/mlflow-server.sh) in `root`,
    on free ports; `env` is what a shell that uses them has (deploy/submit.sh reads the run folders)."""

    DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
    CLEARED = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2, mode: str = "auto"):
        import os

        self.root, self.nodes, self.cpus_per_node, self.mode = root, nodes, cpus_per_node, mode
        self.cluster_dir, self.mlflow_dir = root / "cluster", root / "mlflow"
        self.env = {k: v for k, v in os.environ.items() if k not in (*self.CLEARED, "MLFLOW_TRACKING_URI")}
        self.env |= {
            "INPAINT_CLUSTER_DIR": str(self.cluster_dir),
            "INPAINT_MLFLOW_DIR": str(self.mlflow_dir),
            "PYTHONUNBUFFERED": "1",
        }
        self.cluster: dict[str, str] = {}  # local-cluster.sh's state file
        self.mlflow: dict[str, str] = {}  # mlflow-server.sh's
        self.timings: dict[str, float] = {}  # seconds per script call

    def script(self, name: str, *args: str, timeout: float = 180, check: bool = True):
        import subprocess
        import time

        started = time.monotonic()
        proc = subprocess.run(
            [str(self.DEPLOY / name), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        self.timings[f"{name} {args[0]}"] = time.monotonic() - started
        assert not check or proc.returncode == 0, f"{name} {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    @staticmethod
    def read_vars(path: Path) -> dict[str, str]:
        """A `NAME=value` file (a state file, or an env file of `export` lines) as a dict."""
        lines = (line.removeprefix("export ") for line in path.read_text().splitlines() if not line.startswith("#"))
        return {key: value.strip('"') for key, _, value in (line.partition("=") for line in lines) if value}

    def up(self) -> None:
        gcs_port, dashboard_port, mlflow_port = free_ports(3)
        self.script(
            "local-cluster.sh", "up", "--nodes", str(self.nodes), "--cpus-per-node", str(self.cpus_per_node),
            "--mode", self.mode,
            "--port", str(gcs_port), "--dashboard-port", str(dashboard_port),
        )  # fmt: skip
        self.cluster = self.read_vars(self.cluster_dir / "cluster.state")
        exported = self.read_vars(self.cluster_dir / "cluster.env")
        self.env |= exported  # as `source cluster.env` does
        self.dashboard = exported["RAY_API_SERVER_ADDRESS"]
        self.script("mlflow-server.sh", "up", "--host", exported["INPAINT_SERVICE_HOST"], "--port", str(mlflow_port))
        self.mlflow = self.read_vars(self.mlflow_dir / "mlflow.state")
        self.tracking_uri = self.mlflow["TRACKING_URI"]

    def api(self, path: str, method: str = "GET") -> dict:
        """A call to the head node's job server (the dashboard's REST API), with the cluster's token."""
        import json
        import urllib.request

        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        request = urllib.request.Request(
            f"{self.dashboard}{path}", method=method, headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def submit(self, entrypoint: list[str], submission_id: str, timeout: float = 300) -> tuple[str, str]:
        """Submit with deploy/submit.sh, wait until the job ends; its final status and its logs."""
        import time

        started = time.monotonic()
        self.script("submit.sh", "--no-wait", "--submission-id", submission_id, "--", *entrypoint, timeout=60)
        status = "PENDING"
        while status in ("PENDING", "RUNNING"):
            if time.monotonic() - started > timeout:
                self.api(f"/api/jobs/{submission_id}/stop", method="POST")
                break
            time.sleep(2)
            status = self.api(f"/api/jobs/{submission_id}")["status"]
        self.timings[f"job {submission_id}"] = time.monotonic() - started
        return status, self.api(f"/api/jobs/{submission_id}/logs")["logs"]

    def node_ips(self) -> list[str]:
        """Each node's address, the head's first."""
        if self.cluster["MODE"] == "netns":
            return [f"{self.cluster['SUBNET']}.{k}" for k in range(1, self.nodes + 1)]
        return [f"127.0.0.{k}" for k in range(1, self.nodes + 1)]

    def train_worker_ips(self) -> set[str]:
        """The addresses of the nodes hosting a live Ray Train worker now (Ray's state API)."""
        query = "detail=1&limit=1000&filter_keys=state&filter_predicates=%3D&filter_values="
        nodes = self.api(f"/api/v0/nodes?{query}ALIVE")["data"]["result"]["result"]
        actors = self.api(f"/api/v0/actors?{query}ALIVE")["data"]["result"]["result"]
        ips = {node["node_id"]: node["node_ip"] for node in nodes}
        return {ips[actor["node_id"]] for actor in actors if actor["class_name"] == "RayTrainWorker"}

    def kill_node(self, ip: str) -> list[int]:
        """SIGKILL every process of the worker node at `ip` (its raylet, agents and workers), as if the
        machine had died; returns their pids. netns mode: the node's namespace's processes; loopback:
        the processes naming its temp dir, and their descendants."""
        import contextlib
        import os
        import signal
        import subprocess

        k = self.node_ips().index(ip) + 1
        assert k > 1, "the head node is not a worker node"
        if self.cluster["MODE"] == "netns":
            namespace = f"inp-{self.cluster['CLUSTER_ID']}-n{k}"
            listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=True)
            pids = [int(pid) for pid in listed.stdout.split()]
        else:
            parents, pids = {}, []
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    if f"{self.cluster['TEMP_ROOT']}/n{k}/" in (proc / "cmdline").read_bytes().decode(errors="replace"):
                        pids.append(int(proc.name))
                except (OSError, IndexError, ValueError):
                    continue
            pids += [pid for pid, parent in parents.items() if parent in pids]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # gone with its parent
                os.kill(pid, signal.SIGKILL)
        return pids

    def leftovers(self) -> list[str]:
        """What of this cluster and server still runs: processes carrying their marks or naming their
        folders, and (netns mode) the cluster's network namespaces."""
        import os
        import subprocess

        marks = [f"INPAINT_CLUSTER={self.cluster.get('CLUSTER_ID')}", f"INPAINT_MLFLOW={self.mlflow.get('SERVER_ID')}"]
        folders = [str(self.root), self.cluster.get("TEMP_ROOT") or str(self.root)]
        left, ours = [], {str(os.getpid()), str(os.getppid())}
        for proc in Path("/proc").glob("[0-9]*"):
            if proc.name in ours:
                continue
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(mark.encode() in environ for mark in marks) or any(folder in cmdline for folder in folders):
                left.append(f"{proc.name}: {cmdline[:150]}")
        if self.cluster.get("MODE") == "netns":
            namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
            left += [f"namespace {line}" for line in namespaces if self.cluster["CLUSTER_ID"] in line]
        return left

    def mlflow_up(self) -> str:
        """The MLflow server's URI, starting it again (on 127.0.0.1, the same runs) if `down` stopped it."""
        if not self.mlflow_dir.joinpath("mlflow.state").exists():
            self.script("mlflow-server.sh", "up", "--port", str(free_ports(1)[0]))
            self.mlflow = self.read_vars(self.mlflow_dir / "mlflow.state")
            self.tracking_uri = self.mlflow["TRACKING_URI"]
        return self.tracking_uri

    def down(self) -> None:
        """Stop both with their scripts (if up), then assert that nothing of theirs runs."""
        stopped = [
            self.script("mlflow-server.sh", "down", check=False),
            self.script("local-cluster.sh", "down", check=False),
        ]
        assert all(proc.returncode == 0 for proc in stopped), [proc.stdout + proc.stderr for proc in stopped]
        left = self.leftovers()
        assert not left, "still running after down:\n" + "\n".join(left)


def free_ports(count: int) -> list[int]:
    """`count` ports, each free along with the four above it (a cluster's GCS port P takes P+1, P+2 and, in
    loopback mode, one more per node)."""
    import random
    import socket

    ports: list[int] = []
    while len(ports) < count:
        base = random.randrange(20000, 30000, 5)
        try:
            for port in range(base, base + 5):
                with socket.socket() as sock:
                    sock.bind(("", port))
        except OSError:
            continue
        if base not in ports:
            ports.append(base)
    return ports


@pytest.fixture(scope="session")
def deployment(tmp_path_factory):
    """A cluster of two nodes × 2 CPUs and an MLflow server, started from a shell that has none of
    `runtime.ENVIRONMENT`'s variables (what a user's `ray start` gives every process on a node); at the end both
    are stopped by their scripts, and the fixture fails if any of their processes or namespaces are left."""
    from inpaint.runtime import ENVIRONMENT

    deploy = Deployment(tmp_path_factory.mktemp("deploy"))
    deploy.env = {name: value for name, value in deploy.env.items() if name not in ENVIRONMENT}
    try:
        deploy.up()
        yield deploy
    finally:  # (tests/test_cluster.py's last test takes them down already, so the rest of the session runs without)
        deploy.down()
        print("\ndeploy/ steps (s):", {step: round(seconds, 1) for step, seconds in deploy.timings.items()})


@pytest.fixture
def three_node_deployment(tmp_path):
    """A cluster of three nodes × 1 CPU and an MLflow server of its own, for faults that break a cluster."""
    deploy = Deployment(tmp_path, nodes=3, cpus_per_node=1)
    try:
        deploy.up()
        yield deploy
    finally:
        deploy.down()


@pytest.fixture(scope="session")
def cluster_train_run(deployment, tiny_data) -> dict:
    """`python jobs/train.py` submitted to the two-node cluster: 2 workers of 2 CPUs (so one per node),
    2 epochs of a small model."""
    from helpers import SMALL_MODEL

    entrypoint = ["python", "jobs/train.py", "--data", str(tiny_data), "--workers", "2", "--epochs", "2"]
    entrypoint += ["--set", f"scaling.cpus_per_worker={deployment.cpus_per_node}"]
    entrypoint += ["--json", str(deployment.root / "train.json"), "--set", "tracking.run_name=cluster-train"]
    entrypoint += ["--set", f"scaling.storage_path={deployment.root / 'checkpoints'}"]
    entrypoint += [arg for setting in SMALL_MODEL for arg in ("--set", setting)]
    status, logs = deployment.submit(entrypoint, "inpaint-train")
    (deployment.root / "train-job.log").write_text(logs)
    return {"status": status, "logs": logs, "json": deployment.root / "train.json"}


@pytest.fixture(scope="session")
def cluster_tune_study(deployment, tiny_data) -> dict:
    """`python jobs/tune.py` submitted to the two-node cluster: 2 trials side by side, of 1 worker of 1 CPU
    and 1 epoch each."""
    from helpers import SMALL_MODEL

    space = deployment.root / "cluster-space.yaml"
    fixed = "\n".join(f"{key}: {value}" for key, value in (setting.split("=", 1) for setting in SMALL_MODEL))
    space.write_text(f"samples: 2\nmodel.mixer_depth: {{choice: [1, 2]}}\n{fixed}\n")
    entrypoint = ["python", "jobs/tune.py", "--space", str(space), "--data", str(tiny_data), "--workers", "1"]
    entrypoint += ["--json", str(deployment.root / "tune.json"), "--set", "train.epochs=1"]
    entrypoint += ["--set", "tracking.run_name=cluster-study"]
    entrypoint += ["--set", f"scaling.storage_path={deployment.root / 'checkpoints'}"]
    status, logs = deployment.submit(entrypoint, "inpaint-tune")
    (deployment.root / "tune-job.log").write_text(logs)
    return {"status": status, "logs": logs, "json": deployment.root / "tune.json"}
