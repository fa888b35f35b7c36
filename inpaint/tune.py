"""Hyperparameter studies with Ray Tune over the training job, tracked as one MLflow run tree.

    space = load_space("tune_spaces/quick.yaml")
    cfg = load_config(None, values={**space.fixed, "data.path": "DIR"})
    result = run_study(space, cfg, samples=6)

The driver (this process) checks the space (`inpaint.spaces`), prepares and reads the data once and
opens the study's parent MLflow run. Tune then calls `run_trial` once per sampled config, in an actor
holding a sliver of a CPU: the trial opens its child run and fits the training job's TorchTrainer,
whose rank-0 worker logs every epoch to that run and whose reports reach Tune (TuneReportCallback), so
that ASHA stops weak trials early. `ChildRunCallback` ends each child run as Tune ends its trial. At
the end the driver registers the best trial's best epoch with the alias `best` (from Tune's
`ResultGrid` and Ray Train's checkpoints) and logs a results table and a figure to the parent.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import pickle
import signal
import threading
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from inpaint import runtime, storage, tracking
from inpaint.config import Config, load_config, with_values
from inpaint.driver import (
    check_cluster_fits,
    check_data,
    connect_ray,
    log_checkpoint_model,
    make_trainer,
    prepare_data,
    read_datasets,
    resume_command,
    storage_path,
    tag_data_rows,
    with_image_size,
)
from inpaint.errors import RunFailed, RunStopped, UserError
from inpaint.metrics import metric_mode
from inpaint.spaces import Space, check_space
from inpaint.study_results import importances_table, parameter_importances, results_table, trial_reports, trials_figure
from inpaint.train import EPOCH_METRICS

TRIAL_CPU = 0.01  # a trial's own actor only waits on its TorchTrainer, but Ray needs it to hold something
TRIAL_RETRIES = 1  # a trial whose actor died starts again once; its TorchTrainer resumes from its checkpoint
TRIAL_TAG = "tune_trial_id"
BEST_ALIAS = "best"


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

    def trial_run_name(self, trial_id: str) -> str:
        """The trial's TorchTrainer run (under `cfg.scaling.storage_path`) and MLflow child run: stable across
        restarts, so a restarted trial resumes its checkpoints and its run."""
        return f"{self.name}-{trial_id}"

    def child_runs(self, status: str | None = None) -> dict[str, str]:
        return child_runs(self.tracking_uri, self.parent_run_id, status)


def child_runs(tracking_uri: str, parent_run_id: str, status: str | None = None) -> dict[str, str]:
    """Trial id → MLflow child run id, of the runs in `status` if given."""
    return tracking.child_runs(parent_run_id, TRIAL_TAG, status, tracking_uri=tracking_uri)


def run_trial(values: dict[str, Any], study: Study) -> None:
    """Fit the training job's TorchTrainer on the searched `values`; every epoch reaches Tune and MLflow."""
    trial_id = tune.get_context().get_trial_id()
    cfg = with_values(study.cfg, values)
    run_name = study.trial_run_name(trial_id)
    finished = trial_id in study.child_runs("FINISHED")  # Tune ended it (ChildRunCallback), maybe ASHA stopped it
    run_id = tracking.start_run(
        study.tracking_uri, cfg.tracking.experiment, run_name, cfg.to_dict(),
        tags={TRIAL_TAG: trial_id}, parent_run_id=study.parent_run_id,
        run_id=study.child_runs().get(trial_id),  # the run it had before Tune restarted or resumed it
    )  # fmt: skip
    if (last := last_report(cfg, run_name)) and (finished or last["epoch"] >= cfg.train.epochs):
        # run again by a Tune restored from an older state, which has an older report of it or none, and a
        # TorchTrainer would train on (ASHA's rungs are lost) or, with no epoch left, report nothing
        print(f"trial {trial_id} had finished: its last report goes to Tune again", flush=True)
        tune.report(last)
        return
    print(f"trial {trial_id}: {values}  MLflow run {run_id}", flush=True)
    trainer = make_trainer(
        cfg, study.data, run_name, run_id, study.tracking_uri, study.datasets,
        callbacks=[TuneReportCallback()], reserved_cpus=TRIAL_CPU,
    )  # fmt: skip
    trainer.fit()  # ChildRunCallback ends the run when Tune ends the trial


def last_report(cfg: Config, run_name: str) -> dict[str, Any] | None:
    """What the run's TorchTrainer last reported with a checkpoint (as TuneReportCallback passes it to Tune), if any."""
    try:
        return ray.train.Result.from_path(f"{storage_path(cfg)}/{run_name}").metrics or None
    except RuntimeError:  # Ray Train's words for "no such run" and "no checkpoint snapshot in it yet"
        return None


