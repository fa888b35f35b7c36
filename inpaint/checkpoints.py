"""What a training checkpoint holds, and the model it rebuilds: plain PyTorch, no Ray.

A checkpoint is a folder with `state.pt`: {"model", "optimizer", "scheduler": state dicts, "epoch",
"config": the whole config as a dict, "metrics": the epoch's validation metrics, and "ema": the
`AveragedModel` state of the weights' moving average where `train.ema_decay` kept one}. It holds tensors
and plain values only, so it loads with `torch.load(weights_only=True)`: no pickled code runs.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from inpaint.config import Config, from_dict
from inpaint.masks import DIAGONAL_SIZE, THICK_STROKE_WIDTHS
from inpaint.models import InpaintingNetwork, TrainScale, build_model

CHECKPOINT_FILE = "state.pt"


def save_checkpoint_state(folder: str, state: dict[str, Any]) -> None:
    torch.save(state, os.path.join(folder, CHECKPOINT_FILE))


def load_checkpoint_state(folder: str) -> dict[str, Any]:
    """A checkpoint's saved state (weights only: no pickled code runs)."""
    return torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def delivered_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint delivers: the moving average where one was kept (it is what was validated),
    else the network's own."""
    if "ema" not in state:
        return state["model"]
    return {key.removeprefix("module."): value for key, value in state["ema"].items() if key != "n_averaged"}


def train_scale(cfg: Config) -> TrainScale:
    """The scale a run of `cfg` trains at, which the fill path shrinks large holes to: its pictures' size
    (`data.image_size`; CIFAR-10's 32×32 where a config written before that key says none) and its holes'
    typical thickness: the middle of `masks.min_size`..`max_size` for random squares; the paper's diagonal
    squares' side; for strokes, the widest thick stroke at that size (16% of the shorter side: 5 px on 32×32,
    20 px on 128×128); for mixed holes, the largest square side `max_size`, which it learnt at full size."""
    size = tuple(cfg.data.image_size) if cfg.data.image_size else TrainScale.size
    match cfg.masks.kind:
        case "diagonal":
            hole = float(DIAGONAL_SIZE)
        case "strokes":
            hole = THICK_STROKE_WIDTHS[1] * min(size)
        case "mixed":
            hole = float(cfg.masks.max_size)
        case _:
            hole = (cfg.masks.min_size + cfg.masks.max_size) / 2
    return TrainScale(size, hole)


def model_from_state(state: dict[str, Any]) -> InpaintingNetwork:
    """The network a checkpoint delivers (eval mode), built from the config saved beside its weights, with
    the scale that config trained at."""
    cfg = from_dict(state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(delivered_weights(state))
    model.train_scale = train_scale(cfg)
    return model.eval()
