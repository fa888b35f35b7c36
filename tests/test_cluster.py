"""The cluster path end to end, as deploy/README.md tells a user to take it: a Ray cluster of two nodes
(deploy/local-cluster.sh; separate network namespaces when root), an MLflow server
(deploy/mlflow-server.sh), jobs submitted with `ray job submit` (deploy/submit.sh), results read back
from the server over HTTP. The cluster and the server are shared by the session (`deployment` in
conftest.py), which stops them with their scripts and fails if anything of theirs is left running.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
import yaml
from conftest import Deployment, free_ports
from helpers import REPO
from mlflow import MlflowClient

from inpaint import fill
from inpaint.evaluate import load_model
from inpaint.runtime import ENVIRONMENT

pytestmark = pytest.mark.ray

DEPLOY = REPO / "deploy"


def submit_output(env: dict[str, str], *entrypoint: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DEPLOY / "submit.sh"), "--", *entrypoint], env=env, capture_output=True, text=True, timeout=60
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The submit helper's answer when something is missing: exit 1, one `error:` line, nothing else."""
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stdout + proc.stderr
    return lines[0]


def bare_env(tmp_path: Path) -> dict[str, str]:
    """A shell with no cluster and no MLflow server: empty run folders, no addresses set."""
    import os

    cleared = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in cleared}
    return env | {"INPAINT_CLUSTER_DIR": str(tmp_path / "cluster"), "INPAINT_MLFLOW_DIR": str(tmp_path / "mlflow")}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({}, "error: no Ray head node: none started in"),
        ({"RAY_ADDRESS": "127.0.0.1:9"}, "error: no Ray head node at 127.0.0.1:9: start the cluster"),
    ],
)
def test_submit_without_a_cluster_says_so(tmp_path, extra, message):
    line = one_error_line(submit_output(bare_env(tmp_path) | extra, "python", "jobs/train.py"))
    assert line.startswith(message), line


def test_submit_names_what_is_missing(deployment, tmp_path):
    """With the cluster up, each missing piece is named in one line, before anything is submitted."""
    env = deployment.env
    closed = "http://127.0.0.1:9"
    nowhere = f"http://{env['INPAINT_SERVICE_HOST']}:9"  # where the nodes would reach a server, but none listens
    wrong_token = tmp_path / "token"
    wrong_token.write_text("0" * 64)
    cases = [
        ({"RAY_API_SERVER_ADDRESS": closed}, f"error: no Ray job server at {closed} (the head node's dashboard"),
        ({"RAY_AUTH_TOKEN_PATH": str(wrong_token)}, "refused the request (HTTP 403): give it the cluster's token"),
        ({"INPAINT_MLFLOW_DIR": str(tmp_path)}, "error: no MLflow server: none started in"),
        ({"MLFLOW_TRACKING_URI": nowhere}, f"error: no MLflow server at {nowhere}: start it"),
        ({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}, "error: MLFLOW_TRACKING_URI=sqlite:///mlflow.db is not"),
    ]
    if deployment.cluster["MODE"] == "netns":  # nodes in their own namespaces cannot reach this loopback
        port = deployment.tracking_uri.rsplit(":", 1)[1]
        cases.append(({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}, "listens on this machine's loopback"))
    for extra, message in cases:
        line = one_error_line(submit_output(env | extra, "python", "jobs/train.py"))
        assert message in line, (extra, line)


def test_train_job_runs_on_both_nodes_and_lands_in_mlflow(deployment, cluster_train_run):
    status, logs = cluster_train_run["status"], cluster_train_run["logs"]
    assert status == "SUCCEEDED", logs[-5000:]
    assert "epoch 2/2" in logs and not [line for line in logs.splitlines() if line.startswith("error:")]
    # DDP spans the nodes: Ray prefixes the output of a worker on another node with its address
    worker_ips = set(re.findall(r"\(RayTrainWorker pid=\d+, ip=([\d.]+)\)", logs))
    assert worker_ips & set(deployment.node_ips()[1:]), logs[-5000:]

    result = json.loads(cluster_train_run["json"].read_text())
    client = MlflowClient(deployment.tracking_uri)  # over HTTP, as any node or user reads it
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "cluster-train"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri  # served by the server
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_dice")) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "config.json", "samples"} <= artifacts
    # the artifacts live in the server's store, which it serves: on disk there, not in the job's folder
    stored = list((deployment.mlflow_dir / "artifacts").rglob("curves.png"))
    assert any(run.info.run_id in str(path) for path in stored), stored

    name, version = result["model_uri"].removeprefix("models:/").split("/")
    registered = client.get_model_version(name, version)
    assert registered.run_id == run.info.run_id and registered.status == "READY"
    mlflow.set_tracking_uri(deployment.tracking_uri)
    model = mlflow.pytorch.load_model(result["model_uri"])  # weights downloaded through the server
    with torch.no_grad():
        out = model(torch.rand(2, 4, 32, 32))  # masked RGB and the mask
    assert out.shape == (2, 3, 32, 32)
    # checkpoints went to the storage path every node reaches
    assert list((deployment.root / "checkpoints" / "cluster-train").glob("checkpoint_*/state.pt"))


