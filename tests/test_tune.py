"""Tune studies: search-space files (fast, no Ray), then real studies run as a user runs them,
`python jobs/tune.py ...`, with their own local Ray and a real MLflow SQLite store."""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import REPO, SMALL_MODEL, finish, metric_steps, run_job
from mlflow import MlflowClient
from ray.tune.experiment import Trial

from inpaint.config import load_config
from inpaint.errors import UserError
from inpaint.spaces import Search, Space, check_space, load_space
from inpaint.study_results import TrialReports, parameter_importances
from inpaint.tune import asha, saved_state

# Small networks for 2 epochs, three trials. The third barely learns (lr 1e-7): whichever of the
# first two reports first, its first epoch falls below ASHA's cutoff, so it is stopped early.
FIXED = "\n".join(f"{key}: {value}" for key, value in (setting.split("=", 1) for setting in SMALL_MODEL))
STUDY_SPACE = f"train.epochs: 2\n{FIXED}\ntrain.lr: {{grid: [3.0e-3, 1.0e-3, 1.0e-7]}}\n"
OPTUNA_SPACE = f"search: optuna\ntrain.epochs: 2\n{FIXED}\ntrain.lr: {{loguniform: [1.0e-4, 3.0e-3]}}\n"


MINUTES = "model.fusion: {choice: [add]}\nasha_time_attr: minutes\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Search-space files


def test_space_file_reads_searched_and_fixed_keys(tmp_path):
    space = load_space(
        write(
            tmp_path,
            "samples: 5\nmodel.mixer_depth: {randint: [1, 8]}\nmodel.fusion: {choice: [concat, add]}\n"
            "train.lr: {loguniform: [1e-4, 1e-2]}\nmasks.min_size: {grid: [4, 6]}\n"
            "train.epochs: 3\nmodel.widths: [8, 16, 32]\ntime_budget_minutes: 90\nbaseline: true\n",
        )
    )
    assert space.samples == 5 and space.name == "space" and space.early_stopping and space.search == "random"
    assert space.time_budget_minutes == 90 and space.baseline
    assert space.baseline_point(load_config(None)) == {
        "model.mixer_depth": 2, "model.fusion": "concat", "train.lr": 2e-3, "masks.min_size": 8
    }  # fmt: skip
    assert space.fixed == {"train.epochs": 3, "model.widths": [8, 16, 32]}
    assert space.searched["train.lr"].args == [1e-4, 1e-2]  # YAML reads 1e-4 as a string
    domains = space.param_space()
    assert (domains["model.mixer_depth"].lower, domains["model.mixer_depth"].upper) == (1, 9)  # 8 included
    assert domains["model.fusion"].categories == ["concat", "add"]
    assert domains["masks.min_size"] == {"grid_search": [4, 6]}
    assert str(space.searched["model.fusion"]) == '{choice: ["concat", "add"]}'


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "model.mixer_dept: {randint: [1, 8]}",
            "unknown config key 'model.mixer_dept'; did you mean 'model.mixer_depth'",
        ),
        ("model.mixer_depth: {randit: [1, 8]}", "model.mixer_depth: unknown primitive 'randit'"),
        ("model.mixer_depth: {randint: [8, 8]}", "model.mixer_depth: empty range [8, 8]"),
        ("train.lr: {uniform: [0.1, 0.01]}", "train.lr: empty range [0.1, 0.01]"),
        ("model.fusion: {choice: []}", "model.fusion: choice needs a non-empty list"),
        ("model.mixer_depth: {randint: [1.5, 4]}", "model.mixer_depth: randint needs integers"),
        ("train.lr: {loguniform: [0, 0.1]}", "train.lr: loguniform needs 0 < lo"),
        ("model.fusion: {choice: [add], grid: [concat]}", "model.fusion must be a plain value or one of"),
        ("train.epochs: {choice: [1, 2]}", "train.epochs cannot be searched"),
        ("data.limit: {choice: [100, 200]}", "data.limit cannot be searched"),
        ("model.fusion: {choice: [add]\ntrain.lr: 1", "is not valid YAML (line 2)"),
        ("[model.fusion]", "must map config keys to values"),
        ("samples: 0\nmodel.fusion: {choice: [add]}", "samples must be a positive integer"),
        ("early_stopping: maybe\nmodel.fusion: {choice: [add]}", "early_stopping must be true or false"),
        ("train.epochs: 2", "searches nothing"),
        ("search: tpe\nmodel.fusion: {choice: [add]}", "search must be one of random, optuna, got 'tpe'"),
        ("search: optuna\ntrain.lr: {grid: [0.1, 0.01]}", "train.lr is a grid, which Optuna cannot search"),
        ("time_budget_minutes: 0\nmodel.fusion: {choice: [add]}", "time_budget_minutes must be a positive number"),
        ("baseline: yes please\nmodel.fusion: {choice: [add]}", "baseline must be true or false"),
        ("time_budget_minutes: 1h\nmodel.fusion: {choice: [add]}", "minutes, got '1h'"),
        ("asha_time_attr: hours\nmodel.fusion: {choice: [add]}", "asha_time_attr must be one of epoch, minutes"),
        ("asha_grace_minutes: 10\nmodel.fusion: {choice: [add]}", "asha_grace_minutes needs asha_time_attr: minutes"),
        (f"{MINUTES}asha_grace_minutes: 0\ntime_budget_minutes: 60", "needs asha_grace_minutes, the first rung"),
        (f"{MINUTES}asha_grace_minutes: 10", "needs a time_budget_minutes above asha_grace_minutes (10)"),
        (f"{MINUTES}asha_grace_minutes: 10\ntime_budget_minutes: 60\nearly_stopping: false", "early_stopping: false"),
    ],
)
def test_bad_space_file_is_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_space(write(tmp_path, text))


