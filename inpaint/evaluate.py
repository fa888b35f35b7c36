"""Evaluation: trained models beside the classical baselines, on the very same fixed holes.

A method fills masked images (hole pixels 0) given their masks: `fill(masked, mask) -> RGB`, all
tensors (N, C, H, W) in [0, 1]. It never sees the hole's content; `MetricTotals` scores its output
composited into the known pixels. The baselines a user would otherwise reach for:
- `zero`: the unfilled input;
- `mean`: each image's mean colour of its known pixels;
- `telea`, `ns`: OpenCV's inpainting (Telea's fast marching, Navier–Stokes), radius 3, on uint8 images.
A model fills through `inpaint.fill`, at any image size (`fill.model_fill`). Models are rebuilt from their
config and weights (`load_model`), so that a checkpoint folder and a registered MLflow model give the same
network, with the training scale its config says.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from inpaint import pictures, tables, tracking
from inpaint.checkpoints import CHECKPOINT_FILE, load_checkpoint_state, model_from_state
from inpaint.data import Progress, is_prepared, load_source, read_manifest, read_split, to_float_images
from inpaint.errors import UserError
from inpaint.fill import opencv_fill
from inpaint.masks import MaskConfig, apply_holes, fixed_masks
from inpaint.metrics import METRIC_NAMES, MetricTotals, composite, format_metric
from inpaint.models import InpaintingNetwork

Fill = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (masked (N,3,H,W), mask (N,1,H,W)) -> RGB

GRID_SAMPLES = 8


# ---------------------------------------------------------------------------------------------
# Methods


def zero_fill(masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The unfilled input: the hole stays black."""
    return torch.zeros_like(masked)


