"""Hyperparameter studies with Ray Tune over the training job, tracked as one MLflow run tree.

    space = load_space("tune_spaces/quick.yaml")
    cfg = load_config(None, [*space.overrides(), "data.path=DIR"])
    result = run_study(space, cfg, samples=6)

A search space is a YAML file of config keys (tune_spaces/README.md): a key given one of Tune's
sampling primitives is searched, a key given a plain value is the same for every trial. The driver
(this process) checks the space, prepares and reads the data once and opens the study's parent MLflow
run. Tune then calls `run_trial` once per sampled config, in an actor holding a sliver of a CPU: the
trial opens its child run and fits the training job's TorchTrainer, whose rank-0 worker logs every
epoch to that run and whose reports reach Tune (TuneReportCallback), so that ASHA stops weak trials
early. Afterwards the driver closes the child runs, registers the best trial's best epoch with the
alias `best`, and logs a results table and a picture of every trial's metric to the parent.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow import MlflowClient
from mlflow.entities import Param
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from inpaint import tracking
from inpaint.checkpoints import load_checkpoint_state
from inpaint.config import Config, get, load_config
from inpaint.errors import UserError
from inpaint.train import (
    check_cluster_fits,
    check_holes_fit,
    connect_ray,
    log_checkpoint_model,
    make_trainer,
    metric_mode,
    prepare_data,
    read_datasets,
)

PRIMITIVES = ("choice", "grid", "randint", "uniform", "loguniform")
RANGES = ("randint", "uniform", "loguniform")  # written [lo, hi]
# One value per study: the data is prepared once, the cluster and MLflow are shared, and ASHA
# compares trials on the same metric with the same epoch budget.
NOT_SEARCHABLE = ("data.", "scaling.", "tracking.", "train.epochs", "train.best_metric")
ANY_HOLES = {"masks.min_size": 1, "masks.max_size": 1_000_000}  # a pair no searched value conflicts with
TRIAL_CPU = 0.01  # a trial's own actor only waits on its TorchTrainer, but Ray needs it to hold something
TRIAL_RETRIES = 1  # a trial whose actor died starts again once; its TorchTrainer resumes from its checkpoint
TRIAL_TAG = "tune_trial_id"
BEST_ALIAS = "best"
TABLE_METRICS = ("val_psnr_hole", "val_dice", "val_ssim", "val_loss")


def config_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Every leaf key of the config tree, e.g. `model.mixer_depth`."""
    node = Config() if node is None else node
    keys = []
    for field in fields(node):
        value = getattr(node, field.name)
        name = f"{prefix}{field.name}"
        keys += config_keys(value, f"{name}.") if is_dataclass(value) else [name]
    return keys


CONFIG_KEYS = config_keys()


# ---------------------------------------------------------------------------------------------
# Search spaces: YAML files, checked before any Ray work


@dataclass(frozen=True)
class Search:
    """A searched key's sampling primitive and its arguments, as the space file writes them."""

    primitive: str  # one of PRIMITIVES
    args: list  # the values (choice, grid), or [lo, hi], hi included (randint too)

    def domain(self) -> Any:
        """The Tune search domain."""
        match self.primitive:
            case "choice":
                return tune.choice(self.args)
            case "grid":
                return tune.grid_search(self.args)
            case "randint":
                return tune.randint(self.args[0], self.args[1] + 1)  # Tune leaves hi out
            case "uniform":
                return tune.uniform(*self.args)
            case "loguniform":
                return tune.loguniform(*self.args)

    def __str__(self) -> str:
        return f"{{{self.primitive}: {json.dumps(self.args)}}}"