class ChildRunCallback(tune.Callback):
    """Ends each trial's MLflow child run as Tune ends the trial, tagged `stopped_early` when ASHA stopped it.

    ASHA ends a trial's actor mid-fit, maybe between its last report and that epoch's MLflow metrics:
    the report (Tune's `last_result`) fills them in. The epoch under way may still reach MLflow."""

    def __init__(self, tracking_uri: str, parent_run_id: str, epochs: int) -> None:
        # plain values: Tune pickles its callbacks with the study's state, and a resumed study gets them back
        self.tracking_uri, self.parent_run_id, self.epochs = tracking_uri, parent_run_id, epochs

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.end(trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.end(trial, failed=True)

    def end(self, trial: Trial, failed: bool) -> None:
        run_id = child_runs(self.tracking_uri, self.parent_run_id).get(trial.trial_id)
        if run_id is None:  # failed before opening its run
            return
        report, uri = trial.last_result, self.tracking_uri
        if "epoch" in report:
            logged = {key: report[key] for key in EPOCH_METRICS}
            tracking.log_metrics_once(run_id, logged, step=int(report["epoch"]), tracking_uri=uri)
        stopped = not failed and report.get("epoch", 0) < self.epochs
        tracking.set_tag(run_id, "stopped_early", str(stopped).lower(), tracking_uri=uri)
        tracking.end_run(run_id, "FAILED" if failed else "FINISHED", tracking_uri=uri)


# ---------------------------------------------------------------------------------------------
# The study: what `jobs/tune.py` runs


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
    importances: dict[str, float]  # searched key → its share of the metric's variation (sums to 1; {} if unknown)


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
        if tracking.run_status(parent_run_id, tracking_uri=tracking_uri) == "FINISHED":
            raise UserError(f"study {name!r} has finished: nothing to resume (drop --resume to start it again)")
        cfg = load_config(None, base=saved)
    check_space(space, cfg)
    data = prepare_data(cfg)
    for widest in space.widest_holes(cfg):
        check_data(widest, data)
    cfg = with_image_size(cfg, data)
    storage_root = storage_path(cfg)
    folder = f"{storage_root.rstrip('/')}/{name}"
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
    datasets = read_datasets(cfg, data)
    tag_data_rows(parent_run_id, datasets, tracking_uri)
    study = Study(
        name,
        with_values(cfg, {"scaling.storage_path": folder}),  # trials' checkpoints go beside Tune's
        data,
        datasets,
        tracking_uri,
        parent_run_id,
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, study=study), {"CPU": TRIAL_CPU})
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage_root,
        failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
        callbacks=[ChildRunCallback(tracking_uri, parent_run_id, cfg.train.epochs)],
    )
    if resume:
        print(restored_summary(study, folder), flush=True)
        tuner = tune.Tuner.restore(folder, trainable, resume_errored=True)  # with its callbacks
    else:
        tuner = new_tuner(trainable, space, cfg, samples=samples, at_once=at_once, run_config=run_config)
    try:
        results, interrupted = fit_until_ctrl_c(tuner)
    except BaseException as err:  # a second Ctrl-C, or the driver itself going down
        stop_study_runs(study)
        if isinstance(err, KeyboardInterrupt):
            raise RunStopped(stopped_line(study, space)) from None
        raise
    if interrupted:
        stop_study_runs(study)
        raise RunStopped(stopped_line(study, space))
    reconcile_child_runs(study)  # those of trials a time budget or a killed driver stopped
    if all(result.metrics_dataframe is None or result.metrics_dataframe.empty for result in results):
        tracking.end_run(parent_run_id, "FAILED", tracking_uri=tracking_uri)
        if results.errors:
            raise results.errors[0]
        budget = space.time_budget_minutes
        raise RunFailed(
            f"study {name}: no trial finished an epoch before the study ended"
            + (f" (its time budget of {budget:g} minutes ran out; give it more)" if budget else "")
        )
    return finish_study(study, results, space)


def new_tuner(
    trainable: Any, space: Space, cfg: Config, *, samples: int, at_once: int, run_config: tune.RunConfig
) -> tune.Tuner:
    """A study of `samples` samples of `space`, `at_once` trials side by side, ASHA on `train.best_metric`;
    with `search: optuna`, Optuna's TPE proposes each trial from the reports of those before it. A time
    budget stops the trials under way when it runs out (a resumed study gets what was left of it)."""
    first = [space.baseline_point(cfg)] if space.baseline else None
    if space.search == "optuna":  # Tune limits a Searcher to max_concurrent_trials
        search_alg, limit = OptunaSearch(points_to_evaluate=first, seed=cfg.train.seed), at_once
    else:  # but not a variant generator: it limits itself
        search_alg, limit = BasicVariantGenerator(points_to_evaluate=first, max_concurrent=at_once), None
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=cfg.train.best_metric,
            mode=metric_mode(cfg.train.best_metric),
            search_alg=search_alg,
            scheduler=asha(space, cfg),
            num_samples=samples,
            max_concurrent_trials=limit,
            time_budget_s=space.time_budget_minutes * 60 if space.time_budget_minutes else None,
        ),
        run_config=run_config,
    )