def test_tune_study_runs_on_the_cluster_and_lands_in_mlflow(deployment, cluster_tune_study):
    status, logs = cluster_tune_study["status"], cluster_tune_study["logs"]
    assert status == "SUCCEEDED", logs[-5000:]
    result = json.loads(cluster_tune_study["json"].read_text())
    client = MlflowClient(deployment.tracking_uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "cluster-study"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2 and all("val_dice" in child.data.metrics for child in children)
    assert result["best_run_id"] in {child.info.run_id for child in children}
    name = result["model_uri"].removeprefix("models:/").split("@")[0]
    best = client.get_model_version_by_alias(name, "best")
    assert best.run_id == result["best_run_id"]


def serve_deploy(cluster, user_config: dict, folder: Path) -> str:
    """deploy/serve-config.yaml, its `user_config` updated and on a free port, through `serve deploy` on
    `cluster` (a conftest.Deployment) as a user runs it; its URL once /healthz answers there."""
    config = yaml.safe_load((REPO / "deploy" / "serve-config.yaml").read_text())
    (port,) = free_ports(1)
    config["http_options"]["port"] = port
    (deployment,) = config["applications"][0]["deployments"]
    deployment["user_config"] |= user_config
    (folder / "serve-config.yaml").write_text(yaml.safe_dump(config))
    deployed = subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "deploy", str(folder / "serve-config.yaml")]
        + ["--address", cluster.dashboard],
        env=cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return url
        except requests.RequestException:  # the proxy or the replica not up yet
            pass
        assert time.monotonic() < deadline, "no /healthz in 180 s after serve deploy"
        time.sleep(1)


@pytest.fixture(scope="class")
def best_served(deployment, cluster_train_run, cluster_tune_study, tmp_path_factory) -> dict:
    """deploy/serve-config.yaml through `serve deploy` on the two-node cluster, its model `models:/NAME@best` read
    from the cluster's MLflow server. `@best` is moved first to the train job's version, neither the latest nor the
    study's pick, so a replica serving either is caught; afterwards Serve is shut down and `@best` put back."""
    assert cluster_train_run["status"] == cluster_tune_study["status"] == "SUCCEEDED"  # (their own tests say why not)
    client = MlflowClient(deployment.tracking_uri)
    name, version = json.loads(cluster_train_run["json"].read_text())["model_uri"].removeprefix("models:/").split("/")
    study_best = str(client.get_model_version_by_alias(name, "best").version)
    latest = max(int(found.version) for found in client.search_model_versions(f"name = '{name}'"))
    assert version not in (study_best, str(latest)), (version, study_best, latest)
    client.set_registered_model_alias(name, "best", version)
    served = {"model": f"models:/{name}@best", "tracking_uri": deployment.tracking_uri}
    try:
        url = serve_deploy(deployment, served, tmp_path_factory.mktemp("serve"))
        yield {"url": url, "name": name, "version": version, "study_best": study_best}
    finally:
        client.set_registered_model_alias(name, "best", study_best)  # as the study left it
        subprocess.run(
            [str(Path(sys.executable).parent / "serve"), "shutdown", "--address", deployment.dashboard, "-y"],
            env=deployment.env, capture_output=True, timeout=120,
        )  # fmt: skip


