"""The one fill path (`inpaint.fill`) with networks of other depths and scales than the paper's: they register,
load and fill pictures of any size, and a loaded network fills at the scale its saved config trained at."""

from __future__ import annotations

import runpy
from pathlib import Path

import mlflow
import numpy as np
import pytest
import test_serve
import torch
from PIL import Image
from test_serve import picture

from inpaint import fill, tracking
from inpaint.checkpoints import save_checkpoint_state
from inpaint.config import load_config
from inpaint.evaluate import load_model
from inpaint.models import TrainScale, build_model, model_input
from inpaint.serve import load_served

REPO = Path(__file__).resolve().parents[1]
BASELINE = Path(__file__).parent / "fixtures" / "baseline"
SMALL = ["model.mixer_dim=8", "model.mixer_depth=1", "model.dropout=0"]
LARGE = ["data.image_size=[64,64]"]


one_thread = test_serve.one_thread  # tiny tensors: a second thread only waits for the first


def square_hole(height: int, width: int, top: int, left: int, side: int) -> np.ndarray:
    hole = np.zeros((height, width), bool)
    hole[top : top + side, left : left + side] = True
    return hole


def checkpoint(folder: Path, overrides: list[str]) -> Path:
    """A checkpoint folder of a freshly built network whose saved config is the defaults with `overrides`."""
    cfg = load_config(None, [*SMALL, "model.widths=[8,16,32]", *overrides])
    torch.manual_seed(0)
    folder.mkdir()
    save_checkpoint_state(str(folder), {"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict()})
    return folder


@pytest.mark.parametrize("widths", [[8, 16], [8, 16, 32, 64]], ids=len)
def test_networks_of_two_and_four_levels_register_load_and_fill_any_size(widths, tmp_path):
    overrides = [f"model.widths={widths}", "data.image_size=[48,64]", "masks.min_size=16", "masks.max_size=24"]
    cfg = load_config(None, [*SMALL, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "inpaint", "deep", cfg.to_dict())
    example = model_input(torch.rand(2, 3, 48, 64), torch.zeros(2, 1, 48, 64)).numpy()
    model_uri = tracking.log_model(run_id, model, example, registered_name="deep", tracking_uri=uri)
    tracking.end_run(run_id, tracking_uri=uri)

    loaded = load_model(model_uri, uri)
    assert loaded.size_multiple == 2 ** (len(widths) - 1)
    assert loaded.train_scale == TrainScale((48, 64), 20.0)
    assert load_served(model_uri, uri).model.train_scale == loaded.train_scale  # what the server fills with
    graph = mlflow.pytorch.load_model(model_uri)
    for height, width in [(32, 32), (48, 64)]:
        inputs = model_input(torch.rand(2, 3, height, width), torch.zeros(2, 1, height, width))
        with torch.no_grad():
            torch.testing.assert_close(loaded(inputs), graph(inputs))
            torch.testing.assert_close(loaded(inputs), model(inputs))

    image, hole = picture(26, 45), square_hole(26, 45, 6, 9, 12)  # 26 = 3·8 + 2, 45 odd
    for mode in fill.MODES:
        filled = fill.inpaint_image(loaded, image, hole, mode=mode)
        np.testing.assert_array_equal(filled[~hole], image[~hole])
        assert (filled[hole] != image[hole]).any()


def network_inputs(model: torch.nn.Module, image: np.ndarray, hole: np.ndarray) -> list[tuple[int, ...]]:
    """The shapes the network is called on to fill `hole` in the scaled mode."""
    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(lambda _, inputs: shapes.append(tuple(inputs[0].shape)))
    try:
        fill.inpaint_image(model, image, hole, mode="scaled")
    finally:
        hook.remove()
    return shapes


def test_a_checkpoint_fills_at_the_scale_its_config_trained_at(tmp_path):
    """Trained on 64×64 pictures with 16–32 px holes: a 72-px hole shrinks to about 24 px in about 64×64 of
    picture, not to the 12 px in 32×32 of CIFAR-10 and the default holes."""
    scaled = load_model(str(checkpoint(tmp_path / "scaled", [*LARGE, "masks.min_size=16", "masks.max_size=32"])))
    default = load_model(str(checkpoint(tmp_path / "default", [])))
    assert scaled.train_scale == TrainScale((64, 64), 24.0)
    assert default.train_scale == TrainScale((32, 32), 12.0)
    assert load_model(str(checkpoint(tmp_path / "wide", ["data.image_size=[48,96]"]))).train_scale.size == (48, 96)
    assert load_model(str(checkpoint(tmp_path / "diagonal", ["masks.kind=diagonal"]))).train_scale.hole == 11

    image, hole = picture(300, 451), square_hole(300, 451, 100, 200, 72)
    ((_, _, height, width),) = network_inputs(scaled, image, hole)
    assert 60 <= height <= 68 and 60 <= width <= 68
    patch = fill.plan(image, hole, "scaled", scaled.train_scale)[0]
    assert 22 <= patch.mask[0].sum(0).max() <= 26  # the hole at about 24 px
    ((_, _, height, width),) = network_inputs(default, image, hole)
    assert 30 <= height <= 34 and 30 <= width <= 34


@pytest.mark.parametrize("name, hole", [("fused", 12.0), ("paper", 11)])
def test_a_checkpoint_written_before_image_size_fills_at_cifar_scale(name, hole):
    """Every checkpoint and run before `data.image_size` trained on CIFAR-10's 32×32; the paper's recipe
    (diagonal holes) on 11×11 squares, the default one on squares of side 8 to 16."""
    assert load_model(str(BASELINE / name)).train_scale == TrainScale((32, 32), hole)


def test_the_cli_fills_in_the_mode_asked_through_the_fill_path(tmp_path):
    folder = checkpoint(tmp_path / "ckpt", [*LARGE, "masks.min_size=16", "masks.max_size=32"])
    image, hole = picture(120, 150), square_hole(120, 150, 30, 40, 48)
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(hole.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    job = runpy.run_path(str(REPO / "jobs" / "inpaint_image.py"))["main"]
    args = ["--model", str(folder), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")]
    model, written = load_model(str(folder)), {}
    for mode in fill.MODES:
        job([*args, "--mode", mode, "--out", str(tmp_path / f"{mode}.png")])
        written[mode] = np.asarray(Image.open(tmp_path / f"{mode}.png").convert("RGB"))
        np.testing.assert_array_equal(written[mode], fill.inpaint_image(model, image, hole, mode=mode))
    assert (written["scaled"] != written["full"]).any()