@dataclass
class Space:
    """A search-space file: the searched keys, the fixed ones, and its default number of samples."""

    path: Path
    searched: dict[str, Search]
    fixed: dict[str, Any]  # config values every trial shares
    samples: int | None = None
    early_stopping: bool = True  # ASHA; off, every trial trains every epoch (an ablation's equal budget)

    @property
    def name(self) -> str:
        return self.path.stem

    def overrides(self) -> list[str]:
        """The fixed values as `key=value` config overrides."""
        return as_overrides(self.fixed)

    def param_space(self) -> dict[str, Any]:
        return {key: search.domain() for key, search in self.searched.items()}

    def bounds(self, key: str, cfg: Config) -> tuple[Any, Any]:
        """The smallest and the largest value `key` takes in a study on top of `cfg`."""
        values = self.searched[key].args if key in self.searched else [get(cfg, key)]
        return min(values), max(values)

    def widest_holes(self, cfg: Config) -> Config:
        """`cfg` with the smallest hole min_size and the largest max_size of the study."""
        lowest, highest = self.bounds("masks.min_size", cfg)[0], self.bounds("masks.max_size", cfg)[1]
        return with_values(cfg, {"masks.min_size": lowest, "masks.max_size": highest})


def load_space(path: str | os.PathLike) -> Space:
    """Read a search-space file; a UserError names the first bad key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space not found: {path}; pass a YAML file (see tune_spaces/)")
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"search space {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(entries, dict):
        raise UserError(
            f"search space {path} must map config keys to values, e.g. model.mixer_depth: {{randint: [1, 8]}}"
        )
    samples = entries.pop("samples", None)
    if isinstance(samples, bool) or not isinstance(samples, int | None) or (samples is not None and samples < 1):
        raise UserError(f"{path}: samples must be a positive integer, got {samples!r}")
    early_stopping = entries.pop("early_stopping", True)
    if not isinstance(early_stopping, bool):
        raise UserError(f"{path}: early_stopping must be true or false, got {early_stopping!r}")
    searched, fixed = {}, {}
    for key, value in entries.items():
        key = str(key)
        if key not in CONFIG_KEYS:
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see inpaint/config.py for the keys"
            raise UserError(f"{path}: unknown config key {key!r}; {hint}")
        if not isinstance(value, dict):
            fixed[key] = value
            continue
        if key.startswith(NOT_SEARCHABLE):
            raise UserError(f"{path}: {key} cannot be searched (one value per study): give it a plain value")
        searched[key] = parse_search(f"{path}: {key}", value)
    if not searched:
        raise UserError(f"{path} searches nothing: give at least one key a primitive, e.g. {{choice: [3, 5]}}")
    return Space(path, searched, fixed, samples, early_stopping)


def parse_search(where: str, value: dict) -> Search:
    """One `{primitive: args}` mapping; `where` (file and key) starts every error."""
    if len(value) != 1:
        raise UserError(f"{where} must be a plain value or one of {', '.join(PRIMITIVES)}, got {value}")
    ((primitive, args),) = value.items()
    if primitive not in PRIMITIVES:
        raise UserError(f"{where}: unknown primitive {primitive!r}; use one of {', '.join(PRIMITIVES)}")
    if not isinstance(args, list) or not args:
        raise UserError(f"{where}: {primitive} needs a non-empty list, got {args!r}")
    if primitive not in RANGES:
        return Search(primitive, args)
    if len(args) != 2:
        raise UserError(f"{where}: {primitive} needs [lo, hi], got {args!r}")
    if primitive == "randint":
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            raise UserError(f"{where}: randint needs integers [lo, hi], got {args!r}")
        lo, hi = args
    else:
        try:  # floats, as Tune samples them (YAML reads 1e-4, without a dot, as a string)
            lo, hi = (float(a) for a in args)
        except (TypeError, ValueError):
            raise UserError(f"{where}: {primitive} needs numbers [lo, hi], got {args!r}") from None
    if lo >= hi:
        raise UserError(f"{where}: empty range [{lo}, {hi}]: lo must be below hi (a plain value fixes the key)")
    if primitive == "loguniform" and lo <= 0:
        raise UserError(f"{where}: loguniform needs 0 < lo, got {lo}")
    return Search(primitive, [lo, hi])


def check_space(space: Space, cfg: Config) -> None:
    """Refuse a space that cannot train on top of `cfg`, naming the key: every choice and both ends of
    every range must be valid config values, and every hole min_size at most every max_size."""
    for key, search in space.searched.items():
        for value in search.args:
            try:  # on holes that fit any value, so that only the value itself can fail
                with_values(cfg, {**ANY_HOLES, key: value})
            except UserError as err:
                raise UserError(f"{space.path}: {key} = {value!r} cannot train: {err}") from None
    _, highest_min = space.bounds("masks.min_size", cfg)
    lowest_max, _ = space.bounds("masks.max_size", cfg)
    if highest_min > lowest_max:
        raise UserError(
            f"{space.path}: masks.min_size reaches {highest_min} but masks.max_size goes down to {lowest_max}: "
            "keep every min_size at most every max_size, e.g. {randint: [4, 8]} and {randint: [8, 16]}"
        )


def as_overrides(values: Mapping[str, Any]) -> list[str]:
    """`key=value` config overrides (JSON is YAML, which the config reads values as)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def with_values(cfg: Config, values: Mapping[str, Any]) -> Config:
    """A copy of `cfg` with these `key: value`s, checked."""
    return load_config(None, as_overrides(values), base=cfg.to_dict())