def asha(space: Space, cfg: Config) -> ASHAScheduler | None:
    """ASHA on the space's clock (`Space.asha_rungs`): at equal epochs, or at equal training minutes, where a
    trial twice as slow is judged at half the epochs; None (FIFO: every trial runs to the end) without
    early stopping."""
    if not space.early_stopping:
        return None
    clock, first_rung, last_rung = space.asha_rungs(cfg.train.epochs)
    return ASHAScheduler(
        time_attr=clock,
        max_t=last_rung,
        grace_period=first_rung,  # every trial trains this long, then only the better ones go on
        stop_last_trials=False,  # a trial that trained every epoch ends by itself, cleanly
    )


def fit_until_ctrl_c(tuner: tune.Tuner) -> tuple[tune.ResultGrid, bool]:
    """`tuner.fit()`, and whether Ctrl-C stopped it: Tune then saves its state, ends the trials and
    returns as if the study were over (the trials it never started look TERMINATED). Tune's own
    Ctrl-C handler is off (`runtime.configure_process`)."""
    interrupted = threading.Event()

    def stop_study() -> None:
        interrupted.set()
        signal.raise_signal(signal.SIGUSR1)  # Tune's own signal to stop a study, as its Ctrl-C handler does

    with runtime.first_ctrl_c_calls(stop_study):
        return tuner.fit(), interrupted.is_set()


def open_parent_run(space: Space, cfg: Config, samples: int, name: str, tracking_uri: str) -> str:
    """The study's run: the config its trials share as params (the searched keys left out, as it is
    saved for `resume`), the space as `search.*` params and as a file, and `samples`."""
    shared = copy.deepcopy(cfg.to_dict())
    for key in space.searched:
        *sections, leaf = key.split(".")
        del functools.reduce(dict.__getitem__, sections, shared)[leaf]
    run_id = tracking.start_run(tracking_uri, cfg.tracking.experiment, name, shared, tags={"space": str(space.path)})
    searched = {f"search.{key}": search for key, search in space.searched.items()}
    study = {"samples": samples, "search": space.search, "early_stopping": str(space.early_stopping).lower()}
    study |= {"time_budget_minutes": space.time_budget_minutes} if space.time_budget_minutes else {}
    study |= {"asha_time_attr": space.asha_time_attr}
    study |= {"asha_grace_minutes": space.asha_grace_minutes} if space.asha_grace_minutes else {}
    study |= {"baseline": str(space.baseline).lower()}
    tracking.log_params(run_id, searched | study, tracking_uri=tracking_uri)
    tracking.log_file(run_id, str(space.path), tracking_uri=tracking_uri)
    return run_id


def saved_state(folder: str) -> tuple[dict[str, str], list[Any] | None]:
    """Trial id → Tune status in the newest Tune state of the study in `folder`, and its Optuna study's FrozenTrials
    (None for a random search): what `Tuner.restore` reads. Tune writes both together, 10 s or more apart."""
    fs, path = storage.filesystem(folder)
    names = [info.base_name for info in fs.get_file_info(pafs.FileSelector(path))]

    def newest(pattern: str) -> bytes | None:
        matching = fnmatch.filter(names, pattern)
        return fs.open_input_stream(f"{path}/{max(matching)}").readall() if matching else None

    trials = json.loads(newest("experiment_state-*.json"))["trial_data"]
    statuses = {state["trial_id"]: state["status"] for state in (json.loads(trial) for trial, _ in trials)}
    searcher = newest("searcher-state-*.pkl")  # OptunaSearch pickles its attributes, its Optuna study among them
    return statuses, pickle.loads(searcher)["_ot_study"].trials if searcher else None


def restored_summary(study: Study, folder: str) -> str:
    """What `--resume` goes on from; trials that finished after Tune's last save have their runs FINISHED."""
    statuses, optuna_trials = saved_state(folder)
    finished = [trial for trial, status in statuses.items() if status == Trial.TERMINATED]
    late = [trial for trial in study.child_runs("FINISHED") if trial in statuses and trial not in finished]
    line = (
        f"restored study {study.name}: {len(finished)} trial(s) finished, {len(statuses) - len(finished)} go on "
        f"({len(late)} of them finished after Tune's last save: their last reports go to Tune again)"
    )
    told = sum(trial.state.name == "COMPLETE" for trial in optuna_trials or [])
    return line + (f"; Optuna knows {told} finished trial(s)" if optuna_trials is not None else "")


