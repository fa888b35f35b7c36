"""ConvMixer (Trockman & Kolter, "Patches Are All You Need?"): a patch stem, then blocks of a large-kernel
depthwise conv (with a skip) and a pointwise conv, at one resolution throughout, so that every position sees
a wide context early. The fused U-Net adds its features to its own at the bottleneck.
"""

from __future__ import annotations

import torch
from torch import nn

from inpaint.kernels import DepthwiseConv2d


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def conv_mixer(in_ch: int, dim: int, depth: int, kernel_size: int, patch_size: int, scale: int) -> nn.Sequential:
    """A ConvMixer whose output is at 1/`scale` of the input size: the stem's stride is `patch_size` (which
    divides `scale`), then average-pooled by what is left."""
    return nn.Sequential(
        nn.Conv2d(in_ch, dim, kernel_size=patch_size, stride=patch_size),
        nn.GELU(),
        nn.BatchNorm2d(dim),
        *[
            nn.Sequential(
                Residual(
                    nn.Sequential(
                        DepthwiseConv2d(dim, kernel_size),
                        nn.GELU(),
                        nn.BatchNorm2d(dim),
                    )
                ),
                nn.Conv2d(dim, dim, kernel_size=1),
                nn.GELU(),
                nn.BatchNorm2d(dim),
            )
            for _ in range(depth)
        ],
        nn.AvgPool2d(scale // patch_size),
    )
