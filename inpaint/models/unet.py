"""The U-Net of any depth, and the U-Net fused with a ConvMixer.

`len(model.widths)` levels, each half the size of the one above: `len(widths) - 1` downsamplings, so sides
must be multiples of 2 to that power. The paper's layout (umar07/image-inpainting, Keras) has three: one 3×3
conv per level, max-pool then BatchNorm then dropout on the way down, transposed convs with additive skips
on the way up, a 3×3 conv + sigmoid head. The fused model adds a ConvMixer's features, pooled to the
bottleneck's size, at the bottleneck. Whether the mask channel is seen at all is `model.mask_channel`: off
reproduces the paper, whose networks only see the RGB image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from inpaint.models.blocks import BLOCKS, UPSAMPLINGS, down_stage
from inpaint.models.convmixer import conv_mixer
from inpaint.models.network import InpaintingNetwork

if TYPE_CHECKING:
    from inpaint.models import ModelConfig


class UNet(InpaintingNetwork):
    """An encoder-decoder with additive skips and `len(cfg.widths)` levels (widths finest first).

    Its modules are named enc1 … enc{L-1}, bottleneck, up{L-1} … up1, and built in that order: the names,
    so the state-dict keys, and the order of the parameters (an optimizer state's) that the three-level
    network always had, so that its checkpoints and registered models load and resume."""

    def __init__(self, cfg: ModelConfig) -> None:
        cfg.validate()
        super().__init__(size_multiple=cfg.size_multiple)
        self.cfg = cfg
        widths, levels = cfg.widths, len(cfg.widths)
        self.enc1 = BLOCKS[cfg.block](cfg.in_channels, widths[0])  # full size
        for level in range(2, levels + 1):  # each at half the size of the level above
            stage = down_stage(widths[level - 2], widths[level - 1], cfg.dropout, cfg.block, cfg.downsampling)
            self.add_module("bottleneck" if level == levels else f"enc{level}", stage)
        for level in range(levels - 1, 0, -1):  # back up to level's size and width
            self.add_module(f"up{level}", UPSAMPLINGS[cfg.upsampling](widths[level], widths[level - 1]))
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Sequential(nn.Conv2d(widths[0], 3, 3, padding=1), nn.Sigmoid())

    @property
    def levels(self) -> int:
        return len(self.cfg.widths)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The channels this network sees: RGB only, or RGB + mask."""
        self.check_input(x)
        return x if self.cfg.mask_channel else x[:, :3]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode: the bottleneck features and the skips, finest first."""
        skips = [self.enc1(self.inputs(x))]
        for level in range(2, self.levels):
            skips.append(getattr(self, f"enc{level}")(skips[-1]))
        return self.bottleneck(skips[-1]), skips

    def forward_head(self, z: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decode the bottleneck back to an RGB image in [0, 1]."""
        y = z
        for level in range(self.levels - 1, 0, -1):
            y = self.dropout(getattr(self, f"up{level}")(y) + skips[level - 1])
        return self.head(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, skips = self.forward_features(x)
        return self.forward_head(z, skips)


class FusedUNet(UNet):
    """The U-Net whose bottleneck is fused with a ConvMixer's features of the same input."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        bottom = cfg.widths[-1]
        mixer = (cfg.mixer_dim, cfg.mixer_depth, cfg.mixer_kernel_size, cfg.mixer_patch_size)
        self.mixer = conv_mixer(cfg.in_channels, *mixer, scale=cfg.size_multiple)  # to the bottleneck's size
        if cfg.fusion == "concat":
            self.fuse = nn.Conv2d(bottom + cfg.mixer_dim, bottom, kernel_size=1)
        else:  # "add": project only when the widths differ (the paper's code has both at 256)
            self.fuse = nn.Identity() if cfg.mixer_dim == bottom else nn.Conv2d(cfg.mixer_dim, bottom, kernel_size=1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z, skips = super().forward_features(x)
        m = self.mixer(self.inputs(x))
        z = self.fuse(torch.cat([z, m], dim=1)) if self.cfg.fusion == "concat" else z + self.fuse(m)
        return z, skips
