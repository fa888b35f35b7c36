"""What every network of this project is, whatever its family: the type the loaders, the fill path and the
server declare, so that a new family only has to be one of these.

A network takes one tensor (N, 4, H, W), the masked RGB image (hole pixels 0) and the mask (1 = hole), and
returns RGB in [0, 1] of shape (N, 3, H, W). H and W must be multiples of its `size_multiple` (NAFNet's
`padder_size`: 2 to the power of its downsamplings); `inpaint.fill` pads any picture up to one. Its
`train_scale` says the picture and hole size it learnt on, which the fill path scales large holes down to; its
`prefill` what its input holds in the hole (`prefill.py`), which `model_input` puts there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TrainScale:
    """The scale a network learnt at: its training pictures' size and its holes' typical side, in pixels.

    The defaults are the default recipe's: 32×32 CIFAR-10 pictures, random squares of side 8 to 16. A network
    built from a model config alone gets them; one loaded from a checkpoint or the registry gets the scale its
    saved config says (`checkpoints.train_scale`)."""

    size: tuple[int, int] = (32, 32)  # (H, W)
    hole: float = 12.0


class InpaintingNetwork(nn.Module):
    """The base of every network: an `nn.Module` that knows the multiple its input sides must be, and the
    scale it learnt at (a plain attribute: not in the state dict, so weights and registered graphs are
    unaffected)."""

    def __init__(self, size_multiple: int, prefill: str = "none") -> None:
        super().__init__()
        self.size_multiple = size_multiple
        self.prefill = prefill
        self.train_scale = TrainScale()

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse, with the shape it wants, an input this network cannot take."""
        multiple = self.size_multiple
        if x.ndim != 4 or x.shape[1] != 4 or x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"expected (N, 4, H, W) with H, W multiples of {multiple}, got {tuple(x.shape)}")