class TestServeDeploy:
    """One `serve deploy` (`best_served`), two checks of it; Serve is shut down when they are done."""

    def test_serve_deploy_serves_the_version_best_names_from_the_mlflow_server(self, deployment, best_served):
        """The fill must be the version's that `@best` names."""
        from test_serve import close, decoded, picture, png, post, rectangle

        url, name, version = best_served["url"], best_served["name"], best_served["version"]
        client = MlflowClient(deployment.tracking_uri)
        model = requests.get(f"{url}/model", timeout=30).json()
        assert (model["name"], model["version"], model["alias"]) == (name, version, "best"), model
        assert model["run_id"] == client.get_model_version(name, version).run_id
        image, hole = picture(32, 32), rectangle(32, 32, 8, 6, 12, 14)
        response = post(url, png(image), png(hole.astype(np.uint8) * 255))
        filled = decoded(response)
        assert response.headers["X-Model-Version"] == f"models:/{name}/{version}"
        np.testing.assert_array_equal(filled[~hole], image[~hole])
        ours, theirs = (
            load_model(f"models:/{name}/{v}", deployment.tracking_uri) for v in (version, best_served["study_best"])
        )
        assert close(filled, fill.inpaint_image(ours, image, hole, mode="scaled"))
        assert not close(filled, fill.inpaint_image(theirs, image, hole, mode="scaled"))  # they can be told apart

    def test_replicas_deployed_on_a_ray_start_cluster_run_with_the_process_settings(self, deployment, best_served):
        """The nodes were started from a shell without `runtime.ENVIRONMENT`'s variables (`deployment`), as a
        user's `ray start` is: a driver on the cluster asks the replica, through a deployment handle, what its
        process runs with."""
        ask = "import json, ray; from ray import serve; ray.init(); "
        ask += "print(json.dumps(serve.get_app_handle('inpaint').process_settings.remote().result()))"
        asked = subprocess.run(
            [sys.executable, "-c", ask], env=deployment.env, capture_output=True, text=True, timeout=120
        )
        assert asked.returncode == 0, asked.stdout + asked.stderr
        assert json.loads(asked.stdout.strip().splitlines()[-1]) == ENVIRONMENT


def test_a_job_submitted_without_mlflow_fails_in_one_line(deployment):
    """Plain `ray job submit`, past the helper's checks: the job itself names the missing server."""
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", deployment.dashboard, "--working-dir", str(REPO), "--no-wait"]
        + ["--submission-id", "inpaint-no-mlflow", "--", "python", "jobs/train.py", "--data", "/nonexistent"]
        + ["--tracking-uri", "http://127.0.0.1:9"],
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deadline = time.monotonic() + 120
    while (status := deployment.api("/api/jobs/inpaint-no-mlflow")["status"]) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, status
        time.sleep(1)
    logs = deployment.api("/api/jobs/inpaint-no-mlflow/logs")["logs"]
    assert status == "FAILED", logs
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MLflow tracking server not reachable at http://127.0.0.1:9" in errors[0], logs
    assert "Traceback" not in logs


def test_loopback_cluster_up_status_down(tmp_path):
    """The mode for machines without root: nodes on 127.0.0.1 and 127.0.0.2, its own ports and temp dirs."""
    deploy = Deployment(tmp_path, nodes=2, mode="loopback")
    port, dashboard = free_ports(2)
    try:
        up = deploy.script(
            "local-cluster.sh", "up", "--mode", "loopback", "--port", str(port), "--dashboard-port", str(dashboard)
        )
        assert f"dashboard and job server  http://127.0.0.1:{dashboard}" in up.stdout
        deploy.cluster = deploy.read_vars(deploy.cluster_dir / "cluster.state")
        deploy.env |= {k: v for k, v in deploy.read_vars(deploy.cluster_dir / "cluster.env").items()}
        status = deploy.script("local-cluster.sh", "status")
        assert status.stdout.startswith(f"cluster {deploy.cluster['CLUSTER_ID']} (loopback): 2 of 2 nodes alive")
        again = deploy.script("local-cluster.sh", "up", "--mode", "loopback", check=False)
        assert again.returncode == 1 and "a cluster is already up" in again.stderr
    finally:
        down = deploy.script("local-cluster.sh", "down", check=False)
    assert down.returncode == 0 and "down:" in down.stdout, down.stdout + down.stderr
    assert not deploy.leftovers()
    assert deploy.script("local-cluster.sh", "status", check=False).returncode == 1


def test_down_leaves_nothing_running(deployment):
    """Last in this file (the session's cluster and server are not needed after it): both scripts' `down`
    stop every process they started, and the cluster's namespaces; the helper then finds no head node."""
    deployment.down()  # asserts that no process or namespace of theirs is left
    assert deployment.script("local-cluster.sh", "status", check=False).returncode == 1
    line = one_error_line(submit_output(deployment.env, "python", "jobs/train.py"))
    assert line.startswith(f"error: no Ray head node at {deployment.env['RAY_ADDRESS']}"), line