# ---------------------------------------------------------------------------------------------
# A trial: what Tune runs, once per sampled config


@dataclass
class Study:
    """What every trial of a study shares (Tune puts it in the object store once)."""

    name: str
    cfg: Config  # each trial's searched values go on top of it
    data: str  # the prepared dataset
    datasets: dict[str, ray.data.Dataset]  # read once for all trials
    tracking_uri: str
    parent_run_id: str


def run_trial(values: dict[str, Any], study: Study) -> None:
    """Fit the training job's TorchTrainer on the searched `values`; every epoch reaches Tune and MLflow."""
    trial_id = tune.get_context().get_trial_id()
    cfg = with_values(study.cfg, values)
    run_name = f"{study.name}-{trial_id}"  # stable across restarts: the TorchTrainer resumes its checkpoints
    run_id = open_child_run(study, cfg, trial_id, run_name)
    print(f"trial {trial_id}: {values}  MLflow run {run_id}", flush=True)
    trainer = make_trainer(
        cfg,
        study.data,
        run_name,
        run_id,
        study.tracking_uri,
        datasets=study.datasets,
        callbacks=[TuneReportCallback()],
        reserved_cpus=TRIAL_CPU,
    )
    trainer.fit()
    # A trial that ASHA stops or that fails never gets here (Tune ends its actor mid-fit, or retries
    # it): the study's driver closes its run, knowing from Tune how the trial ended.
    tracking.end_run(run_id, "FINISHED", tracking_uri=study.tracking_uri)


