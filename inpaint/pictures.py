"""The pictures people look at instead of numbers: sample grids (masked | filled | ground truth) and
training curves. Plain tensors and matplotlib figures in, uint8 pictures and figures out; `tracking`
logs them to MLflow."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from inpaint.data import to_uint8_images
from inpaint.runtime import import_torchvision

LABEL_HEIGHT = 20  # pixels of the column labels above a picture grid


def sample_grid(
    masked: torch.Tensor, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> np.ndarray:
    """One picture, a row per sample: masked input | output | ground truth (see `picture_grid`)."""
    return picture_grid([masked, output, target], mask=mask)


def picture_grid(
    columns: list[torch.Tensor], labels: list[str] | None = None, mask: torch.Tensor | None = None
) -> np.ndarray:
    """One (H, W, 3) uint8 picture, a row per sample and a column per tensor, under `labels` if given.

    Columns are (N, 3, H, W) in [0, 1]; `mask` (N, 1, H, W), 1 = hole, paints the hole of the first
    column mid-grey so it shows. Small images are enlarged (nearest) to about 128 pixels so that
    people can see them.
    """
    import_torchvision()
    from torchvision.utils import make_grid

    columns = [t.detach().float().cpu().clamp(0, 1) for t in columns]
    if mask is not None:
        columns[0] = columns[0].masked_fill(mask.detach().cpu().bool(), 0.5)
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # sample by sample
    scale = max(1, 128 // min(tiles.shape[-2:]))
    tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    grid = make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)
    picture = to_uint8_images(grid[None])[0]
    if labels is None:
        return picture
    header = Image.new("RGB", (picture.shape[1], LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(header)
    font = ImageFont.load_default(size=LABEL_HEIGHT - 6)
    pitch = tiles.shape[-1] + 2  # a tile and its padding
    for i, label in enumerate(labels):
        draw.text((2 + i * pitch + (pitch - 2 - draw.textlength(label, font=font)) / 2, 2), label, "black", font)
    return np.concatenate([np.asarray(header), picture])


def curves_figure(history: Mapping[str, list[float]], title: str) -> Figure:
    """Each metric over epochs (1, 2, ...) in its own panel."""
    figure = Figure(figsize=(3.2 * len(history), 3.2), dpi=100, layout="tight")  # no pyplot: no global state
    for axes, (name, values) in zip(np.atleast_1d(figure.subplots(1, len(history))), history.items(), strict=True):
        axes.plot(range(1, len(values) + 1), values, marker="o", markersize=3)
        axes.set(title=name, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    return figure