@pytest.mark.parametrize(
    "text, message",
    [
        ("model.mixer_kernel_size: {choice: [3, 4]}", "model.mixer_kernel_size = 4 cannot train"),
        ("model.mixer_depth: {uniform: [1, 4]}", "model.mixer_depth = 1.0 cannot train"),
        ("model.fusion: {choice: [add, sum]}", "model.fusion = 'sum' cannot train"),
        ("masks.min_size: {randint: [4, 12]}\nmasks.max_size: {randint: [8, 16]}", "masks.min_size reaches 12"),
        ("masks.max_size: {randint: [4, 12]}", "masks.max_size goes down to 4"),  # min_size stays 8
        ("masks.max_coverage: {uniform: [0.3, 1.0]}", "masks.max_coverage = 1.0 cannot train: masks.max_coverage"),
        ("baseline: true\ntrain.lr: {loguniform: [1.0e-4, 1.0e-3]}", "starts from train.lr = 0.002, which"),
        ("baseline: true\nmodel.fusion: {choice: [add]}", "starts from model.fusion = 'concat', which"),
    ],
)
def test_space_values_that_cannot_train_are_refused_naming_the_key(tmp_path, text, message):
    space = load_space(write(tmp_path, text))
    with pytest.raises(UserError, match=re.escape(message)):
        check_space(space, load_config(None, values=space.fixed))


def test_a_space_can_search_the_hole_family_and_its_coverage(tmp_path):
    text = "masks.kind: {choice: [random, strokes, mixed]}\nmasks.max_coverage: {uniform: [0.2, 0.5]}\n"
    space = load_space(write(tmp_path, text))
    cfg = load_config(None, values=space.fixed)
    check_space(space, cfg)
    assert space.param_space()["masks.kind"].categories == ["random", "strokes", "mixed"]
    assert [widest.masks.kind for widest in space.widest_holes(cfg)] == ["random", "strokes", "mixed"]
    overlapping = "masks.min_coverage: {uniform: [0.1, 0.4]}\nmasks.max_coverage: {uniform: [0.3, 0.6]}\n"
    with pytest.raises(UserError, match=re.escape("masks.min_coverage reaches 0.4 but masks.max_coverage goes")):
        check_space(load_space(write(tmp_path, overlapping)), cfg)


def asha_decisions(space: Space) -> list[str]:
    """ASHA's calls on a fast trial (5 minutes an epoch) and one twice as slow, as their epochs come in."""
    scheduler = asha(space, load_config(None, values=space.fixed))
    scheduler.set_search_properties("val_psnr_hole", "max")
    fast, slow = Trial("fast", stub=True), Trial("slow", stub=True)
    reports = [(fast, 1, 5.0, 14.0), (fast, 2, 10.0, 16.0), (slow, 1, 10.0, 15.0)]
    for trial in (fast, slow):
        scheduler.on_trial_add(None, trial)
    return [
        scheduler.on_trial_result(None, trial, {"epoch": epoch, "training_minutes": minutes, "val_psnr_hole": psnr})
        for trial, epoch, minutes, psnr in reports
    ]


