"""A finished study's results, from Tune's reports of its trials: the table a row per trial, which searched
keys moved the metric (Optuna's importances), and the figure of the metric per trial and epoch. Plain pandas,
Optuna and matplotlib: `inpaint.tune` runs the study and logs these to its parent run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from ray import tune

from inpaint import tables
from inpaint.metrics import VAL_METRICS, format_metric, metric_mode
from inpaint.spaces import Space


@dataclass
class TrialReports:
    """One trial as Tune saw it: its searched values and its reports, one row per epoch."""

    trial_id: str
    values: dict[str, Any]
    epochs: pd.DataFrame
    failed: bool

    def best_epoch(self, metric: str) -> pd.Series:
        column = self.epochs[metric]
        return self.epochs.loc[column.idxmax() if metric_mode(metric) == "max" else column.idxmin()]


def trial_reports(results: tune.ResultGrid) -> list[TrialReports]:
    """Every trial that reported an epoch: the last report of each epoch (a restarted trial reports some twice,
    one that finished under a killed driver before Tune saved that may hold its last epoch's report alone)."""
    return [
        TrialReports(
            result.metrics["trial_id"],
            result.config,
            result.metrics_dataframe.sort_values("epoch").drop_duplicates("epoch", keep="last"),
            result.error is not None,
        )
        for result in results
        if result.metrics_dataframe is not None and not result.metrics_dataframe.empty
    ]


def results_table(
    reports: list[TrialReports], keys: list[str], metric: str, epochs: int, baseline: dict[str, Any] | None = None
) -> str:
    """A markdown table, a row per trial, best first: its searched values (the `baseline` trial's marked),
    epochs run, its minutes of training (Tune's clock, start-up included) and its best epoch's metrics."""
    sign = 1 if metric_mode(metric) == "max" else -1
    header = ["trial", *keys, "epochs", "minutes", *VAL_METRICS]
    rows = []
    for trial in sorted(reports, key=lambda trial: -sign * trial.best_epoch(metric)[metric]):
        best, ran = trial.best_epoch(metric), int(trial.epochs["epoch"].max())
        status = " failed" if trial.failed else " stopped" if ran < epochs else ""
        values = (f"{value:.3g}" if isinstance(value, float) else str(value) for value in map(trial.values.get, keys))
        minutes = f"{trial.epochs['time_total_s'].max() / 60:.1f}"
        scores = (format_metric(m, best[m]) for m in VAL_METRICS)
        name = trial.trial_id + (" (baseline)" if trial.values == baseline else "")
        rows.append([name, *values, f"{ran}/{epochs}{status}", minutes, *scores])
    return tables.markdown(header, rows)


def parameter_importances(space: Space, reports: list[TrialReports], metric: str) -> dict[str, float]:
    """Each searched key's share of how `metric` varies over the trials (Optuna's PED-ANOVA, summing to 1),
    scored at the last epoch every trial reached, so that trials ASHA stopped compare on equal budgets;
    {} where the trials are too few or too alike to tell."""
    import optuna  # late: only a finished study needs it

    reached = min((int(trial.epochs["epoch"].max()) for trial in reports), default=0)
    distributions = {key: search.distribution() for key, search in space.searched.items()}
    direction = "maximize" if metric_mode(metric) == "max" else "minimize"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction)
    for trial in (trial for trial in reports if (trial.epochs["epoch"] == reached).any()):  # see trial_reports
        at = trial.epochs.loc[trial.epochs["epoch"] == reached, metric]
        params = {key: trial.values[key] for key in distributions}
        params = {k: v if isinstance(v, int | float | str) else str(v) for k, v in params.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(at.iloc[0])))
    if len(study.trials) < 4:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. every trial scored the same
        return {}


def importances_table(importances: dict[str, float], metric: str) -> str:
    rows = [[key, f"{share:.2f}"] for key, share in sorted(importances.items(), key=lambda item: -item[1])]
    return tables.markdown(["searched key", f"share of {metric}'s variation"], rows)


def trials_figure(reports: list[TrialReports], metric: str, title: str) -> Figure:
    """`metric` over epochs, a line per trial."""
    figure = Figure(figsize=(6.4, 4.0), dpi=100, layout="tight")  # no pyplot: no global state, no display
    axes = figure.subplots()
    for trial in reports:
        axes.plot(trial.epochs["epoch"], trial.epochs[metric], marker="o", markersize=3, label=trial.trial_id)
    axes.set(title=title, xlabel="epoch", ylabel=metric)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small")
    return figure