def stop_study_runs(study: Study) -> None:
    """An interrupted study's runs: the parent and the child runs still RUNNING end KILLED until it resumes;
    Ray is left, so that no forwarded worker line follows the job's last one."""
    ray.shutdown()
    for run_id in study.child_runs("RUNNING").values():
        tracking.end_run(run_id, "KILLED", tracking_uri=study.tracking_uri)
    tracking.end_run(study.parent_run_id, "KILLED", tracking_uri=study.tracking_uri)


def stopped_line(study: Study, space: Space) -> str:
    """What a Ctrl-C left: the study, its trials finished and under way, and the command that goes on."""
    finished, killed = len(study.child_runs("FINISHED")), len(study.child_runs("KILLED"))
    args = ["--space", str(space.path), "--resume"]
    args += ["--set", f"tracking.run_name={study.cfg.tracking.run_name}"] if study.cfg.tracking.run_name else []
    return (
        f"study {study.name} with {finished} trial(s) finished and {killed} under way; it is KILLED in MLflow; "
        f"go on with: {resume_command('jobs/tune.py', study.cfg, *args)}"
    )


def reconcile_child_runs(study: Study) -> None:
    """The child runs no `ChildRunCallback` ended: FINISHED, `stopped_early` from the epochs their run logged.
    Those of trials the time budget stopped (Tune calls no callback then), and, in a resumed study, those
    whose trials ended under the driver that was killed or were KILLED by an interrupt and never went on."""
    for status in ("RUNNING", "KILLED"):
        for run_id in study.child_runs(status).values():
            logged = max(tracking.logged_steps(run_id, "val_loss", tracking_uri=study.tracking_uri), default=0)
            stopped = str(logged < study.cfg.train.epochs).lower()
            tracking.set_tag(run_id, "stopped_early", stopped, tracking_uri=study.tracking_uri)
            tracking.end_run(run_id, "FINISHED", tracking_uri=study.tracking_uri)


def finish_study(study: Study, results: tune.ResultGrid, space: Space) -> StudyResult:
    """Register the best trial's best epoch as `models:/NAME@best`; log the results table, the parameter
    importances, the figure and the best trial's metrics to the parent run, and end it."""
    metric, uri = study.cfg.train.best_metric, study.tracking_uri
    mode = metric_mode(metric)
    best = results.get_best_result(metric, mode, scope="all")  # the trial whose best epoch is best
    trial_id = best.metrics["trial_id"]
    # Tune holds the trials' reports; the checkpoints are Ray Train's, in each trial's own run folder.
    trial_run = ray.train.Result.from_path(f"{study.cfg.scaling.storage_path}/{study.trial_run_name(trial_id)}")
    best_run_id = study.child_runs()[trial_id]
    best_cfg = with_values(study.cfg, best.config)
    version_uri, state = log_checkpoint_model(
        best_cfg, trial_run.get_best_checkpoint(metric, mode), best_run_id, study.data, uri
    )
    model, version = version_uri.removeprefix("models:/").rsplit("/", 1)
    tracking.set_alias(model, BEST_ALIAS, version, tracking_uri=uri)
    model_uri = f"models:/{model}@{BEST_ALIAS}"

    reports = trial_reports(results)
    baseline = space.baseline_point(study.cfg) if space.baseline else None
    table = results_table(reports, list(space.searched), metric, study.cfg.train.epochs, baseline)
    importances = parameter_importances(space, reports, metric)
    val_metrics = {key: float(value) for key, value in state["metrics"].items() if key.startswith("val_")}
    tracking.log_text(study.parent_run_id, table + "\n", "results.md", tracking_uri=uri)
    if importances:
        importances_md = importances_table(importances, metric) + "\n"
        tracking.log_text(study.parent_run_id, importances_md, "importances.md", tracking_uri=uri)
        shares = {f"importance.{key}": share for key, share in importances.items()}
        tracking.log_metrics(study.parent_run_id, shares, step=0, tracking_uri=uri)
    figure = trials_figure(reports, metric, f"{study.name}: {metric} per trial")
    tracking.log_picture(study.parent_run_id, figure, "trials.png", tracking_uri=uri)
    for key, value in {"best_run_id": best_run_id, "best_trial_id": trial_id, "best_model": model_uri}.items():
        tracking.set_tag(study.parent_run_id, key, value, tracking_uri=uri)
    # the best trial's figures, as plain `val_*` and as the `best_*` columns every run carries (`metrics.best_so_far`)
    best_columns = {"best_epoch": float(state["epoch"])} | {f"best_{key}": value for key, value in val_metrics.items()}
    tracking.log_metrics(study.parent_run_id, val_metrics | best_columns, step=int(state["epoch"]), tracking_uri=uri)
    tracking.end_run(study.parent_run_id, "FINISHED", tracking_uri=uri)
    return StudyResult(
        study.name, study.parent_run_id, best_run_id, trial_id, best.config, val_metrics, model_uri, table, importances
    )
