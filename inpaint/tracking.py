"""Everything MLflow: where runs go, params, metrics, pictures, the registered model.

Plain functions keyed by run id, so that a long-lived Ray Train worker (rank 0) and the job drivers
log to the same run without sharing MLflow's fluent "active run". `start_run` points the process at a
tracking store; the other functions take an optional `tracking_uri` for processes that never called it
(a Ray worker gets the run id and the URI in its loop config), else use the process's current one.

Models are logged in MLflow's "pt2" format (`torch.export`): the graph and weights load without our
code and without unpickling, and with a CPU torch pinned in their requirements.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from inpaint.errors import UserError

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_FILE = "config.json"  # the run's params as given (nested, typed), for resuming the run
MODEL_NAME = "model"
MAX_PARAM_CHARS = 6000  # MLflow rejects longer param values
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
SECRET_NAME = re.compile(r"token|password|secret|access_key", re.IGNORECASE)

# Metrics that could not reach the tracking store yet, per run: the next call sends them first.
_unsent: dict[str, list[Metric]] = {}


# ---------------------------------------------------------------------------------------------
# Where runs go


def default_tracking_uri() -> str:
    """`sqlite:///` + the absolute path of `mlflow.db` in the current directory."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI to use: `uri`, else $MLFLOW_TRACKING_URI, else `default_tracking_uri()`.

    A relative SQLite path is made absolute: Ray workers run in other directories.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if "://" not in uri or uri.startswith("file:"):
        raise UserError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses: "
            "use sqlite:///PATH/mlflow.db or an MLflow server (http://HOST:PORT)"
        )
    if uri.startswith("sqlite:///"):
        path, query = _sqlite_path(uri)
        return f"sqlite:///{path.resolve()}{query}"
    return uri


def check_tracking(uri: str, timeout: float = 5) -> None:
    """Raise a one-line UserError if the tracking store at `uri` cannot be used: call before any Ray work."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
        except (OSError, ValueError) as err:  # URLError, HTTPError, timeouts are OSErrors
            reason = getattr(err, "reason", err)
            raise UserError(
                f"MLflow tracking server not reachable at {uri} ({reason}): start it "
                "(deploy/mlflow-server.sh up) or pass --tracking-uri / MLFLOW_TRACKING_URI"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = _sqlite_path(uri)[0].parent
        if not folder.is_dir():
            raise UserError(f"no folder {folder} for the MLflow database {uri}: create it or pass --tracking-uri")
        if not os.access(folder, os.W_OK):
            raise UserError(f"folder {folder} of the MLflow database {uri} is read-only: pass another --tracking-uri")


def ui_command(tracking_uri: str) -> str:
    """What to type (or open) to see the runs: the server's URL, or `mlflow ui` on the store."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --host 127.0.0.1 --port 5000"


def _sqlite_path(uri: str) -> tuple[Path, str]:
    """The database path of a `sqlite:///` URI, and its `?query` (or "")."""
    path, mark, query = uri.removeprefix("sqlite:///").partition("?")
    return Path(path), mark + query


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database; MLflow's default is ./mlruns of whichever
    process creates the experiment, which may be a Ray worker in a trial folder. Servers decide their own."""
    if tracking_uri.startswith("sqlite:///"):
        return str(_sqlite_path(tracking_uri)[0].parent / "mlartifacts")
    return None


# ---------------------------------------------------------------------------------------------
# Runs and params


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as flat `a.b.c` → str params; secrets (by key name or env value) become "***"."""
    flat = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = "***" if _is_secret(name, value) else str(value)[:MAX_PARAM_CHARS]
    return flat


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
) -> str:
    """Point this process at `tracking_uri` and start a run (a child of `parent_run_id` if given).

    A fresh run logs `params` flattened, and as `config.json` for `find_run`. With `run_id`, that run
    is re-opened (status RUNNING) to resume it; its params stay as first logged. Returns the run id.
    """
    mlflow.set_tracking_uri(tracking_uri)  # for MLflow calls that only read the process's URI
    client = MlflowClient(tracking_uri)
    tags = {**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    if run_id is not None:
        try:
            client.update_run(run_id, status="RUNNING")
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise UserError(f"no MLflow run {run_id} at {tracking_uri}: pass the tracking URI of that run") from None
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return run_id
    run = client.create_run(_experiment_id(client, tracking_uri, experiment), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(params).items()])
    client.log_dict(run_id, _redacted(params), CONFIG_FILE)
    return run_id