def open_child_run(study: Study, cfg: Config, trial_id: str, run_name: str) -> str:
    """The trial's child run: new, or the one it had before Tune restarted or resumed it."""
    client = MlflowClient(study.tracking_uri)
    earlier = client.search_runs(
        [client.get_run(study.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{study.parent_run_id}' and tags.{TRIAL_TAG} = '{trial_id}'",
    )
    return tracking.start_run(
        study.tracking_uri,
        cfg.tracking.experiment,
        run_name,
        cfg.to_dict(),
        tags={TRIAL_TAG: trial_id},
        parent_run_id=study.parent_run_id,
        run_id=earlier[0].info.run_id if earlier else None,
    )


# ---------------------------------------------------------------------------------------------
# The study: what `jobs/tune.py` runs


@dataclass
class TrialOutcome:
    """One trial as Tune saw it: its searched values and its reports, one per epoch."""

    trial_id: str
    values: dict[str, Any]
    epochs: list[dict[str, Any]]  # the reported metrics, in epoch order
    failed: bool

    @classmethod
    def from_result(cls, result: tune.Result) -> TrialOutcome:
        reports = result.metrics_dataframe.sort_values("epoch").drop_duplicates("epoch", keep="last")
        return cls(result.metrics["trial_id"], result.config, reports.to_dict("records"), result.error is not None)

    @property
    def epochs_run(self) -> int:
        return int(self.epochs[-1]["epoch"])

    def stopped_early(self, epochs: int) -> bool:
        """Whether ASHA stopped it before its last epoch."""
        return not self.failed and self.epochs_run < epochs

    def best_epoch(self, metric: str) -> dict[str, Any]:
        sign = 1 if metric_mode(metric) == "max" else -1
        return max(self.epochs, key=lambda report: sign * report[metric])


@dataclass
class StudyResult:
    name: str
    parent_run_id: str
    best_run_id: str
    best_trial_id: str
    best_config: dict[str, Any]  # the best trial's searched values
    metrics: dict[str, float]  # the validation metrics of its best epoch
    model_uri: str  # models:/NAME@best
    table: str  # every trial, best first (markdown)


def trials_at_once(cfg: Config) -> int:
    """Trials the cluster holds side by side: each takes its workers' CPUs (its actor's sliver included)."""
    check_cluster_fits(cfg)  # not even one trial: a study would sit PENDING forever
    return int(ray.cluster_resources()["CPU"] // (cfg.scaling.workers * cfg.scaling.cpus_per_worker))


def run_study(space: Space, cfg: Config, *, samples: int, resume: bool = False) -> StudyResult:
    """Run (or, with `resume`, go on with) the study of `space` on top of `cfg`.

    The study is named `tracking.run_name`, else `tune-<space file name>`: its Tune state lives in
    `<scaling.storage_path>/<name>` and its parent MLflow run carries the name, which is how `resume`
    finds both; a resumed study keeps its config and its trials, and finished trials do not run again.
    """
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking(tracking_uri)
    name = cfg.tracking.run_name or f"tune-{space.name}"
    if resume:
        parent_run_id, saved = tracking.find_run(tracking_uri, cfg.tracking.experiment, name)
        if MlflowClient(tracking_uri).get_run(parent_run_id).info.status == "FINISHED":
            raise UserError(f"study {name!r} has finished: nothing to resume (drop --resume to start it again)")
        cfg = load_config(None, None, base=saved)
    check_space(space, cfg)
    data = os.path.abspath(prepare_data(cfg))
    check_holes_fit(space.widest_holes(cfg), data)
    storage = cfg.scaling.storage_path
    if "://" not in storage:
        storage = os.path.abspath(storage)
    folder = f"{storage.rstrip('/')}/{name}"
    if resume and not tune.Tuner.can_restore(folder):
        raise UserError(f"no Tune state of study {name!r} in {folder}: nothing to resume")
    connect_ray(cfg.scaling.address)
    at_once = trials_at_once(cfg)
    if resume:
        tracking.start_run(tracking_uri, cfg.tracking.experiment, name, {}, run_id=parent_run_id)  # RUNNING again
    else:
        parent_run_id = open_parent_run(space, cfg, samples, name, tracking_uri)
    print(
        f"study {name}: {at_once} trial(s) at a time, {cfg.scaling.workers} worker(s) each; "
        f"MLflow run {parent_run_id} at {tracking_uri}",
        flush=True,
    )
    study = Study(
        name,
        with_values(cfg, {"scaling.storage_path": folder}),  # trials' checkpoints go beside Tune's
        data,
        read_datasets(cfg, data),
        tracking_uri,
        parent_run_id,
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, study=study), {"CPU": TRIAL_CPU})
    if resume:
        tuner = tune.Tuner.restore(folder, trainable, resume_errored=True)
    else:
        tuner = new_tuner(trainable, space, cfg, samples=samples, at_once=at_once, name=name, storage=storage)
    try:
        results, interrupted = fit_until_ctrl_c(tuner)
    except BaseException:  # a second Ctrl-C
        close_child_runs(study, {}, cfg.train.epochs, interrupted=True)
        tracking.end_run(parent_run_id, "KILLED", tracking_uri=tracking_uri)
        raise
    outcomes = {
        result.metrics["trial_id"]: TrialOutcome.from_result(result)
        for result in results
        if result.metrics_dataframe is not None and len(result.metrics_dataframe)  # reported an epoch
    }
    if interrupted:
        close_child_runs(study, outcomes, cfg.train.epochs, interrupted=True)
        tracking.end_run(parent_run_id, "KILLED", tracking_uri=tracking_uri)
        raise KeyboardInterrupt
    children = close_child_runs(study, outcomes, cfg.train.epochs)
    if not outcomes:
        tracking.end_run(parent_run_id, "FAILED", tracking_uri=tracking_uri)
        raise results.errors[0]
    return finish_study(study, list(outcomes.values()), children, list(space.searched))


def new_tuner(
    trainable: Any, space: Space, cfg: Config, *, samples: int, at_once: int, name: str, storage: str
) -> tune.Tuner:
    """A study of `samples` samples of `space`, `at_once` trials side by side, ASHA on `train.best_metric`."""
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=cfg.train.best_metric,
            mode=metric_mode(cfg.train.best_metric),
            scheduler=ASHAScheduler(
                time_attr="epoch",
                max_t=cfg.train.epochs,
                grace_period=1,  # every trial trains an epoch, then only the better ones go on
                stop_last_trials=False,  # a trial that trained every epoch ends by itself, cleanly
            )
            if space.early_stopping
            else None,  # FIFO: every trial runs to the end
            num_samples=samples,
            max_concurrent_trials=at_once,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES)
        ),
    )


