"""Holes: where they are, how big, and how they are drawn.

A mask is a float tensor (N, 1, H, W) with 1 in the hole and 0 elsewhere; `apply_holes` zeroes the
hole pixels of the input. Four families (`MaskConfig.kind`):
- "random": a square whose side is uniform in [min_size, max_size], placed uniformly anywhere inside
  the image (what the paper describes);
- "diagonal": an 11×11 square with its top-left corner at (r, r), r uniform in 2..19 on 32×32 images
  (what the paper's code really does; on other sizes r runs up to min(H, W) - 13);
- "strokes": free-form holes as LaMa and DeepFill train on: thin and thick brush strokes and boxes, sized
  as fractions of the picture's shorter side, added until they cover a share of the picture drawn in
  [min_coverage, max_coverage];
- "mixed": a "random" square on a `square_share` of the images, strokes on the others.
Training draws fresh holes from a generator that moves on every batch; validation and test holes are
a pure function of (seed, image index), so every evaluation of every model sees the same holes. The
squares are drawn for a whole batch at once from 3 uniforms per image; strokes and mixed holes image by
image, each from its own numpy generator (`PER_IMAGE`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

DIAGONAL_SIZE = 11
DIAGONAL_MIN_OFFSET = 2
# Brush strokes and boxes, as fractions of the picture's shorter side (uniform in each range), so that they
# scale with the picture or crop size: on 32×32, thin strokes are 1-2 px wide and thick ones 3-5 px.
THIN_STROKE_WIDTHS = (0.02, 0.06)
THICK_STROKE_WIDTHS = (0.08, 0.16)
BOX_SIDES = (0.1, 0.4)
SEGMENT_LENGTHS = (0.1, 0.35)
MAX_SEGMENTS = 5  # a stroke is a polyline of 1 to 5 segments, turning by up to 90° at each joint
MAX_MISSES = 10  # pieces that would carry a hole past max_coverage before the hole is taken as it is


@dataclass
class MaskConfig:
    kind: str = "random"  # one of KINDS
    min_size: int = 8  # side of a random square ("random", "mixed"), inclusive range
    max_size: int = 16
    min_coverage: float = 0.05  # share of the picture that strokes cover ("strokes", "mixed")
    max_coverage: float = 0.35
    square_share: float = 0.5  # "mixed": the share of images given a square rather than strokes

    def validate(self, height: int | None = None, width: int | None = None, section: str = "masks") -> None:
        """Raise ValueError naming the key (`section.field`) and the fix when a value is out of its range, whatever
        the kind, or when these holes cannot be drawn on H×W images (if given)."""
        share = "the share of the picture the holes cover"
        checks = [
            ("kind", self.kind in KINDS, f"is not a hole family: use one of {', '.join(KINDS)}"),
            ("min_size", self.min_size >= 1, "must be at least 1"),
            ("min_size", self.min_size <= self.max_size, f"is larger than max_size ({self.max_size}): lower it"),
            ("min_coverage", 0 < self.min_coverage < 1, f"must be in (0, 1), {share}, e.g. 0.05"),
            ("max_coverage", 0 < self.max_coverage < 1, f"must be in (0, 1), {share}, e.g. 0.35"),
            (
                "min_coverage",
                self.min_coverage <= self.max_coverage,
                f"is larger than max_coverage ({self.max_coverage}): lower it",
            ),
            ("square_share", 0 <= self.square_share <= 1, "must be in [0, 1], the share of images given a square"),
        ]
        if height is not None and width is not None:
            side = min(height, width)
            if self.kind == "diagonal":
                big_enough = side >= DIAGONAL_SIZE + DIAGONAL_MIN_OFFSET + 2
                checks.append(("kind", big_enough, f"needs images of at least 15×15, got {height}×{width}"))
            if self.kind in ("random", "mixed"):
                why = f"is larger than the {height}×{width} images: use at most {side}"
                checks.append(("max_size", self.max_size <= side, why))
        for key, ok, why in checks:
            if not ok:
                raise ValueError(f"{section}.{key} = {getattr(self, key)!r} {why}")


def squares(sides: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Masks (N, 1, H, W) with a square of the given side at (top, left) in each image."""
    rows = torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    tops, lefts, sides = (t.view(-1, 1, 1) for t in (tops, lefts, sides))
    inside = (rows >= tops) & (rows < tops + sides) & (cols >= lefts) & (cols < lefts + sides)
    return inside.unsqueeze(1).float()


