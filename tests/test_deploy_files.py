"""deploy/ for more than one machine (a KubeRay RayJob, a Ray cluster-launcher YAML, the image they run)
and the deploy scripts: parsed and checked against the project, since no Kubernetes or cloud runs here.
Every job command they give must parse with the job's own arguments and config keys, and every file
they name must exist."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import ray
import yaml
from helpers import REPO

from inpaint.config import load_config

DEPLOY = REPO / "deploy"
PYPROJECT = (REPO / "pyproject.toml").read_text()
TORCH = re.search(r'"torch==([\d.]+)"', PYPROJECT).group(1)
PROJECT_PATH = re.compile(r"(?<![\w/.~-])((?:jobs|configs|deploy|tune_spaces|inpaint|tests|docs)/[\w./-]*\w)")


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_entrypoint(command: str) -> dict[str, object]:
    """A `python jobs/X.py ARGS` command: the script exists, its parser takes ARGS, its config overrides
    are known keys of the right types. Returns the parsed arguments."""
    words = shlex.split(command)
    assert words[0] == "python" and words[1].startswith("jobs/"), command
    assert (REPO / words[1]).is_file(), f"{words[1]} (in {command!r}) is not in the project"
    job = load_job(Path(words[1]).stem)
    args = job.parse_args(words[2:])
    for option in ("config", "space"):
        if getattr(args, option, None):
            assert (REPO / getattr(args, option)).is_file(), f"--{option} {getattr(args, option)} is not in the project"
    flags = {"scaling.workers": getattr(args, "workers", None), "train.epochs": getattr(args, "epochs", None)}
    values = {key: value for key, value in flags.items() if value is not None}
    cfg = load_config(args.config and str(REPO / args.config), args.set, values=values)  # unknown keys, bad types
    return {"args": args, "cfg": cfg}


def project_paths(text: str) -> set[str]:
    """Paths inside the project that a file names (jobs/..., configs/..., deploy/...)."""
    return {match.rstrip(".") for match in PROJECT_PATH.findall(text)}


@pytest.mark.parametrize(
    "name", ["kuberay-rayjob.yaml", "cluster.yaml", "Dockerfile", "README.md", "local-cluster.sh", "submit.sh"]
)
def test_every_project_file_a_deploy_file_names_exists(name):
    text = (DEPLOY / name).read_text()
    named = project_paths(text)
    missing = sorted(path for path in named if not (REPO / path).exists())
    links = re.findall(r"\]\(([^)#\s]+)\)", text) if name.endswith(".md") else []  # markdown links and images
    missing += [link for link in links if "://" not in link and not (DEPLOY / link).exists()]
    assert not missing, f"deploy/{name} names {missing}, which are not in the project"
    if name.endswith(".yaml"):  # the job commands they give, in comments too
        for command in re.findall(r"python (jobs/\w+\.py[^\n`|]*)", text):
            if "..." not in command:  # a whole command, not "python jobs/train.py ..." in prose
                check_entrypoint("python " + command.rstrip(" \\"))


def test_kuberay_rayjob():
    (job,) = yaml.safe_load_all((DEPLOY / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    parsed = check_entrypoint(spec["entrypoint"])
    cfg = parsed["cfg"]

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"WORKDIR {runtime_env['working_dir']}" in dockerfile  # the job ships the project copy in the image
    # every node reaches the checkpoints: a shared volume or a URI
    storage = cfg.scaling.storage_path
    cluster = spec["rayClusterSpec"]
    mounts = {
        mount["mountPath"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for container in group["template"]["spec"]["containers"]
        for mount in container.get("volumeMounts", [])
    }
    assert "://" in storage or any(storage.startswith(mount + "/") for mount in mounts), (storage, mounts)

    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert "gpu" not in str(container.get("resources", {})).lower()  # CPU nodes
            limits = container["resources"]["limits"]
            start_cpus = group["rayStartParams"].get("num-cpus")
            assert start_cpus is None or float(start_cpus) <= float(limits["cpu"])
    worker_cpus = sum(
        float(group["rayStartParams"]["num-cpus"]) * group["replicas"] for group in cluster["workerGroupSpecs"]
    )
    assert cfg.scaling.workers * cfg.scaling.cpus_per_worker <= worker_cpus  # the job fits the cluster
    assert spec["shutdownAfterJobFinishes"] is True


def test_image_installs_cpu_torch_first_then_the_project():
    lines = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if not line.startswith("#")]
    text = "\n".join(lines)
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-cpu"
    torch_line = next(i for i, line in enumerate(lines) if f"torch=={TORCH}" in line)
    assert "download.pytorch.org/whl/cpu" in lines[torch_line]
    project_line = next(i for i, line in enumerate(lines) if re.search(r"pip install .*\s\.(\s|$)", line))
    assert torch_line < project_line
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "data", "runs", "mlruns"} <= set(ignored)


def test_cluster_launcher_yaml():
    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    assert config["provider"]["type"] and config["max_workers"] >= config["min_workers"] >= 1
    # what it copies to the nodes exists here (paths relative to the repository root, where `ray up` runs)
    remote_project = None
    for remote, local in config["file_mounts"].items():
        if not local.startswith("~"):
            assert (REPO / local).exists(), local
            remote_project = remote
    assert remote_project == "~/inpaint"
    setup = config["setup_commands"]
    torch_step = next(i for i, cmd in enumerate(setup) if f"torch=={TORCH}" in cmd)
    assert "download.pytorch.org/whl/cpu" in setup[torch_step]
    project_step = next(i for i, cmd in enumerate(setup) if re.search(rf"pip install .*{remote_project}\s*$", cmd))
    assert torch_step < project_step
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(cmd for cmd in commands if "ray start" in cmd)
        assert re.search(r"MLFLOW_TRACKING_URI=https?://\S+", start) and "RAY_AUTH_MODE=token" in start
    assert "~/.ray/auth_token" in config["file_mounts"]


@pytest.mark.parametrize("script", ["local-cluster.sh", "mlflow-server.sh", "submit.sh"])
def test_scripts_parse_and_explain_themselves(script):
    path = DEPLOY / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    text = path.read_text()
    assert "set -euo pipefail" in text
    assert "ray stop" not in text.replace("`ray stop` would", "")  # it would stop every Ray on the machine
    proc = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and script in proc.stderr, proc.stderr