def fit_until_ctrl_c(tuner: tune.Tuner) -> tuple[tune.ResultGrid, bool]:
    """`tuner.fit()`, and whether Ctrl-C stopped it: Tune then saves its state, ends the trials and
    returns as if the study were over (the trials it never started look TERMINATED)."""
    interrupted = threading.Event()

    def on_ctrl_c(signum, frame):
        interrupted.set()
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C stops at once
        signal.raise_signal(signal.SIGUSR1)  # Tune's own signal to stop a study, as its Ctrl-C handler does

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # the first Ctrl-C comes here
    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        return tuner.fit(), interrupted.is_set()
    finally:
        signal.signal(signal.SIGINT, previous)


def open_parent_run(space: Space, cfg: Config, samples: int, name: str, tracking_uri: str) -> str:
    """The study's run: the config its trials share as params (the searched keys left out, as it is
    saved for `resume`), the space as `search.*` params and as a file, and `samples`."""
    shared = copy.deepcopy(cfg.to_dict())
    for key in space.searched:
        *sections, leaf = key.split(".")
        del functools.reduce(dict.__getitem__, sections, shared)[leaf]
    run_id = tracking.start_run(tracking_uri, cfg.tracking.experiment, name, shared, tags={"space": str(space.path)})
    client = MlflowClient(tracking_uri)
    searched = [Param(f"search.{key}", str(search)) for key, search in space.searched.items()]
    study = [Param("samples", str(samples)), Param("early_stopping", str(space.early_stopping).lower())]
    client.log_batch(run_id, params=[*searched, *study])
    client.log_artifact(run_id, str(space.path))
    return run_id