def mean_fill(masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each image's mean colour over its known pixels, everywhere."""
    known = 1 - mask
    colour = (masked * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp(min=1)
    return colour.expand_as(masked)


BASELINES: dict[str, Fill] = {
    "telea": functools.partial(opencv_fill, method=cv2.INPAINT_TELEA),
    "ns": functools.partial(opencv_fill, method=cv2.INPAINT_NS),
    "mean": mean_fill,
    "zero": zero_fill,
}


def load_model(uri: str, tracking_uri: str | None = None) -> InpaintingNetwork:
    """The network (eval mode) of a checkpoint folder or an MLflow model URI (models:/NAME@ALIAS,
    models:/NAME/VERSION, runs:/RUN_ID/model), rebuilt from its config so that it takes any image size, with
    its `train_scale` read from that config."""
    checkpoint = Path(uri)
    if checkpoint.is_dir():
        if not (checkpoint / CHECKPOINT_FILE).is_file():
            raise UserError(f"{uri} holds no {CHECKPOINT_FILE}: pass a checkpoint folder (runs/NAME/checkpoint_*)")
        try:
            state = load_checkpoint_state(uri)
        except (pickle.UnpicklingError, EOFError, RuntimeError):  # what torch.load raises for other files
            raise UserError(f"{checkpoint / CHECKPOINT_FILE} is not a checkpoint written by jobs/train.py") from None
    elif ":/" in uri:
        weights, config = tracking.logged_model_state(uri, tracking_uri=tracking_uri)
        state = {"model": weights, "config": config}
    else:
        raise UserError(
            f"no checkpoint folder or MLflow model {uri!r}: pass models:/NAME@ALIAS, models:/NAME/VERSION, "
            "runs:/RUN_ID/model or a checkpoint folder holding state.pt"
        )
    try:
        return model_from_state(state)
    except (KeyError, ValueError, RuntimeError) as err:  # no weights or config; a bad config; weights that don't fit
        reason = " ".join(str(err).split())[:300]
        raise UserError(f"{uri} is not a model this project can rebuild: {reason}") from None


# ---------------------------------------------------------------------------------------------
# Data and holes


def load_images(source: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """The images to evaluate on, uint8 (N,H,W,3), their indices (which seed their holes), and the split's name.

    A prepared dataset gives its test split if it has one, else its val split; a source as
    jobs/prepare.py takes gives its test split if it has one, else every image in it ("all").
    """
    if is_prepared(source):
        split = "test" if "test" in read_manifest(source)["splits"] else "val"
        images, index = read_split(source, split, limit=limit)
    else:
        splits = load_source(source, limit=limit)
        split = "test" if "test" in splits else "all"
        images = splits.get("test", splits["train"])[0]
        index = np.arange(len(images))
    if len(images) == 0:
        raise UserError(f"the {split} split of {source} has no images; pass a dataset with images to evaluate on")
    return images, index, split


def holes_params(holes: MaskConfig, seed: int) -> dict[str, int | float | str]:
    """The settings that fix the holes, and a phrase saying what they are."""
    squares = {"min_size": holes.min_size, "max_size": holes.max_size}
    strokes = {"min_coverage": holes.min_coverage, "max_coverage": holes.max_coverage}
    squares_text = f"squares of side {holes.min_size}–{holes.max_size} px"
    strokes_text = f"brush strokes and boxes over {holes.min_coverage:.0%}–{holes.max_coverage:.0%} of the picture"
    match holes.kind:
        case "diagonal":
            params, text = {}, "diagonal 11×11 squares"
        case "strokes":
            params, text = strokes, strokes_text
        case "mixed":
            params = squares | strokes | {"square_share": holes.square_share}
            text = f"{squares_text} on {holes.square_share:.0%} of the images, else {strokes_text}"
        case _:
            params, text = squares, f"random {squares_text}"
    return {"kind": holes.kind, **params, "seed": seed, "description": f"{text}, seed {seed}"}


# ---------------------------------------------------------------------------------------------
# Scoring and reporting


def evaluate(
    methods: dict[str, Fill],
    images: np.ndarray,
    index: np.ndarray,
    holes: MaskConfig,
    seed: int,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> list[dict[str, float | str]]:
    """One row per method, {"method": name, dice, psnr_hole, psnr, l1_hole, ssim}, every method on the same holes.

    `progress`, if given, hears after each batch how many images are scored.
    """
    height, width = images.shape[1:3]
    totals = {name: MetricTotals() for name in methods}
    for start in range(0, len(images), batch_size):
        target = to_float_images(images[start : start + batch_size])
        mask = fixed_masks(index[start : start + batch_size], height, width, holes, seed)
        masked = apply_holes(target, mask)
        for name, fill in methods.items():
            totals[name].update(target, fill(masked, mask), mask)
        if progress:
            progress(f"{start + len(target)}/{len(images)} images scored")
    return [{"method": name, **t.compute()} for name, t in totals.items()]


def comparison_grid(
    methods: dict[str, Fill], images: np.ndarray, index: np.ndarray, holes: MaskConfig, seed: int
) -> np.ndarray:
    """A labelled picture, a row per image: masked | each method's fill (composited) | ground truth."""
    target = to_float_images(images)
    mask = fixed_masks(index, *images.shape[1:3], holes, seed)
    masked = apply_holes(target, mask)
    filled = [composite(fill(masked, mask), target, mask) for fill in methods.values()]
    return pictures.picture_grid([masked, *filled, target], ["masked", *methods, "ground truth"], mask=mask)


def markdown_table(rows: list[dict[str, float | str]]) -> str:
    """The evaluation table, a row per method, each metric as `format_metric` prints it."""
    cells = [[str(row["method"]), *(format_metric(name, row[name]) for name in METRIC_NAMES)] for row in rows]
    return tables.markdown(["method", *METRIC_NAMES], cells) + "\n"


def csv_table(rows: list[dict[str, float | str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, ["method", *METRIC_NAMES], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def log_evaluation(report: dict, picture: np.ndarray, tracking_uri: str, experiment: str, run_name: str) -> str:
    """An MLflow run of `report`: its settings as params, `<method>_<metric>` metrics, the table as
    markdown, CSV and JSON, and the picture. Returns the run id."""
    params = {key: report[key] for key in ("models", "data", "split", "images", "holes")}
    run_id = tracking.start_run(tracking_uri, experiment, run_name, params)
    rows = report["rows"]
    metrics = {f"{row['method']}_{name}": row[name] for row in rows for name in METRIC_NAMES}
    tracking.log_metrics(run_id, metrics, step=0, tracking_uri=tracking_uri)
    tracking.log_text(run_id, markdown_table(rows), "table.md", tracking_uri=tracking_uri)
    tracking.log_text(run_id, csv_table(rows), "table.csv", tracking_uri=tracking_uri)
    tracking.log_text(run_id, json.dumps(report, indent=2), "evaluation.json", tracking_uri=tracking_uri)
    tracking.log_picture(run_id, picture, "samples.png", tracking_uri=tracking_uri)
    tracking.end_run(run_id, tracking_uri=tracking_uri)
    return run_id