def test_asha_judges_trials_at_equal_training_minutes_when_asked(tmp_path):
    """Rungs at 10, 40, 160 training minutes (up to the budget): the slow trial's first epoch is judged
    against what the fast one had at 10 minutes (its epoch 2), and stopped; by epochs, against the fast
    one's epoch 1, which it beats."""
    space = load_space(write(tmp_path, f"{MINUTES}asha_grace_minutes: 10\ntime_budget_minutes: 160\n"))
    assert (space.asha_time_attr, space.asha_rungs(4)) == ("minutes", ("training_minutes", 10.0, 160))
    assert asha_decisions(space) == ["CONTINUE", "CONTINUE", "STOP"]
    by_epoch = load_space(write(tmp_path, "model.fusion: {choice: [add]}\ntrain.epochs: 4\n"))
    assert by_epoch.asha_rungs(4) == ("epoch", 1, 4)
    assert asha_decisions(by_epoch) == ["CONTINUE", "CONTINUE", "CONTINUE"]


@pytest.mark.parametrize("path", sorted((REPO / "tune_spaces").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_space_file_can_train(path):
    space = load_space(path)
    command = re.search(r"--config (\S+)", path.read_text())  # the config its documented command starts from
    check_space(space, load_config(REPO / command.group(1) if command else None, values=space.fixed))


def test_bad_space_file_stops_the_job_in_one_line_before_ray_starts(tmp_path):
    space = write(tmp_path, "model.mixer_depth: {randint: [4, 1]}\n")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "tune.py"), "--space", str(space), "--data", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {space}: model.mixer_depth: empty range [4, 1]: lo must be below hi (a plain value fixes the key)"
    ]
    assert "Traceback" not in out and "Started a local Ray" not in out and time.monotonic() - started < 60


def test_a_searched_hole_family_that_does_not_fit_the_images_stops_the_study_before_ray_starts(tiny_data, tmp_path):
    """The study starts from strokes, which fit 32×32 pictures whatever max_size says, but its random squares
    of 40 px do not."""
    write(tmp_path, "masks.kind: {choice: [strokes, random]}\nmasks.max_size: 40\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--space", "space.yaml", "--data", str(tiny_data), "--set", "masks.kind=strokes"]
    proc = run_job(args, tmp_path, uri, "tune.py")
    out, _ = proc.communicate(timeout=120)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors == [
        "error: masks.max_size = 40 is larger than the 32×32 images: use at most 32"
    ], out[-2000:]
    assert "Traceback" not in out and "Started a local Ray" not in out


def test_importances_credit_the_key_that_moves_the_metric_at_the_epoch_every_trial_reached():
    space = Space(
        Path("space.yaml"),
        {"model.mixer_depth": Search("randint", [1, 8]), "train.lr": Search("uniform", [0.1, 1])},
        {},
    )
    rng = np.random.default_rng(0)
    reports = []
    for trial in range(16):
        depth, lr = int(rng.integers(1, 9)), float(rng.uniform(0.1, 1))
        # epoch 1 moves with depth; epoch 2, which only some trials reach, would credit lr instead
        epochs = pd.DataFrame(
            {"epoch": [1, 2], "val_psnr_hole": [15.0 + depth, 30.0 * lr], "time_total_s": [60.0, 120.0]}
        )
        reports.append(
            TrialReports(str(trial), {"model.mixer_depth": depth, "train.lr": lr}, epochs[: 1 + trial % 2], False)
        )
    shares = parameter_importances(space, reports, "val_psnr_hole")
    assert shares["model.mixer_depth"] > 0.9 and sum(shares.values()) == pytest.approx(1)
    assert parameter_importances(space, reports[:3], "val_psnr_hole") == {}  # too few trials to tell


# ---------------------------------------------------------------------------------------------
# Real studies


def study_args(tiny_data: Path, *extra: str) -> list[str]:
    return ["--space", "space.yaml", "--data", str(tiny_data), "--workers", "1", "--samples", "1", *extra]


