"""Square crops of pictures of any size, made in the workers' batch path from encoded pictures.

Training takes a fresh random crop of every picture each epoch, mirrored left-right half the time; validation
takes one fixed crop per picture. Both are pure functions of (seed, epoch, the picture's index), not of the
order batches arrive in, so a restarted epoch crops the same and every validation sees the same crops. A
picture smaller than the crop is enlarged to it first (`enlarge_to`), where the data config keeps such pictures.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from inpaint.data.images import decode_image

CROP_STREAM = 0x43524F50  # keeps crop draws apart from the hole draws seeded by the same (seed, index)


def enlarge_to(pixels: np.ndarray, crop: int) -> np.ndarray:
    """`pixels` (H, W, 3) scaled up (bicubic, aspect kept) until its shorter side is `crop`; as is if it already is."""
    height, width = pixels.shape[:2]
    if min(height, width) >= crop:
        return pixels
    scale = crop / min(height, width)
    size = (max(crop, round(width * scale)), max(crop, round(height * scale)))  # cv2's (width, height)
    return cv2.resize(pixels, size, interpolation=cv2.INTER_CUBIC)


def crop_picture(pixels: np.ndarray, crop: int, rng: np.random.Generator, mirror: bool) -> np.ndarray:
    """A `crop`×`crop` window of `pixels` at a place drawn from `rng`, mirrored left-right if `mirror` and a
    coin from `rng` says so."""
    pixels = enlarge_to(pixels, crop)
    height, width = pixels.shape[:2]
    top, left, flip = rng.integers(height - crop + 1), rng.integers(width - crop + 1), rng.random() < 0.5
    window = pixels[top : top + crop, left : left + crop]
    return window[:, ::-1] if mirror and flip else window


def crop_rng(seed: int, index: int, epoch: int | None) -> np.random.Generator:
    """The draws of one picture's crop: training's move on with the epoch, validation's (epoch None) never do."""
    return np.random.default_rng([CROP_STREAM, seed, index] + ([] if epoch is None else [epoch]))


def crop_batch(
    blobs: Sequence[bytes], names: Sequence[str], index: Sequence[int], crop: int, seed: int, epoch: int | None
) -> np.ndarray:
    """Decode each encoded picture and crop it: uint8 (N, crop, crop, 3). `epoch` None gives validation's fixed
    crops; a number, that training epoch's random, mirrored ones."""
    out = np.empty((len(blobs), crop, crop, 3), dtype=np.uint8)
    for i, (blob, name, position) in enumerate(zip(blobs, names, index, strict=True)):
        pixels = decode_image(bytes(blob), str(name))
        out[i] = crop_picture(pixels, crop, crop_rng(seed, int(position), epoch), mirror=epoch is not None)
    return out