def _draw(cfg: MaskConfig, uniforms: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Turn 3 uniforms in [0, 1) per image into that image's square hole (side, top, left)."""
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


Piece = tuple[tuple[int, int], tuple[int, int], int]  # (start, end, stroke width) or (corner, corner, cv2.FILLED)


def _shape(rng: np.random.Generator, height: int, width: int) -> list[Piece]:
    """One shape, a thin stroke, a thick stroke or a box (a third of the time each), as the pieces that draw it:
    each segment of a stroke, or the box; points are (x, y)."""
    side = min(height, width)
    brush = rng.choice(("thin", "thick", "box"))
    if brush == "box":
        box_h, box_w = (max(1, round(rng.uniform(*BOX_SIDES) * side)) for _ in range(2))
        top, left = int(rng.integers(height - box_h + 1)), int(rng.integers(width - box_w + 1))
        return [((left, top), (left + box_w - 1, top + box_h - 1), cv2.FILLED)]
    widths = THIN_STROKE_WIDTHS if brush == "thin" else THICK_STROKE_WIDTHS
    stroke_width = max(1, round(rng.uniform(*widths) * side))
    x, y, angle = int(rng.integers(width)), int(rng.integers(height)), rng.uniform(0, 2 * math.pi)
    segments = []
    for _ in range(rng.integers(1, MAX_SEGMENTS + 1)):
        angle += rng.uniform(-math.pi / 2, math.pi / 2)
        length = rng.uniform(*SEGMENT_LENGTHS) * side
        end_x = min(max(round(x + length * math.cos(angle)), 0), width - 1)
        end_y = min(max(round(y + length * math.sin(angle)), 0), height - 1)
        segments.append(((x, y), (end_x, end_y), stroke_width))
        x, y = end_x, end_y
    return segments


def strokes(rng: np.random.Generator, height: int, width: int, cfg: MaskConfig) -> np.ndarray:
    """A free-form hole (H, W) bool: shapes (`_shape`) added piece by piece, a stroke's segment or a box, until
    they cover a target share of the picture, drawn uniformly in [min_coverage, max_coverage].

    How close: a piece that would carry the hole past max_coverage is left out, and after MAX_MISSES such pieces
    the hole is taken as it is. So the share lands between the target and max_coverage, or short of the target
    by less than a piece (3% of the picture at most in tests/test_masks.py). A hole still empty at its last
    chance keeps that piece even past max_coverage, so that every hole has a pixel; no piece covers the whole
    picture."""
    target = rng.uniform(cfg.min_coverage, cfg.max_coverage) * height * width
    limit = cfg.max_coverage * height * width
    hole = np.zeros((height, width), np.uint8)
    covered, misses = 0, 0
    while covered < target and misses < MAX_MISSES:
        for start, end, thickness in _shape(rng, height, width):
            drawn = hole.copy()
            if thickness == cv2.FILLED:
                cv2.rectangle(drawn, start, end, 1, cv2.FILLED)
            else:
                cv2.line(drawn, start, end, 1, thickness)
            overshoots = cv2.countNonZero(drawn) > limit
            if overshoots and (covered or misses < MAX_MISSES - 1):  # an empty hole takes its last chance
                misses += 1
                break  # the rest of this stroke would start from a segment not drawn
            hole, covered = drawn, cv2.countNonZero(drawn)
            if covered >= target:
                break
    return hole.astype(bool)


def square(rng: np.random.Generator, height: int, width: int, cfg: MaskConfig) -> np.ndarray:
    """A square hole (H, W) bool of side uniform in [min_size, max_size], placed uniformly."""
    side = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
    hole = np.zeros((height, width), bool)
    hole[top : top + side, left : left + side] = True
    return hole


def mixed(rng: np.random.Generator, height: int, width: int, cfg: MaskConfig) -> np.ndarray:
    """A square on a `square_share` of the images, strokes on the others."""
    if rng.random() < cfg.square_share:
        return square(rng, height, width, cfg)
    return strokes(rng, height, width, cfg)


# The families drawn image by image, each image from its own generator: kind → (rng, height, width, cfg) → hole
PER_IMAGE = {"strokes": strokes, "mixed": mixed}
KINDS = ("random", "diagonal", *PER_IMAGE)


def _per_image(cfg: MaskConfig, rngs: list[np.random.Generator], height: int, width: int) -> torch.Tensor:
    """Masks (N, 1, H, W) of a PER_IMAGE family, image i drawn from rngs[i]."""
    holes = [PER_IMAGE[cfg.kind](rng, height, width, cfg) for rng in rngs]
    return torch.from_numpy(np.stack(holes)[:, None].astype(np.float32))


def random_masks(n: int, height: int, width: int, cfg: MaskConfig, generator: torch.Generator) -> torch.Tensor:
    """Fresh holes for a training batch, drawn from (and advancing) `generator`."""
    if cfg.kind in PER_IMAGE:  # each image's numpy generator seeded from the torch one
        seeds = torch.randint(2**62, (n,), generator=generator).tolist()
        return _per_image(cfg, [np.random.default_rng(seed) for seed in seeds], height, width)
    return _draw(cfg, torch.rand(n, 3, generator=generator, dtype=torch.float64), height, width)


def fixed_masks(
    indices: torch.Tensor | np.ndarray, height: int, width: int, cfg: MaskConfig, seed: int
) -> torch.Tensor:
    """The holes of the images at these dataset indices: a pure function of (seed, index)."""
    rngs = [np.random.default_rng([seed, int(i)]) for i in np.asarray(indices)]
    if cfg.kind in PER_IMAGE:
        return _per_image(cfg, rngs, height, width)
    uniforms = np.stack([rng.random(3) for rng in rngs])
    return _draw(cfg, torch.from_numpy(uniforms.reshape(-1, 3)), height, width)


def apply_holes(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The network's view of the image: hole pixels set to 0."""
    return images * (1 - masks)