@pytest.fixture(scope="module")
def study(tiny_data, tmp_path_factory) -> dict:
    """A study of 3 trials (1 worker each, 2 at a time on 2 cores), as `python jobs/tune.py` runs it."""
    root = tmp_path_factory.mktemp("study")
    write(root, STUDY_SPACE)
    uri = f"sqlite:///{root}/mlflow.db"
    started = time.monotonic()
    out = finish(run_job(study_args(tiny_data, "--json", "best.json"), root, uri, job="tune.py"), timeout=600)
    print(f"\nstudy of 3 trials: {time.monotonic() - started:.0f} s")
    return {"out": out, "uri": uri, "json": json.loads((root / "best.json").read_text())}


def assert_every_epoch_once(client: MlflowClient, run, key: str, all_of: bool) -> None:
    """The run's `key` at epochs 1, 2, ... once each: both epochs if `all_of`. A trial ASHA stops
    after epoch 1 may still log epoch 2 if it ends before its actor does (tiny data: an epoch is 1 s)."""
    steps = metric_steps(client, run.info.run_id, key)
    assert steps in (([1, 2],) if all_of else ([1], [1, 2])), (key, steps, run.data.tags)


def children_of(client: MlflowClient, parent_run_id: str) -> list:
    experiment = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.mark.ray
