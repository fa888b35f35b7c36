"""Filling holes with a trained network: the one path that evaluation, `jobs/inpaint_image.py` and the server
take, so that a picture is filled the same way wherever it is filled.

At the bottom, `model_fill` runs the network on a batch of any H×W: the input replicate-padded up to a
multiple of the network's `size_multiple` (the sides its downsamplings halve), the output cropped back.
Evaluation scores that on tensors. A picture (uint8) is filled in one of two modes:
- "full": the network once over the whole picture;
- "scaled": the network at its training scale around each hole. The network learnt at `model.train_scale`
  (CIFAR-10's 32×32 pictures with 8–16 px square holes, unless its config says otherwise): on a 451×300
  photo a 40×50 hole is three times wider than any hole it has seen, and its receptive field holds little
  but hole, so it paints a flat block where Telea blends. This mode cuts a neighbourhood around each hole
  (each 8-connected group of hole pixels), shrinks it so that the hole is about the training hole's size
  thick (twice its largest distance to a known pixel) with training-picture-sized context, fills that,
  enlarges the fill back, and pastes it into the hole, feathered into OpenCV Telea's fill over the hole's
  outer rim (about one network pixel) so that no seam shows. A hole already thin enough (a 12-px stripe)
  is filled at full resolution in its neighbourhood.

Both modes go through `plan` (the network inputs, `Patch`es), `fill_patches` (one network call per input size,
so that pictures and holes of one size batch together) and `assemble` (pasted into the hole pixels only: the
known pixels come back exactly as given). OpenCV's fills live here too: the scaled mode feathers into Telea's,
the server offers it, and evaluation scores it as a baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from inpaint.data import to_float_images, to_uint8_images
from inpaint.masks import apply_holes
from inpaint.models import InpaintingNetwork, TrainScale, model_input
from inpaint.models.prefill import INPAINT_RADIUS, opencv_fill

MODES = ("scaled", "full")


@torch.no_grad()
def model_fill(model: InpaintingNetwork, masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The network's output for any H×W: the input replicate-padded to a multiple of its size multiple, the
    output cropped back."""
    height, width = masked.shape[-2:]
    multiple = model.size_multiple
    padding = (0, -width % multiple, 0, -height % multiple)
    inputs = F.pad(model_input(masked, mask, model.prefill), padding, mode="replicate")
    return model(inputs)[..., :height, :width]


@torch.no_grad()
def flip_averaged_fill(model: InpaintingNetwork, masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the mean of the network's fill of the image and of its mirror image (mirrored
    back). Twice the compute; the known pixels are the input's either way, once composited."""
    mirrored = model_fill(model, masked.flip(-1), mask.flip(-1)).flip(-1)
    return (model_fill(model, masked, mask) + mirrored) / 2


@dataclass
class Patch:
    """One network input cut from a picture: its window there, the hole pixels it fills, and its pixels at
    network scale."""

    top: int
    left: int
    paste: np.ndarray  # (height, width) bool: the window's hole pixels this patch fills
    masked: torch.Tensor  # (3, h, w) in [0, 1], hole pixels 0, at network scale
    mask: torch.Tensor  # (1, h, w), 1 = hole

    @property
    def scaled(self) -> bool:
        return tuple(self.masked.shape[1:]) != self.paste.shape


def hole_thickness(component: np.ndarray) -> float:
    """How thick a hole is: twice the largest distance from one of its pixels to the nearest known pixel
    (a 40×50 rectangle: 40; a 12-px stripe: 12)."""
    padded = np.pad(component, 1).astype(np.uint8)  # the picture's edge counts as known
    return 2 * float(cv2.distanceTransform(padded, cv2.DIST_L2, 5).max())


