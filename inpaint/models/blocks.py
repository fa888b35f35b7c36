"""The U-Net's pieces, each kind chosen by name (`model.block`, `model.downsampling`, `model.upsampling`,
`model.norm`, `model.activation`): a new block or a new way to up- or downsample is one more entry in its table.

The first entries are the paper's (umar07/image-inpainting, Keras): one 3×3 conv + ReLU per level; max-pool
then BatchNorm then dropout on the way down; a transposed conv on the way up. The others are what image
restoration networks use: residual blocks (EDSR, DnCNN-style U-Nets), NAFNet's gated block, LaMa's fast
Fourier convolution (its global branch sees the whole picture in one layer), strided convs, and
interpolation or pixel shuffle followed by a conv.

A block is built as `BLOCKS[name](in_ch, out_ch, layers, dilation)`: `layers` makes the norm and activation
layers `model.norm` and `model.activation` name, `dilation` widens its 3×3 convs (the bottleneck's,
`model.bottleneck_dilations`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from inpaint.kernels import DepthwiseConv2d

NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    "group": lambda channels: nn.GroupNorm(math.gcd(32, channels), channels),  # 32 groups, fewer for few channels
    "none": lambda channels: nn.Identity(),
}
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
}


@dataclass(frozen=True)
class Layers:
    """The norm and activation a block's convs are followed by (`model.norm`, `model.activation`)."""

    norm: str = "batch"
    activation: str = "relu"

    def norm_layer(self, channels: int) -> nn.Module:
        return NORMS[self.norm](channels)

    def act(self) -> nn.Module:
        return ACTIVATIONS[self.activation]()

    def conv3x3(self, in_ch: int, out_ch: int, dilation: int = 1) -> nn.Conv2d:
        """A "same" 3×3 conv; no bias where a norm follows (it would cancel it)."""
        return nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=self.norm == "none")


def plain_block(in_ch: int, out_ch: int, layers: Layers, dilation: int = 1) -> nn.Module:
    """The paper's level: one 3×3 conv and its activation (ReLU), no norm."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation), layers.act())


class ResidualBlock(nn.Module):
    """Two 3×3 convs, each normalised, with a skip around them (a 1×1 projection where the width changes),
    then the activation: the block of EDSR and of most restoration U-Nets."""

    def __init__(self, in_ch: int, out_ch: int, layers: Layers, dilation: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            layers.conv3x3(in_ch, out_ch, dilation),
            layers.norm_layer(out_ch),
            layers.act(),
            layers.conv3x3(out_ch, out_ch, dilation),
            layers.norm_layer(out_ch),
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        self.act = layers.act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels at every pixel (NAFNet's LayerNorm2d); free under channels_last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleGate(nn.Module):
    """NAFNet's activation: one half of the channels times the other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """NAFNet's block (Chen et al. 2022): a gated depthwise-conv branch with simplified channel attention,
    then a gated pointwise feed-forward, each residual with a learnt scale that starts at 0. It has its own
    norm (per-pixel LayerNorm) and gate in place of `model.norm` and `model.activation`."""

    def __init__(self, in_ch: int, out_ch: int, layers: Layers, dilation: int = 1) -> None:
        super().__init__()
        c = out_ch
        self.project = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        # inpaint.kernels' depthwise conv has the faster CPU backward, but no dilation
        depthwise = (
            DepthwiseConv2d(2 * c, 3)
            if dilation == 1
            else nn.Conv2d(2 * c, 2 * c, 3, padding=dilation, dilation=dilation, groups=2 * c)
        )
        self.mix = nn.Sequential(ChannelNorm(c), nn.Conv2d(c, 2 * c, 1), depthwise, SimpleGate())
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))
        self.mix_out = nn.Conv2d(c, c, 1)
        self.feed_forward = nn.Sequential(ChannelNorm(c), nn.Conv2d(c, 2 * c, 1), SimpleGate(), nn.Conv2d(c, c, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        y = self.mix(x)
        x = x + self.beta * self.mix_out(y * self.attention(y))
        return x + self.gamma * self.feed_forward(x)


class FourierUnit(nn.Module):
    """LaMa's Fourier unit (Suvorov et al. 2022): a 1×1 conv, norm and activation on the picture's 2-D
    spectrum (real and imaginary parts stacked as channels), so that every output pixel sees every input
    pixel. In fp32 whatever the autocast: torch.fft has no bf16 CPU kernels."""

    def __init__(self, channels: int, layers: Layers) -> None:
        super().__init__()
        self.spectral = nn.Sequential(
            nn.Conv2d(2 * channels, 2 * channels, 1, bias=layers.norm == "none"),
            layers.norm_layer(2 * channels),
            layers.act(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        with torch.autocast("cpu", enabled=False):
            spectrum = torch.fft.rfft2(x.float(), norm="ortho")
            real, imag = self.spectral(torch.cat([spectrum.real, spectrum.imag], dim=1)).chunk(2, dim=1)
            return torch.fft.irfft2(torch.complex(real, imag), s=(height, width), norm="ortho").to(x.dtype)


class FourierBlock(nn.Module):
    """A residual block whose first conv has a global branch beside it: a 1×1 conv then a `FourierUnit`
    (LaMa's fast Fourier convolution, with all channels in both branches)."""

    def __init__(self, in_ch: int, out_ch: int, layers: Layers, dilation: int = 1) -> None:
        super().__init__()
        self.local = layers.conv3x3(in_ch, out_ch, dilation)
        self.fourier = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1), FourierUnit(out_ch, layers))
        self.body = nn.Sequential(
            layers.norm_layer(out_ch), layers.act(), layers.conv3x3(out_ch, out_ch, dilation), layers.norm_layer(out_ch)
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        self.act = layers.act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(self.local(x) + self.fourier(x)) + self.skip(x))


