"""Square holes: where they are, how big, and how they are drawn.

A mask is a float tensor (N, 1, H, W) with 1 in the hole and 0 elsewhere; `apply_holes` zeroes the
hole pixels of the input. Two families:
- "random": a square whose side is uniform in [min_size, max_size], placed uniformly anywhere inside
  the image (what the paper describes);
- "diagonal": an 11×11 square with its top-left corner at (r, r), r uniform in 2..19 on 32×32 images
  (what the paper's code really does; on other sizes r runs up to min(H, W) - 13).
Training draws fresh holes from a generator that moves on every batch; validation and test holes are
a pure function of (seed, image index), so every evaluation of every model sees the same holes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("random", "diagonal")
DIAGONAL_SIZE = 11
DIAGONAL_MIN_OFFSET = 2


@dataclass
class MaskConfig:
    kind: str = "random"  # "random" squares or the paper's code's "diagonal" 11×11
    min_size: int = 8  # side of a random square, inclusive range
    max_size: int = 16

    def validate(self, height: int | None = None, width: int | None = None) -> None:
        """Raise ValueError naming the problem when these holes cannot be drawn (on H×W images, if given)."""
        if self.kind not in KINDS:
            raise ValueError(f"mask kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "random":
            if self.min_size < 1:
                raise ValueError(f"hole min_size must be at least 1, got {self.min_size}")
            if self.min_size > self.max_size:
                raise ValueError(f"hole min_size ({self.min_size}) is larger than max_size ({self.max_size})")
        if height is None or width is None:
            return
        side = min(height, width)
        if self.kind == "diagonal" and side < DIAGONAL_SIZE + DIAGONAL_MIN_OFFSET + 2:
            raise ValueError(f"diagonal 11×11 holes need images of at least 15×15, got {height}×{width}")
        if self.kind == "random" and self.max_size > side:
            raise ValueError(
                f"hole max_size ({self.max_size}) is larger than the {height}×{width} images: use at most {side}"
            )


def squares(sides: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Masks (N, 1, H, W) with a square of the given side at (top, left) in each image."""
    rows = torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    tops, lefts, sides = (t.view(-1, 1, 1) for t in (tops, lefts, sides))
    inside = (rows >= tops) & (rows < tops + sides) & (cols >= lefts) & (cols < lefts + sides)
    return inside.unsqueeze(1).float()


def _draw(cfg: MaskConfig, uniforms: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Turn 3 uniforms in [0, 1) per image into that image's hole (side, top, left)."""
    u_side, u_top, u_left = uniforms.unbind(1)
    if cfg.kind == "diagonal":
        last = min(height, width) - DIAGONAL_SIZE - 2  # 19 on 32×32, as in the paper's code
        offsets = DIAGONAL_MIN_OFFSET + (u_top * (last - DIAGONAL_MIN_OFFSET + 1)).long()
        sides = torch.full_like(offsets, DIAGONAL_SIZE)
        return squares(sides, offsets, offsets, height, width)
    sides = cfg.min_size + (u_side * (cfg.max_size - cfg.min_size + 1)).long()
    tops = (u_top * (height - sides + 1)).long()
    lefts = (u_left * (width - sides + 1)).long()
    return squares(sides, tops, lefts, height, width)


def random_masks(n: int, height: int, width: int, cfg: MaskConfig, generator: torch.Generator) -> torch.Tensor:
    """Fresh holes for a training batch, drawn from (and advancing) `generator`."""
    return _draw(cfg, torch.rand(n, 3, generator=generator, dtype=torch.float64), height, width)


def fixed_masks(
    indices: torch.Tensor | np.ndarray, height: int, width: int, cfg: MaskConfig, seed: int
) -> torch.Tensor:
    """The holes of the images at these dataset indices: a pure function of (seed, index)."""
    uniforms = np.stack([np.random.default_rng([seed, int(i)]).random(3) for i in np.asarray(indices)])
    return _draw(cfg, torch.from_numpy(uniforms.reshape(-1, 3)), height, width)


def apply_holes(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The network's view of the image: hole pixels set to 0."""
    return images * (1 - masks)
