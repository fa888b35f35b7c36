"""The U-Net's pieces, each kind chosen by name (`model.block`, `model.downsampling`, `model.upsampling`):
a new block or a new way to up- or downsample is one more entry in its table.

Today's entries are the paper's (umar07/image-inpainting, Keras): one 3×3 conv + ReLU per level; max-pool
then BatchNorm then dropout on the way down; a transposed conv on the way up.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def plain_block(in_ch: int, out_ch: int) -> nn.Module:
    """The paper's level: one 3×3 conv and a ReLU."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True))


def maxpool_down(channels: int, dropout: float) -> list[nn.Module]:
    """The paper's way down: 2× max-pool, then BatchNorm and dropout of the pooled features."""
    return [nn.MaxPool2d(2), nn.BatchNorm2d(channels), nn.Dropout(dropout)]


def transposed_up(in_ch: int, out_ch: int) -> nn.Module:
    """The paper's way up: a transposed conv, kernel 3, stride 2, output_padding 1, which exactly doubles the
    size, like Keras' padding="same"."""
    return nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1)


BLOCKS: dict[str, Callable[[int, int], nn.Module]] = {"plain": plain_block}
DOWNSAMPLINGS: dict[str, Callable[[int, float], list[nn.Module]]] = {"maxpool": maxpool_down}
UPSAMPLINGS: dict[str, Callable[[int, int], nn.Module]] = {"transposed": transposed_up}


def down_stage(in_ch: int, out_ch: int, dropout: float, block: str, downsampling: str) -> nn.Sequential:
    """One level down: halve the size, then the level's block. One flat Sequential (the downsampling's
    modules, then the block), which is where the paper's networks' checkpoints keep its weights."""
    return nn.Sequential(*DOWNSAMPLINGS[downsampling](in_ch, dropout), BLOCKS[block](in_ch, out_ch))
