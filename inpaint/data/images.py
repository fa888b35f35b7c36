"""Pictures as pixels: uint8 arrays (N,H,W,3) to the model's float tensors and back."""

from __future__ import annotations

import numpy as np
import torch


def to_float_images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 images (N,H,W,3) → float32 (N,3,H,W) in [0,1]: the one place pixels become the model's tensors.

    One pass reorders HWC → CHW and converts to float; `from_numpy` then shares that memory."""
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)).div_(255)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """float (N,3,H,W) in [0,1] → uint8 images (N,H,W,3), rounded: the way back to pictures and files."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