def find_run(tracking_uri: str, experiment: str, run_name: str) -> tuple[str, dict[str, Any]]:
    """The id of the latest run named `run_name` in `experiment`, and the params it started with."""
    client = MlflowClient(tracking_uri)
    runs = []
    if found := client.get_experiment_by_name(experiment):
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=f"attributes.run_name = {json.dumps(run_name)}",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    if not runs:
        raise UserError(
            f"no MLflow run named {run_name!r} in experiment {experiment!r} at {tracking_uri}: "
            "check the run name the earlier run printed, and --tracking-uri"
        )
    run_id = runs[0].info.run_id
    config = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CONFIG_FILE, tracking_uri=tracking_uri)
    return run_id, json.loads(Path(config).read_text())


def run_status(run_id: str, *, tracking_uri: str | None = None) -> str:
    """RUNNING, FINISHED, FAILED or KILLED."""
    return MlflowClient(tracking_uri).get_run(run_id).info.status


def child_runs(
    parent_run_id: str, tag: str, status: str | None = None, *, tracking_uri: str | None = None
) -> dict[str, str]:
    """The child runs of `parent_run_id` (those in `status` if given): their value of `tag` → run id."""
    client = MlflowClient(tracking_uri)
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    if status:
        query += f" and attributes.status = '{status}'"
    runs = client.search_runs([client.get_run(parent_run_id).info.experiment_id], filter_string=query)
    return {run.data.tags[tag]: run.info.run_id for run in runs}


def log_params(run_id: str, params: Mapping[str, Any], *, tracking_uri: str | None = None) -> None:
    """Log more params to a started run, in one batch."""
    MlflowClient(tracking_uri).log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])


def log_file(run_id: str, path: str, *, tracking_uri: str | None = None) -> None:
    """Log a local file (e.g. the search space) as an artifact of the run."""
    MlflowClient(tracking_uri).log_artifact(run_id, path)


def end_run(
    run_id: str, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED", *, tracking_uri: str | None = None
) -> None:
    """Send any buffered metrics, then mark the run ended."""
    _send_unsent(run_id, tracking_uri)
    MlflowClient(tracking_uri).set_terminated(run_id, status)


def _experiment_id(client: MlflowClient, tracking_uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri))
    except MlflowException as err:  # Tune trials starting side by side: another one created it
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _secret_env_values() -> list[str]:
    # a copy of the names first: MLflow's telemetry thread may unset a variable while we look
    values = {key: os.environ.get(key) for key in list(os.environ) if SECRET_NAME.search(key)}
    return [value for value in values.values() if value and len(value) >= 8]


def _is_secret(name: str, value: Any) -> bool:
    text = str(value)
    return bool(SECRET_NAME.search(name)) or any(secret in text for secret in _secret_env_values())


