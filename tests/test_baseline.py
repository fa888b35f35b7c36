"""Checkpoints written by earlier code load and score as that code scored them (tests/fixtures/baseline,
made by `make_baseline.py` at commit a3db310): as a checkpoint folder, and registered in MLflow and
loaded back by its `models:/` URI, to 1e-6 on every metric, and to the pixel in a filled picture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inpaint import tracking
from inpaint.checkpoints import load_checkpoint_state
from inpaint.config import from_dict
from inpaint.evaluate import evaluate, load_model
from inpaint.fill import inpaint_image, model_fill
from inpaint.masks import apply_holes, fixed_masks
from inpaint.models import model_input

BASELINE = Path(__file__).parent / "fixtures" / "baseline"


def blocky_images(n: int, size: int, seed: int) -> np.ndarray:
    """The pictures make_baseline.py scored: random 4×4-pixel blocks."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, size // 4, size // 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 4, 1), 4, 2)


def scores_of(model: torch.nn.Module, folder: Path) -> dict:
    cfg = from_dict(load_checkpoint_state(str(folder))["config"])
    val, index = blocky_images(24, 32, 2), np.arange(100, 124)
    with torch.no_grad():
        rows = evaluate(
            {"model": lambda masked, mask: model_fill(model, masked, mask)},
            val, index, cfg.val_masks, cfg.train.val_seed, batch_size=10,
        )  # fmt: skip
        photo = blocky_images(1, 44, 3)[0][:, :40]  # 44×40: one side not a multiple of 4
        hole = np.zeros(photo.shape[:2], bool)
        hole[10:22, 5:19] = True
        filled = inpaint_image(model, photo, hole)
    return {
        "evaluate": rows[0],
        "inpaint_image_sum": int(filled.astype(np.int64).sum()),
        "inpaint_image_hole_sum": int(filled[hole].astype(np.int64).sum()),
    }


def assert_same_scores(scores: dict, expected: dict) -> None:
    for name, value in expected["evaluate"].items():
        if name != "method":
            assert scores["evaluate"][name] == pytest.approx(value, abs=1e-6), name
    assert scores["inpaint_image_sum"] == expected["inpaint_image_sum"]
    assert scores["inpaint_image_hole_sum"] == expected["inpaint_image_hole_sum"]


@pytest.mark.parametrize("name", ["fused", "paper"])
def test_an_earlier_checkpoint_scores_the_same(name):
    folder = BASELINE / name
    assert_same_scores(scores_of(load_model(str(folder)), folder), json.loads((folder / "scores.json").read_text()))


@pytest.mark.parametrize("name", ["fused", "paper"])
def test_an_earlier_checkpoint_registered_scores_the_same(name, tmp_path):
    folder = BASELINE / name
    state = load_checkpoint_state(str(folder))
    cfg = from_dict(state["config"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "inpaint", name, cfg.to_dict())
    images = torch.rand(2, 3, 32, 32)
    masks = fixed_masks(np.arange(2), 32, 32, cfg.val_masks, 0)
    example = model_input(apply_holes(images, masks), masks).numpy()
    model_uri = tracking.log_model(run_id, load_model(str(folder)), example, registered_name=name, tracking_uri=uri)
    tracking.end_run(run_id, tracking_uri=uri)
    expected = json.loads((folder / "scores.json").read_text())
    assert_same_scores(scores_of(load_model(model_uri, uri), folder), expected)
