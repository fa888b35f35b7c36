"""`model.prefill`: the network sees OpenCV's fill in the hole and learns a correction to it, so that a fresh
network fills as OpenCV does and training only improves on that."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inpaint import fill
from inpaint.checkpoints import model_from_state
from inpaint.config import load_config
from inpaint.data import to_float_images, to_uint8_images
from inpaint.masks import apply_holes
from inpaint.metrics import reconstruction_loss
from inpaint.models import ModelConfig, build_model, model_input
from inpaint.models.prefill import PREFILLS, prefill_holes

SMALL = ModelConfig(widths=[8, 16, 32], mixer_dim=16, block="residual")


def photo(height: int = 48, width: int = 64) -> np.ndarray:
    """A picture with edges and a gradient for OpenCV to continue."""
    rows, cols = np.mgrid[:height, :width]
    red = (cols * 4) % 256
    green = np.where((rows // 6) % 2 == 0, 200, 40)
    blue = (rows * 3 + cols * 2) % 256
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def test_prefill_puts_opencvs_fill_in_the_hole_only():
    images = torch.from_numpy(photo()).permute(2, 0, 1)[None].float() / 255
    mask = torch.zeros(1, 1, 48, 64)
    mask[..., 10:26, 20:36] = 1
    masked = images * (1 - mask)
    assert torch.equal(prefill_holes(masked, mask, "none"), masked)
    for method in ("telea", "ns"):
        filled = prefill_holes(masked, mask, method)
        assert torch.equal(filled * (1 - mask), masked)  # the known pixels as given
        hole = mask.expand_as(filled) > 0.5
        assert filled[hole].min() > 0  # no hole pixel left at 0 ...
        error = (filled - images)[hole].abs().mean()
        assert error < (masked - images)[hole].abs().mean() / 2  # ... and far closer to the truth than 0


@pytest.mark.parametrize("prefill", ["telea", "ns"])
def test_a_fresh_prefilled_network_fills_a_picture_as_opencv_does(prefill):
    """Through the one fill path (what serve and the jobs call), loaded from a checkpoint as they load it."""
    cfg = load_config(None, ["model.widths=[8,16,32]", "model.mixer_dim=16", f"model.prefill={prefill}"])
    state = {"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict()}
    model = model_from_state(state)
    assert model.prefill == prefill
    image, hole = photo(), np.zeros((48, 64), bool)
    hole[12:30, 18:40] = True
    filled = fill.inpaint_image(model, image, hole, mode="full")
    target, mask = to_float_images(image[None]), torch.from_numpy(hole[None, None]).float()
    opencv = to_uint8_images(fill.opencv_fill(apply_holes(target, mask), mask, PREFILLS[prefill]))[0]
    assert np.array_equal(filled[hole], opencv[hole]) and np.array_equal(filled[~hole], image[~hole])


def test_the_correction_learns_what_opencv_misses():
    """A few steps on one batch: the output moves away from Telea's fill and the hole loss falls."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**SMALL.__dict__, "prefill": "telea"})).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = torch.from_numpy(photo(32, 32)).permute(2, 0, 1)[None].float().repeat(4, 1, 1, 1) / 255
    mask = torch.zeros(4, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    inputs = model_input(images * (1 - mask), mask, "telea")
    losses = []
    for _ in range(30):
        loss = reconstruction_loss(model(inputs), images, mask, "hole_l1")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    with torch.no_grad():
        assert not torch.allclose(model.eval()(inputs), inputs[:, :3])
