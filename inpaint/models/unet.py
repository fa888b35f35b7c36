"""The U-Net of any depth, and the U-Net fused with a ConvMixer.

`len(model.widths)` levels, each half the size of the one above: `len(widths) - 1` downsamplings, so sides
must be multiples of 2 to that power. The paper's layout (umar07/image-inpainting, Keras) has three: one 3×3
conv per level, max-pool then BatchNorm then dropout on the way down, transposed convs with additive skips
on the way up, a 3×3 conv + sigmoid head. The fused model adds a ConvMixer's features, pooled to the
bottleneck's size, at the bottleneck. Whether the mask channel is seen at all is `model.mask_channel`: off
reproduces the paper, whose networks only see the RGB image. The family around that layout: the blocks and
the up- and downsamplings of `blocks.py`, `model.blocks_per_level` blocks a level, dilated bottleneck blocks,
the ConvMixer's features joined with every skip too (`model.fusion_scales: all`), and, with `model.prefill`, a
residual head: the output is the input's prefilled RGB plus a correction, zero at initialisation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from inpaint.models.blocks import UPSAMPLINGS, Layers, down_stage, level_blocks
from inpaint.models.convmixer import conv_mixer
from inpaint.models.network import InpaintingNetwork

if TYPE_CHECKING:
    from inpaint.models import ModelConfig


class UNet(InpaintingNetwork):
    """An encoder-decoder with additive skips and `len(cfg.widths)` levels (widths finest first).

    Its modules are named enc1 … enc{L-1}, bottleneck, up{L-1} … up1 (each followed by dec{level}, its
    `model.decoder_blocks` blocks, where there are any), and built in that order: the names,
    so the state-dict keys, and the order of the parameters (an optimizer state's) that the three-level
    network always had, so that its checkpoints and registered models load and resume."""

    def __init__(self, cfg: ModelConfig) -> None:
        cfg.validate()
        super().__init__(size_multiple=cfg.size_multiple, prefill=cfg.prefill)
        self.cfg = cfg
        widths, levels, layers = cfg.widths, len(cfg.widths), Layers(cfg.norm, cfg.activation)
        first = level_blocks(cfg.block, cfg.in_channels, widths[0], layers, level_dilations(cfg, 1))  # full size
        self.enc1 = first[0] if len(first) == 1 else nn.Sequential(*first)  # one block: the paper's keys
        for level in range(2, levels + 1):  # each at half the size of the level above
            blocks = level_blocks(cfg.block, widths[level - 2], widths[level - 1], layers, level_dilations(cfg, level))
            stage = down_stage(widths[level - 2], cfg.dropout, cfg.downsampling, blocks)
            self.add_module("bottleneck" if level == levels else f"enc{level}", stage)
        for level in range(levels - 1, 0, -1):  # back up to level's size and width
            self.add_module(f"up{level}", UPSAMPLINGS[cfg.upsampling](widths[level], widths[level - 1]))
            if cfg.decoder_blocks:  # the upsampled features and the skip, refined at that level
                width, dilations = widths[level - 1], [1] * cfg.decoder_blocks
                self.add_module(f"dec{level}", nn.Sequential(*level_blocks(cfg.block, width, width, layers, dilations)))
        self.dropout = nn.Dropout(cfg.dropout)
        if self.corrects_prefill:  # a correction to the prefilled input: nothing at first, so OpenCV's fill
            self.head = nn.Conv2d(widths[0], 3, 3, padding=1)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Sequential(nn.Conv2d(widths[0], 3, 3, padding=1), nn.Sigmoid())

    @property
    def levels(self) -> int:
        return len(self.cfg.widths)

    @property
    def corrects_prefill(self) -> bool:
        return self.cfg.prefill != "none"

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
        """Decode the bottleneck back to an RGB image in [0, 1], or to the correction of the prefilled one."""
        y = z
        for level in range(self.levels - 1, 0, -1):
            y = self.dropout(getattr(self, f"up{level}")(y) + skips[level - 1])
            if self.cfg.decoder_blocks:
                y = getattr(self, f"dec{level}")(y)
        return self.head(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, skips = self.forward_features(x)
        if self.corrects_prefill:
            return (x[:, :3] + self.forward_head(z, skips)).clamp(0, 1)
        return self.forward_head(z, skips)


def level_dilations(cfg: ModelConfig, level: int) -> list[int]:
    """The dilation of each of a level's `model.blocks_per_level` blocks: the bottleneck's cycle through
    `model.bottleneck_dilations`, the other levels' are 1."""
    dilations = cfg.bottleneck_dilations if level == len(cfg.widths) else [1]
    return [dilations[i % len(dilations)] for i in range(cfg.blocks_per_level)]


def fusion_layer(fusion: str, width: int, mixer_dim: int) -> nn.Module:
    """What joins the ConvMixer's features to `width` U-Net channels: concat + a 1×1 conv back to `width`,
    or add, projected by a 1×1 conv only when the widths differ (the paper's code has both at 256)."""
    if fusion == "concat":
        return nn.Conv2d(width + mixer_dim, width, kernel_size=1)
    return nn.Identity() if mixer_dim == width else nn.Conv2d(mixer_dim, width, kernel_size=1)


def resample(x: torch.Tensor, factor: int, scale: int) -> torch.Tensor:
    """Features at 1/`factor` of the input size brought to 1/`scale` of it: average-pooled down, or
    bilinearly upsampled (both powers of 2, so the sizes match exactly)."""
    if scale > factor:
        return F.avg_pool2d(x, scale // factor)
    if scale < factor:
        return F.interpolate(x, scale_factor=factor // scale, mode="bilinear", align_corners=False)
    return x


class FusedUNet(UNet):
    """The U-Net fused with a ConvMixer's features of the same input: at the bottleneck, and with
    `model.fusion_scales: all` also with every skip, so at every decoder level's size."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        mixer = (cfg.mixer_dim, cfg.mixer_depth, cfg.mixer_kernel_size, cfg.mixer_patch_size)
        self.mixer = conv_mixer(cfg.in_channels, *mixer, scale=cfg.size_multiple)  # to the bottleneck's size
        self.fuse = fusion_layer(cfg.fusion, cfg.widths[-1], cfg.mixer_dim)
        if cfg.fusion_scales == "all":
            for level in range(1, self.levels):
                self.add_module(f"fuse{level}", fusion_layer(cfg.fusion, cfg.widths[level - 1], cfg.mixer_dim))

    def join(self, fuse: nn.Module, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return fuse(torch.cat([z, m], dim=1)) if self.cfg.fusion == "concat" else z + fuse(m)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z, skips = super().forward_features(x)
        features = self.mixer[:-1](self.inputs(x))  # at 1/patch size; the mixer's last layer pools to the bottleneck
        z = self.join(self.fuse, z, self.mixer[-1](features))
        if self.cfg.fusion_scales == "all":
            patch = self.cfg.mixer_patch_size
            skips = [
                self.join(getattr(self, f"fuse{level}"), skip, resample(features, patch, 2 ** (level - 1)))
                for level, skip in enumerate(skips, start=1)
            ]
        return z, skips
