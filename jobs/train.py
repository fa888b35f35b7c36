"""Train an inpainting model with Ray Train on CPU workers, tracked and registered in MLflow.

python jobs/train.py --data ../shared/data/cifar10 --workers 2 --epochs 2 --limit 5000
python jobs/train.py --config configs/paper.yaml --set model.fusion=concat --data DIR
python jobs/train.py --resume fused-20261124-201500          # go on with a stopped run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from inpaint import tables, tracking
from inpaint.config import add_config_flags, flag_values, load_config
from inpaint.driver import train
from inpaint.errors import cli_errors
from inpaint.runtime import configure_process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser)
    parser.add_argument("--epochs", type=int, help="training epochs (train.epochs)")
    parser.add_argument(
        "--resume",
        metavar="RUN_NAME",
        help="continue a stopped run from its last checkpoint, with the config it started with; "
        "--config FILE and --set/flags given with it apply on top (e.g. --epochs 12)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the final metrics, run id and model URI")
    return parser.parse_args(argv)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_process()
    values = flag_values(args, epochs="train.epochs")
    cfg = load_config(args.config, args.set, values=values)
    result = train(cfg, resume=args.resume, config_file=args.config, overrides=args.set, values=values)

    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    rows = [
        ("run", result.run_name),
        ("epochs", f"{result.epochs} (best: {result.best_epoch})"),
        *((name, f"{value:.4f}") for name, value in result.metrics.items()),
        ("MLflow run", f"runs:/{result.run_id}"),
        ("model", result.model_uri),
        ("open the UI", tracking.ui_command(uri)),
    ]
    print(tables.aligned(rows))
    if args.json:
        args.json.write_text(
            json.dumps({"run_id": result.run_id, "model_uri": result.model_uri, **result.metrics}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