def _window_patch(
    image: np.ndarray, hole: np.ndarray, component: np.ndarray, box: tuple[int, int, int, int], scale: float
) -> Patch:
    top, bottom, left, right = box
    crop, crop_hole = image[top:bottom, left:right], hole[top:bottom, left:right]
    height, width = crop_hole.shape
    if scale < 1:
        size = (max(4, round(width * scale)), max(4, round(height * scale)))  # cv2's (width, height)
        known = np.where(crop_hole[..., None], 0, crop).astype(np.uint8)  # the hole's content never leaks in
        crop = cv2.resize(known, size, interpolation=cv2.INTER_AREA)
        crop_hole = cv2.resize(crop_hole.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0  # covers it
    mask = torch.from_numpy(crop_hole[None].astype(np.float32))
    masked = apply_holes(to_float_images(crop[None])[0], mask)
    return Patch(top, left, component[top:bottom, left:right], masked, mask)


def plan(image: np.ndarray, hole: np.ndarray, mode: str, train_scale: TrainScale) -> list[Patch]:
    """The network inputs that fill `hole` (H, W) bool of `image` (H, W, 3) uint8 in `mode` ("full": the whole
    picture; "scaled": a neighbourhood per hole, shrunk until the hole is about `train_scale.hole` px thick
    with as much picture around it as the `train_scale.size` training pictures had)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "full":
        return [_window_patch(image, hole, hole, (0, hole.shape[0], 0, hole.shape[1]), 1.0)]
    count, labels, stats, _ = cv2.connectedComponentsWithStats(hole.astype(np.uint8), connectivity=8)
    patches = []
    for label in range(1, count):
        component = labels == label
        shrink = min(1.0, train_scale.hole / max(hole_thickness(component), 1.0))
        # the context on each side of the hole, in picture pixels, for each axis
        rows, cols = (math.ceil((side - train_scale.hole) / 2 / shrink) for side in train_scale.size)
        left, top, width, height = stats[label, :4]
        box = (*_span(top, height, rows, hole.shape[0]), *_span(left, width, cols, hole.shape[1]))
        patches.append(_window_patch(image, hole, component, box, shrink))
    return patches


def _span(start: int, length: int, margin: int, limit: int) -> tuple[int, int]:
    """A window of `length + 2 * margin` around [start, start + length), within [0, limit): shifted inward at an
    edge rather than cut, so that holes of one size get windows of one size, which batch together."""
    size = min(limit, length + 2 * margin)
    begin = min(max(0, start - margin), limit - size)
    return int(begin), int(begin + size)


def fill_patches(model: InpaintingNetwork, patches: list[Patch], flip_average: bool = False) -> list[torch.Tensor]:
    """The network's fill (3, h, w) of each patch (averaged with its mirror image's if `flip_average`): one
    call per input size, patches of a size stacked."""
    fill = flip_averaged_fill if flip_average else model_fill
    fills: list[torch.Tensor | None] = [None] * len(patches)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, patch in enumerate(patches):
        by_size.setdefault(tuple(patch.masked.shape), []).append(i)
    for indices in by_size.values():
        masked = torch.stack([patches[i].masked for i in indices])
        mask = torch.stack([patches[i].mask for i in indices])
        for i, filled in zip(indices, fill(model, masked, mask), strict=True):
            fills[i] = filled
    return fills  # type: ignore[return-value]


def _feathered(patch: Patch, filled: np.ndarray, window: np.ndarray, window_hole: np.ndarray) -> np.ndarray:
    """A scaled patch's fill (window-sized, float RGB in [0, 1]) blended into Telea's over the hole's rim."""
    enlarged = cv2.resize(filled, window_hole.shape[::-1], interpolation=cv2.INTER_CUBIC).clip(0, 1)
    telea = cv2.inpaint(window, window_hole.astype(np.uint8), INPAINT_RADIUS, cv2.INPAINT_TELEA) / 255.0
    rim = window_hole.shape[0] / patch.masked.shape[1]  # one network pixel, in picture pixels
    inside = cv2.distanceTransform(window_hole.astype(np.uint8), cv2.DIST_L2, 3)
    alpha = np.clip(inside / max(rim, 1.0), 0, 1)[..., None]
    return alpha * enlarged + (1 - alpha) * telea


def assemble(image: np.ndarray, hole: np.ndarray, patches: list[Patch], fills: list[torch.Tensor]) -> np.ndarray:
    """`image` with each patch's fill pasted into its hole pixels; every other pixel unchanged."""
    out = image.copy()
    for patch, fill in zip(patches, fills, strict=True):
        height, width = patch.paste.shape
        rows, cols = slice(patch.top, patch.top + height), slice(patch.left, patch.left + width)
        if patch.scaled:
            filled = fill.permute(1, 2, 0).numpy().astype(np.float32)
            pixels = (_feathered(patch, filled, image[rows, cols], hole[rows, cols]) * 255).round().astype(np.uint8)
        else:
            pixels = to_uint8_images(fill[None])[0]
        out[rows, cols][patch.paste] = pixels[patch.paste]
    return np.where(hole[..., None], out, image)


def fill_many(
    model: InpaintingNetwork, items: list[tuple[np.ndarray, np.ndarray, str]], flip_average: bool = False
) -> list[np.ndarray]:
    """Each (image uint8 (H, W, 3), hole bool (H, W), mode) filled, the scaled mode at the network's training
    scale; the network inputs of all of them that share a size go through it together (what the server's
    dynamic batching relies on)."""
    plans = [plan(image, hole, mode, model.train_scale) for image, hole, mode in items]
    fills = fill_patches(model, [patch for patches in plans for patch in patches], flip_average)
    out, start = [], 0
    for (image, hole, _), patches in zip(items, plans, strict=True):
        out.append(assemble(image, hole, patches, fills[start : start + len(patches)]))
        start += len(patches)
    return out


def inpaint_image(
    model: InpaintingNetwork, image: np.ndarray, hole: np.ndarray, *, mode: str = "full", flip_average: bool = False
) -> np.ndarray:
    """`image` uint8 (H, W, 3) with the pixels where `hole` (H, W) is true filled by `model` in `mode` (averaged
    with its mirror image's fill if `flip_average`); the others unchanged."""
    return fill_many(model, [(image, hole, mode)], flip_average)[0]


def telea_fill(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """OpenCV Telea's fill of one picture, the known pixels unchanged: evaluation's `telea` baseline, what the
    model is measured against."""
    target = to_float_images(image[None])
    mask = torch.from_numpy(hole[None, None]).float()
    filled = to_uint8_images(opencv_fill(apply_holes(target, mask), mask, cv2.INPAINT_TELEA))[0]
    return np.where(hole[..., None], filled, image)