def _redacted(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`d` with the values `flatten` hides replaced by "***", nesting and types kept."""
    redacted = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            redacted[key] = _redacted(value, f"{name}.")
        else:
            redacted[key] = "***" if _is_secret(name, value) else value
    return redacted


# ---------------------------------------------------------------------------------------------
# Metrics


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int, *, tracking_uri: str | None = None) -> None:
    """Log `metrics` at `step` in one batch, after any earlier ones that could not be sent.

    MLflow's client retries for about a minute (as `runtime.configure_process` sets it); if the store is still
    unreachable, the metrics stay buffered in memory for the next call, with a warning: a restarting
    tracking server costs no metrics and no training.
    """
    _buffer(run_id, metrics, step)
    _send_unsent(run_id, tracking_uri)


def log_metrics_once(run_id: str, metrics: Mapping[str, float], step: int, *, tracking_uri: str | None = None) -> None:
    """`log_metrics`, unless the run already has these metrics at `step`: a restarted worker re-sends
    the epoch its checkpoint holds, which may or may not have reached MLflow before the stop."""
    key = next(iter(metrics))
    if any(metric.key == key and metric.step == step for metric in _unsent.get(run_id, [])):
        return
    try:
        history = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    except MlflowException as err:
        if not _is_transient(err):
            raise
        # unreachable after the client's minute of retries: buffer without waiting another minute
        _buffer(run_id, metrics, step)
        logger.warning("MLflow unreachable, keeping the metrics of step %d for the next try: %s", step, err)
        return
    if not any(metric.step == step for metric in history):
        log_metrics(run_id, metrics, step, tracking_uri=tracking_uri)


def logged_steps(run_id: str, key: str, *, tracking_uri: str | None = None) -> list[int]:
    """The steps at which the run logged `key`, in order."""
    return sorted(metric.step for metric in MlflowClient(tracking_uri).get_metric_history(run_id, key))


def metric_history(run_id: str, keys: list[str], *, tracking_uri: str | None = None) -> dict[str, list[float]]:
    """Each metric's values in step order (keys the run never logged are left out)."""
    client = MlflowClient(tracking_uri)
    history = {key: sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)) for key in keys}
    return {key: [m.value for m in metrics] for key, metrics in history.items() if metrics}


def _buffer(run_id: str, metrics: Mapping[str, float], step: int) -> None:
    timestamp = int(time.time() * 1000)  # when measured, not when finally sent
    _unsent.setdefault(run_id, []).extend(Metric(key, float(value), timestamp, step) for key, value in metrics.items())


def _send_unsent(run_id: str, tracking_uri: str | None) -> None:
    unsent = _unsent.get(run_id)
    if not unsent:
        return
    try:
        MlflowClient(tracking_uri).log_batch(run_id, metrics=unsent)
    except MlflowException as err:
        if not _is_transient(err):
            unsent.clear()  # a bad request stays bad: raise it once rather than on every later call
            raise
        logger.warning("MLflow unreachable, keeping %d metric values for the next try: %s", len(unsent), err)
        return
    unsent.clear()


def _is_transient(err: MlflowException) -> bool:
    """An unreachable or failing store (MLflow reports both as 5xx) rather than a bad request of ours."""
    return err.get_http_status_code() >= 500


# ---------------------------------------------------------------------------------------------
# Pictures


def log_picture(
    run_id: str, picture: np.ndarray | Figure, artifact_file: str, *, tracking_uri: str | None = None
) -> None:
    """Log an (H, W, 3) uint8 picture or a matplotlib figure as a PNG artifact; skipped with a warning if the
    store is unreachable."""
    client = MlflowClient(tracking_uri)
    try:
        if isinstance(picture, Figure):
            client.log_figure(run_id, picture, artifact_file)
        else:
            client.log_image(run_id, picture, artifact_file=artifact_file)
    except MlflowException as err:
        if not _is_transient(err):
            raise
        logger.warning("MLflow unreachable, %s not logged: %s", artifact_file, err)


def set_tag(run_id: str, key: str, value: str, *, tracking_uri: str | None = None) -> None:
    """Tag the run (e.g. a setting resolved on a worker, which the logged config cannot show); skipped with a
    warning if the store is unreachable."""
    try:
        MlflowClient(tracking_uri).set_tag(run_id, key, value)
    except MlflowException as err:
        if not _is_transient(err):
            raise
        logger.warning("MLflow unreachable, tag %s not set: %s", key, err)


def log_text(run_id: str, text: str, artifact_file: str, *, tracking_uri: str | None = None) -> None:
    """Log `text` as an artifact file (e.g. "table.md"); skipped with a warning if the store is unreachable."""
    try:
        MlflowClient(tracking_uri).log_text(run_id, text, artifact_file)
    except MlflowException as err:
        if not _is_transient(err):
            raise
        logger.warning("MLflow unreachable, %s not logged: %s", artifact_file, err)


# ---------------------------------------------------------------------------------------------
# Models


