"""Search model and training settings with Ray Tune: one TorchTrainer per trial, ASHA early stopping,
one MLflow parent run with a child run per trial, the best model registered as models:/NAME@best.

python jobs/tune.py --space tune_spaces/quick.yaml --data ../shared/data/cifar10
python jobs/tune.py --space tune_spaces/full.yaml --data DIR --samples 32 --metric val_dice --json best.json
python jobs/tune.py --space tune_spaces/quick.yaml --data DIR --resume     # go on with a stopped study
python jobs/tune.py --space tune_spaces/recipe.yaml --data DIR --time-budget 90   # whatever 90 minutes hold
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from inpaint import tables, tracking
from inpaint.config import VAL_METRICS, add_config_flags, flag_values, load_config
from inpaint.errors import UserError, cli_errors
from inpaint.runtime import configure_process
from inpaint.spaces import load_space
from inpaint.study_results import importances_table
from inpaint.tune import run_study

DEFAULT_SAMPLES = 8  # for a space file that does not say


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, help="a search-space YAML file (see tune_spaces/)")
    parser.add_argument(
        "--samples",
        type=int,
        help="trials to sample (default: the space's `samples`, else 8; --resume keeps the study's)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="stop the study after this long, trials under way included (default: the space's "
        "`time_budget_minutes`, else none; --resume keeps what was left of the study's)",
    )
    parser.add_argument(
        "--metric", choices=VAL_METRICS, help="what ASHA and the best trial go by (default: val_psnr_hole)"
    )
    add_config_flags(parser)
    parser.add_argument("--resume", action="store_true", help="go on with this space's stopped study")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the best config, its metrics and model URI")
    return parser.parse_args(argv)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_process()
    space = load_space(args.space)  # a bad space stops here, before anything starts
    if args.time_budget is not None:
        if args.time_budget <= 0:
            raise UserError(f"--time-budget must be a positive number of minutes, got {args.time_budget}")
        if args.resume:
            raise UserError("--time-budget starts a study: a resumed one keeps what was left of its own budget")
        space = dataclasses.replace(space, time_budget_minutes=args.time_budget)
    # the file, then what the space fixes, then --set and the flags
    fixed = load_config(args.config, values=space.fixed).to_dict()
    cfg = load_config(None, args.set, base=fixed, values=flag_values(args, metric="train.best_metric"))
    result = run_study(space, cfg, samples=args.samples or space.samples or DEFAULT_SAMPLES, resume=args.resume)

    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    print(f"\nstudy {result.name}, best first:\n{result.table}\n")
    if result.importances:
        print(f"what moved {cfg.train.best_metric} (Optuna's PED-ANOVA importances):")
        print(importances_table(result.importances, cfg.train.best_metric) + "\n")
    rows = [
        ("best trial", result.best_trial_id),
        ("best config", " ".join(f"{key}={value}" for key, value in result.best_config.items())),
        *((name, f"{value:.4f}") for name, value in result.metrics.items()),
        ("MLflow study", f"runs:/{result.parent_run_id}"),
        ("MLflow best", f"runs:/{result.best_run_id}"),
        ("model", result.model_uri),
        ("open the UI", tracking.ui_command(uri)),
    ]
    print(tables.aligned(rows))
    if args.json:
        summary = {
            "parent_run_id": result.parent_run_id,
            "best_run_id": result.best_run_id,
            "best_config": result.best_config,
            **result.metrics,
            "model_uri": result.model_uri,
            "importances": result.importances,
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