def close_child_runs(
    study: Study, outcomes: Mapping[str, TrialOutcome], epochs: int, *, interrupted: bool = False
) -> dict[str, str]:
    """Close the child runs the trials left open and tag each with whether ASHA stopped its trial;
    returns trial id → run id.

    Only a trial that trains every epoch ends its own run. A run left RUNNING (or KILLED by an earlier
    interrupt) ends FINISHED if its trial was stopped by ASHA, which ends the trial's actor mid-fit,
    maybe between its last report and that epoch's MLflow metrics (its checkpoint holds them), or a
    little later: the epoch under way may still reach MLflow, though the study never sees it; and
    FAILED if its trial failed. An `interrupted` study's RUNNING runs are KILLED, untagged: their
    trials go on when the study resumes.
    """
    client = MlflowClient(study.tracking_uri)
    runs = client.search_runs(
        [client.get_run(study.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{study.parent_run_id}'",
    )
    children = {}
    for run in runs:
        trial_id, run_id = run.data.tags[TRIAL_TAG], run.info.run_id
        children[trial_id] = run_id
        outcome = outcomes.get(trial_id)
        if run.info.status == "RUNNING" or (run.info.status == "KILLED" and not interrupted):
            if outcome:
                with ray.train.Checkpoint(outcome.epochs[-1][CHECKPOINT_PATH_KEY]).as_directory() as path:
                    state = load_checkpoint_state(path)
                tracking.log_metrics_once(
                    run_id, state["metrics"], step=state["epoch"], tracking_uri=study.tracking_uri
                )
            status = "KILLED" if interrupted else "FINISHED" if outcome and not outcome.failed else "FAILED"
            tracking.end_run(run_id, status, tracking_uri=study.tracking_uri)
        if not interrupted:
            client.set_tag(run_id, "stopped_early", str(stopped_early(client, run_id, outcome, epochs)).lower())
    return children


def stopped_early(client: MlflowClient, run_id: str, outcome: TrialOutcome | None, epochs: int) -> bool:
    """Whether ASHA stopped the trial: from Tune's record of it, else (a trial this driver never saw
    report, as after the driver was killed) from the epochs its run logged."""
    if outcome:
        return outcome.stopped_early(epochs)
    run = client.get_run(run_id)
    logged = client.get_metric_history(run_id, "val_loss")
    return run.info.status != "FAILED" and max((m.step for m in logged), default=0) < epochs


def finish_study(study: Study, outcomes: list[TrialOutcome], children: dict[str, str], keys: list[str]) -> StudyResult:
    """Register the best trial's best epoch as `models:/NAME@best`; log the results table, the picture
    and the best trial's metrics to the parent run, and end it."""
    metric, epochs, uri = study.cfg.train.best_metric, study.cfg.train.epochs, study.tracking_uri
    sign = 1 if metric_mode(metric) == "max" else -1
    outcomes = sorted(outcomes, key=lambda outcome: -sign * outcome.best_epoch(metric)[metric])
    best = outcomes[0]
    report = best.best_epoch(metric)
    best_run_id = children[best.trial_id]
    best_cfg = with_values(study.cfg, best.values)
    version_uri, _ = log_checkpoint_model(
        best_cfg, ray.train.Checkpoint(report[CHECKPOINT_PATH_KEY]), best_run_id, study.data, uri
    )
    model, version = version_uri.removeprefix("models:/").rsplit("/", 1)
    tracking.set_alias(model, BEST_ALIAS, version, tracking_uri=uri)
    model_uri = f"models:/{model}@{BEST_ALIAS}"

    table = results_table(outcomes, keys, metric, epochs)
    val_metrics = {key: float(value) for key, value in report.items() if key.startswith("val_")}
    client = MlflowClient(uri)
    client.log_text(study.parent_run_id, table + "\n", "results.md")
    picture = trials_picture(outcomes, metric, f"{study.name}: {metric} per trial")
    tracking.log_picture(study.parent_run_id, picture, "trials.png", tracking_uri=uri)
    for key, value in {"best_run_id": best_run_id, "best_trial_id": best.trial_id, "best_model": model_uri}.items():
        client.set_tag(study.parent_run_id, key, value)
    tracking.log_metrics(study.parent_run_id, val_metrics, step=int(report["epoch"]), tracking_uri=uri)
    tracking.end_run(study.parent_run_id, "FINISHED", tracking_uri=uri)
    return StudyResult(
        study.name, study.parent_run_id, best_run_id, best.trial_id, best.values, val_metrics, model_uri, table
    )


def results_table(outcomes: list[TrialOutcome], keys: list[str], metric: str, epochs: int) -> str:
    """A markdown table, a row per trial: its searched values, epochs run and its best epoch's metrics."""
    header = ["trial", *keys, "epochs", *TABLE_METRICS]
    rows = []
    for outcome in outcomes:
        report = outcome.best_epoch(metric)
        status = " failed" if outcome.failed else " stopped" if outcome.stopped_early(epochs) else ""
        values = (f"{value:.3g}" if isinstance(value, float) else str(value) for value in map(outcome.values.get, keys))
        metrics = (f"{report[name]:.4f}" for name in TABLE_METRICS)
        rows.append([outcome.trial_id, *values, f"{outcome.epochs_run}/{epochs}{status}", *metrics])
    widths = [max(map(len, column)) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join("| " + " | ".join(map(str.ljust, line, widths)) + " |" for line in lines)


def trials_picture(outcomes: list[TrialOutcome], metric: str, title: str) -> np.ndarray:
    """`metric` over epochs, a line per trial, as one (H, W, 3) uint8 picture."""
    figure = Figure(figsize=(6.4, 4.0), dpi=100)  # no pyplot: no global state, no display
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots()
    for outcome in outcomes:
        epochs, values = zip(*((report["epoch"], report[metric]) for report in outcome.epochs), strict=True)
        axes.plot(epochs, values, marker="o", markersize=3, label=outcome.trial_id)
    axes.set(title=title, xlabel="epoch", ylabel=metric)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small")
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