def maxpool_down(channels: int, dropout: float) -> list[nn.Module]:
    """The paper's way down: 2× max-pool, then BatchNorm and dropout of the pooled features."""
    return [nn.MaxPool2d(2), nn.BatchNorm2d(channels), nn.Dropout(dropout)]


def stride_down(channels: int, dropout: float) -> list[nn.Module]:
    """A learnt way down: a 3×3 conv of stride 2, then dropout (the level's block normalises)."""
    return [nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.Dropout(dropout)]


def transposed_up(in_ch: int, out_ch: int) -> nn.Module:
    """The paper's way up: a transposed conv, kernel 3, stride 2, output_padding 1, which exactly doubles the
    size, like Keras' padding="same"."""
    return nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1)


def interpolate_up(mode: str) -> Callable[[int, int], nn.Module]:
    """Interpolate to twice the size, then a 3×3 conv: no transposed conv's checkerboard."""

    def up(in_ch: int, out_ch: int) -> nn.Module:
        return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode), nn.Conv2d(in_ch, out_ch, 3, padding=1))

    return up


def pixelshuffle_up(in_ch: int, out_ch: int) -> nn.Module:
    """A 3×3 conv to 4× the channels at the low size, rearranged into twice the size (ESPCN's sub-pixel conv)."""
    return nn.Sequential(nn.Conv2d(in_ch, 4 * out_ch, 3, padding=1), nn.PixelShuffle(2))


BLOCKS: dict[str, Callable[[int, int, Layers, int], nn.Module]] = {
    "plain": plain_block,
    "residual": ResidualBlock,
    "nafnet": NAFBlock,
    "fourier": FourierBlock,
}
DOWNSAMPLINGS: dict[str, Callable[[int, float], list[nn.Module]]] = {"maxpool": maxpool_down, "stride": stride_down}
UPSAMPLINGS: dict[str, Callable[[int, int], nn.Module]] = {
    "transposed": transposed_up,
    "bilinear": interpolate_up("bilinear"),
    "nearest": interpolate_up("nearest"),
    "pixelshuffle": pixelshuffle_up,
}


def level_blocks(block: str, in_ch: int, out_ch: int, layers: Layers, dilations: list[int]) -> list[nn.Module]:
    """A level's blocks, one per dilation: the first goes from `in_ch` to `out_ch` channels, the rest keep them."""
    widths = [in_ch] + [out_ch] * len(dilations)
    return [BLOCKS[block](i, o, layers, d) for i, o, d in zip(widths[:-1], widths[1:], dilations, strict=True)]


def down_stage(in_ch: int, dropout: float, downsampling: str, blocks: list[nn.Module]) -> nn.Sequential:
    """One level down: halve the size, then the level's blocks. One flat Sequential (the downsampling's
    modules, then the blocks), which is where the paper's networks' checkpoints keep its weights."""
    return nn.Sequential(*DOWNSAMPLINGS[downsampling](in_ch, dropout), *blocks)