def test_study_is_one_parent_run_with_a_child_per_trial(study):
    client = MlflowClient(study["uri"])
    parent = client.get_run(study["json"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tune-space"
    assert (parent.data.tags["data.train_rows"], parent.data.tags["data.val_rows"]) == ("64", "32")
    assert parent.data.params["search.train.lr"] == "{grid: [0.003, 0.001, 1e-07]}"
    assert "train.lr" not in parent.data.params  # searched: each child has its own
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.md", "trials.png", "space.yaml"}

    children = children_of(client, parent.info.run_id)
    assert sorted(float(child.data.params["train.lr"]) for child in children) == [1e-7, 1e-3, 3e-3]
    for child in children:
        assert child.info.status == "FINISHED", child.info
        for key in ("val_dice", "val_psnr_hole", "train_loss"):
            assert_every_epoch_once(client, child, key, all_of=child.data.tags["stopped_early"] == "false")
    stopped = [child for child in children if child.data.tags["stopped_early"] == "true"]
    assert stopped, f"ASHA stopped no trial:\n{study['out'].split('best first:')[1]}"
    found = client.search_runs([parent.info.experiment_id], filter_string="metrics.val_dice > 0")
    assert {child.info.run_id for child in children} <= {run.info.run_id for run in found}

    table = study["out"].split("best first:\n")[1]
    assert table.startswith("| trial ") and "train.lr" in table.splitlines()[0]
    assert len([line for line in table.splitlines() if line.startswith("|")]) == 2 + 3  # header, rule, trials


@pytest.mark.ray
def test_best_trial_is_registered_with_the_alias_best(study, tiny_data):
    client, result = MlflowClient(study["uri"]), study["json"]
    children = children_of(client, result["parent_run_id"])

    def best_seen(child) -> float:  # by the study: a stopped trial's ends at epoch 1, ASHA's only rung here
        stopped = child.data.tags["stopped_early"] == "true"
        history = client.get_metric_history(child.info.run_id, "val_psnr_hole")
        return max(m.value for m in history if not stopped or m.step == 1)

    best_value = {child.info.run_id: best_seen(child) for child in children}
    assert result["best_run_id"] == max(best_value, key=best_value.get)
    assert result["val_psnr_hole"] == pytest.approx(best_value[result["best_run_id"]])
    best_lr = float(client.get_run(result["best_run_id"]).data.params["train.lr"])
    assert result["best_config"] == {"train.lr": best_lr}
    assert client.get_run(result["parent_run_id"]).data.tags["best_run_id"] == result["best_run_id"]

    assert result["model_uri"] == "models:/inpaint-fused-unet@best"
    version = client.get_model_version_by_alias("inpaint-fused-unet", "best")
    assert version.run_id == result["best_run_id"]
    assert float(version.tags["val_psnr_hole"]) == pytest.approx(result["val_psnr_hole"], abs=1e-4)
    assert float(version.tags["val_dice"]) == pytest.approx(result["val_dice"], abs=1e-4)
    # the MLflow UI's pick, the child runs sorted by the column the README names, is @best, and shows its epoch
    (top, *_) = client.search_runs(
        [client.get_run(result["parent_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'",
        order_by=["metrics.best_val_psnr_hole DESC"],
    )
    assert top.info.run_id == version.run_id
    assert int(top.data.metrics["best_epoch"]) == int(version.tags["epoch"])
    for key in ("val_psnr_hole", "val_dice", "val_ssim", "val_l1_hole"):
        assert top.data.metrics[f"best_{key}"] == pytest.approx(float(version.tags[key]), abs=1e-4), key
    parent_metrics = client.get_run(result["parent_run_id"]).data.metrics
    assert parent_metrics["best_val_psnr_hole"] == pytest.approx(result["val_psnr_hole"], abs=1e-6)
    mlflow.set_tracking_uri(study["uri"])
    model = mlflow.pytorch.load_model(result["model_uri"])
    with torch.no_grad():
        assert model(torch.rand(2, 4, 32, 32)).shape == (2, 3, 32, 32)


@pytest.mark.ray
def test_a_study_stopped_with_ctrl_c_then_killed_goes_on_each_time_without_training_finished_trials_again(
    tiny_data, tmp_path
):
    """An Optuna study of 4 trials, stopped twice as users stop one:
    1. Ctrl-C once a trial has finished: exit 130, the runs KILLED, and a last line naming the study, its trials
       and the `--resume` command;
    2. that command, its driver (and the local Ray it started) killed with SIGKILL just as a trial finishes,
       before Tune saves that (it saves its state and the searcher's 10 s or more apart);
    3. `--resume` again says what it restored and finishes the study, training no finished trial again, and
       Optuna's study ends holding every trial with the value of its last report."""
    write(tmp_path, OPTUNA_SPACE)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client, states = MlflowClient(uri), tmp_path / "runs" / "tune-space"

    def finished_trials(proc: subprocess.Popen, deadline: float) -> set[str]:  # ended by ChildRunCallback
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)  # its output, below, says how far it got
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
        experiment = client.get_experiment_by_name("inpaint")
        filter_string = "tags.tune_trial_id != '' and attributes.status = 'FINISHED'"
        runs = client.search_runs([experiment.experiment_id], filter_string) if experiment else []
        return {run.data.tags["tune_trial_id"] for run in runs}

    # 1. Ctrl-C: 4 trials, 2 at a time, so when the first finishes others are under way
    args = study_args(tiny_data, "--samples", "4", "--limit", "60")
    proc = run_job(args, tmp_path, uri, job="tune.py", start_new_session=True)
    deadline = time.monotonic() + 400
    while not finished_trials(proc, deadline):
        pass
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, out[-3000:]
    stopped = re.fullmatch(
        r"stopped: study tune-space with (\d) trial\(s\) finished and (\d) under way; it is KILLED in MLflow; "
        r"go on with: (python jobs/tune\.py --space space\.yaml --resume)",
        out.strip().splitlines()[-1],
    )
    assert stopped, out[-3000:]
    (parent,) = client.search_runs([client.get_experiment_by_name("inpaint").experiment_id], "tags.space != ''")
    assert parent.info.status == "KILLED"
    statuses = sorted(child.info.status for child in children_of(client, parent.info.run_id))
    assert statuses.count("FINISHED") == int(stopped[1]) >= 1 and statuses.count("KILLED") == int(stopped[2])
    command = shlex.split(stopped[3])
    assert command[:2] == ["python", "jobs/tune.py"]

    # 2. SIGKILL of the resumed study the moment a trial has finished but Tune's last save has it under way
    def saved_statuses() -> dict[str, str]:  # trial → status, in the newest state Tune saved
        try:
            return saved_state(str(states))[0]
        except (ValueError, EOFError, pickle.UnpicklingError):  # being copied there
            return {}

    def finished_unsaved(proc: subprocess.Popen, deadline: float) -> set[str]:
        finished = finished_trials(proc, deadline)
        statuses = saved_statuses() if finished else {}  # (unpickled only once there is a trial to look up)
        return {trial for trial in finished if statuses.get(trial, "TERMINATED") != "TERMINATED"}

    proc = run_job(command[2:], tmp_path, uri, job="tune.py", start_new_session=True)
    deadline = time.monotonic() + 400
    while not (late := finished_unsaved(proc, deadline)):
        pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    saved = {trial for trial, status in saved_statuses().items() if status == "TERMINATED"}
    assert not late & saved, "Tune saved the trial's end in the moment before the kill: run the test again"

    # 3. the same command again finishes the study
    out = finish(run_job([*command[2:], "--json", "best.json"], tmp_path, uri, job="tune.py"), timeout=600)
    restored = r"^restored study tune-space: \d trial\(s\) finished, \d go on \(\d of them finished after Tune's last "
    assert re.search(restored + r"save: .*\); Optuna knows \d finished trial\(s\)$", out, re.M), out[-3000:]
    assert all(f"trial {trial_id} had finished: its last report goes to Tune again" in out for trial_id in late)
    assert not any(f"trial {trial_id}:" in out for trial_id in saved | late), out[-3000:]  # not trained again
    result = json.loads((tmp_path / "best.json").read_text())
    assert result["parent_run_id"] == parent.info.run_id
    children = children_of(client, parent.info.run_id)
    assert len(children) == 4 and all(child.info.status == "FINISHED" for child in children), children
    for child in children:
        assert_every_epoch_once(client, child, "val_loss", all_of=child.data.tags["stopped_early"] == "false")
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["search"] == "optuna"
    assert (parent.data.tags["data.train_rows"], parent.data.tags["data.val_rows"]) == ("54", "6")  # --limit 60
    assert client.get_model_version_by_alias("inpaint-fused-unet", "best").run_id == result["best_run_id"]

    # The searcher learnt every trial's last report: a trial that trained both epochs, its epoch-2 value.
    _, optuna_trials = saved_state(str(states))
    told = {trial.params["train.lr"]: trial.value for trial in optuna_trials}
    assert len(told) == 4 and None not in told.values(), optuna_trials
    for child in children:
        if child.data.tags["stopped_early"] == "false":
            last = max(client.get_metric_history(child.info.run_id, "val_psnr_hole"), key=lambda m: m.step)
            assert told[float(child.data.params["train.lr"])] == pytest.approx(last.value, abs=1e-4), optuna_trials


@pytest.mark.ray
def test_time_budget_stops_the_study_and_ends_every_run_it_started(tiny_data, tmp_path):
    """Trials of 200 epochs (a second or two each) under a 1-minute budget: Tune stops the two under way and
    starts no more; their child runs are ended, the best epoch so far is registered, the job exits 0. The
    first trial is the baseline: the config the study starts from (the default learning rate)."""
    space = "early_stopping: false\nbaseline: true\ntrain.epochs: 200\ntrain.lr: {loguniform: [1.0e-4, 3.0e-3]}\n"
    write(tmp_path, f"{space}{FIXED}\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = study_args(tiny_data, "--samples", "8", "--time-budget", "1", "--json", "best.json")
    out = finish(run_job(args, tmp_path, uri, job="tune.py"), timeout=600)
    client, result = MlflowClient(uri), json.loads((tmp_path / "best.json").read_text())
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["time_budget_minutes"] == "1.0"
    children = children_of(client, parent.info.run_id)
    assert 1 <= len(children) < 8, out[-3000:]  # the budget ran out before the 8 trials could
    assert 2e-3 in [float(child.data.params["train.lr"]) for child in children]
    assert parent.data.params["baseline"] == "true" and re.search(r"^\| \w+ \(baseline\) +\| 0\.002 ", out, re.M)
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["stopped_early"] == "true", child.info
        assert 1 <= len(metric_steps(client, child.info.run_id, "val_loss")) < 200
    assert client.get_model_version_by_alias("inpaint-fused-unet", "best").run_id == result["best_run_id"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--time-budget", "0"], "--time-budget must be a positive number of minutes, got 0.0"),
        (["--time-budget", "5", "--resume"], "--time-budget starts a study: a resumed one keeps what was left"),
    ],
)
def test_time_budget_flag_is_checked_before_ray_starts(tmp_path, flags, message):
    write(tmp_path, "model.fusion: {choice: [add]}\n")
    proc = run_job(["--space", "space.yaml", "--data", str(tmp_path), *flags], tmp_path, "", "tune.py")
    out, _ = proc.communicate(timeout=120)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith(f"error: {message}"), out[-2000:]
    assert "Traceback" not in out and "Started a local Ray" not in out
