"""Score inpainting models beside the classical baselines (zero, mean, OpenCV Telea, Navier–Stokes) on the same holes.

python jobs/evaluate.py --model models:/inpaint-fused-unet@champion --data data/prepared-cifar10
python jobs/evaluate.py --model runs/fused-20261124-212241/checkpoint_2026-11-24_21-28-03.862916 \\
    --second-model models:/inpaint-unet/3 --data DIR --holes random --min-size 8 --max-size 16 --json eval.json
python jobs/evaluate.py --model models:/inpaint-fused-unet@best --data DIR --flip-average   # + row model-flip
python jobs/evaluate.py --model models:/inpaint-fused-unet@best --data DIR --holes strokes --max-coverage 0.2
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

from inpaint import storage, tracking
from inpaint.config import TrainConfig
from inpaint.data import read_manifest
from inpaint.errors import UserError, cli_errors
from inpaint.evaluate import (
    BASELINES,
    GRID_SAMPLES,
    comparison_grid,
    evaluate,
    holes_params,
    load_images,
    load_model,
    log_evaluation,
    markdown_table,
)
from inpaint.fill import flip_averaged_fill, model_fill
from inpaint.masks import KINDS, MaskConfig
from inpaint.runtime import configure_process

MODEL_HELP = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a checkpoint folder (with state.pt)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="URI", help=MODEL_HELP)
    parser.add_argument(
        "--second-model", metavar="URI", help="another model to compare (row model2), e.g. the vanilla U-Net"
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="a prepared dataset (its test split, else val) or any source jobs/prepare.py takes "
        "(its test split, else every image)",
    )
    parser.add_argument("--holes", choices=KINDS, default="diagonal", help="hole family (default: %(default)s)")
    parser.add_argument("--min-size", type=int, default=8, help="smallest random square side (default: %(default)s)")
    parser.add_argument("--max-size", type=int, default=16, help="largest random square side (default: %(default)s)")
    parser.add_argument(
        "--min-coverage",
        type=float,
        default=MaskConfig.min_coverage,
        help="strokes and mixed: the smallest share of the picture the holes cover (default: %(default)s)",
    )
    parser.add_argument(
        "--max-coverage",
        type=float,
        default=MaskConfig.max_coverage,
        help="strokes and mixed: the largest share of the picture the holes cover (default: %(default)s)",
    )
    parser.add_argument("--limit", type=int, help="evaluate on the first N images only")
    parser.add_argument(
        "--seed",
        type=int,
        default=TrainConfig.val_seed,
        help="seed of the fixed holes (default: %(default)s, the training's validation holes)",
    )
    parser.add_argument(
        "--flip-average",
        action="store_true",
        help="also score each model averaged with its fill of the mirrored image (rows NAME-flip; twice the compute)",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite)")
    parser.add_argument("--experiment", default="inpaint-eval", help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the table and its settings as JSON")
    return parser.parse_args(argv)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_process()
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be a positive number of images, got {args.limit}")
    holes = MaskConfig(
        kind=args.holes,
        min_size=args.min_size,
        max_size=args.max_size,
        min_coverage=args.min_coverage,
        max_coverage=args.max_coverage,
    )
    tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_tracking(tracking_uri)
    if storage.is_uri(args.data):  # an object store holds prepared datasets only: name what is wrong in one line
        storage.check_bucket(args.data, f"reading {args.data}")
        read_manifest(args.data)
    images, index, split = load_images(args.data, args.limit)
    try:
        holes.validate(*images.shape[1:3], section="holes")
    except ValueError as err:
        raise UserError(str(err)) from None
    uris = {name: uri for name, uri in [("model", args.model), ("model2", args.second_model)] if uri}
    models = {name: load_model(uri, tracking_uri) for name, uri in uris.items()}

    started = time.perf_counter()
    methods = {name: functools.partial(model_fill, model) for name, model in models.items()}
    if args.flip_average:
        methods |= {f"{name}-flip": functools.partial(flip_averaged_fill, model) for name, model in models.items()}
    methods |= BASELINES
    rows = evaluate(methods, images, index, holes, args.seed, progress=lambda line: print(line, file=sys.stderr))
    report = {
        "models": uris,
        "data": args.data,
        "split": split,
        "images": len(images),
        "holes": holes_params(holes, args.seed),
        "rows": rows,
    }
    print(
        f"{len(images)} {split} images of {args.data}, {report['holes']['description']} "
        f"({time.perf_counter() - started:.1f} s)\n"
    )
    print(markdown_table(rows))

    shown = {name: fill for name, fill in methods.items() if name != "zero"}  # zero fill is the masked column
    picture = comparison_grid(shown, images[:GRID_SAMPLES], index[:GRID_SAMPLES], holes, args.seed)
    run_name = f"eval-{args.holes}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = log_evaluation(report, picture, tracking_uri, args.experiment, run_name)
    print(f"MLflow run {run_name} (runs:/{run_id}); open the UI: {tracking.ui_command(tracking_uri)}")
    if args.json:
        args.json.write_text(json.dumps({**report, "run_id": run_id}, indent=2) + "\n")


if __name__ == "__main__":
    main()