def model_requirements() -> list[str]:
    """pip requirements of a logged model: MLflow infers `torch==X` without `+cpu`, which PyPI serves as
    a multi-GB CUDA build; we pin the CPU build and its index instead. MLflow adds `mlflow==X` itself,
    which brings the rest (numpy, pandas, cloudpickle)."""
    return [f"--extra-index-url {CPU_TORCH_INDEX}", f"torch=={torch.__version__.split('+')[0]}+cpu"]


def any_size_signature(in_channels: int, out_channels: int) -> ModelSignature:
    """(N, C, H, W) float32 in and out with N, H and W free: an inferred signature would fix H and W, and
    torch.export would then build a graph for the example's image size only."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, in_channels, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, out_channels, -1, -1))]),
    )


def log_model(
    run_id: str,
    model: torch.nn.Module,
    input_example: np.ndarray,
    registered_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    *,
    tracking_uri: str | None = None,
) -> str:
    """Log `model` to the run (left RUNNING), register it under `registered_name` if given, tag it.

    Saved with `torch.export` in eval mode, with a signature whose batch, height and width are free
    (`input_example` (N, C, H, W) float32 only fixes the channels), so the graph takes any image size
    whose sides are multiples of the network's `size_multiple`. Loads with `mlflow.pytorch.load_model` (a
    torch.fx GraphModule: call it, but not `.eval()`, which it refuses) or `mlflow.pyfunc.load_model`. Returns
    `models:/NAME/VERSION`, or the logged model's URI if not registered.
    """
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)  # mlflow.pytorch.log_model only reads the process's URI
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if len(input_example) < 2:
        # torch.export fixes a dimension of size 1: a batch of 1 would make the model take only batches of 1
        input_example = np.concatenate([input_example, input_example])
    client = MlflowClient()
    # Without a fluent active run, MLflow files a logged model under the "Default" experiment: create
    # it in the run's experiment ourselves, and hand log_model its id and the run id.
    logged = mlflow.initialize_logged_model(
        name=MODEL_NAME,
        source_run_id=run_id,
        tags={key: str(value) for key, value in (tags or {}).items()},
        experiment_id=client.get_run(run_id).info.experiment_id,
    )
    was_training = model.training
    model.eval()
    try:
        info = mlflow.pytorch.log_model(
            model,
            name=MODEL_NAME,
            input_example=input_example,
            signature=any_size_signature(input_example.shape[1], 3),
            serialization_format="pt2",  # MLflow's default outside Databricks; loading pickles needs an opt-in
            # The pt2 graph loads without our code; the source goes along so the model can be rebuilt.
            code_paths=[str(PACKAGE_DIR)],
            pip_requirements=model_requirements(),
            registered_model_name=registered_name,
            model_id=logged.model_id,
            run_id=run_id,  # passed on to mlflow.models.Model.log, which links the model to the run
        )
    finally:
        model.train(was_training)
    if registered_name is None:
        return info.model_uri
    version = str(info.registered_model_version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    return f"models:/{registered_name}/{version}"


def set_alias(name: str, alias: str, version: str, *, tracking_uri: str | None = None) -> None:
    """Point `models:/NAME@ALIAS` at a version (e.g. "champion")."""
    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, version)


def logged_model_state(model_uri: str, *, tracking_uri: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The weights of a model `log_model` logged, and the config of the run it was logged in, from which
    `checkpoints.model_from_state` rebuilds the network as a module of this project."""
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)  # mlflow.pytorch.load_model only reads the process's URI
    try:
        run_id = mlflow.models.get_model_info(model_uri).run_id
        graph = mlflow.pytorch.load_model(model_uri)
    except MlflowException as err:
        raise UserError(
            f"cannot load the MLflow model {model_uri} from {mlflow.get_tracking_uri()} ({err.message}): "
            "check the name, version or alias, and --tracking-uri"
        ) from None
    try:
        config = mlflow.artifacts.load_dict(f"runs:/{run_id}/{CONFIG_FILE}")
    except MlflowException:
        raise UserError(
            f"{model_uri} was not logged by jobs/train.py: its run {run_id} has no {CONFIG_FILE} "
            "to rebuild the network from"
        ) from None
    return graph.state_dict(), config
