"""The paper's networks: a shallow U-Net, a ConvMixer encoder, and the U-Net fused with it.

Every model takes one tensor of shape (N, 4, H, W): the masked RGB image (hole pixels 0) and the mask
(1 = hole), and returns RGB in [0, 1] of shape (N, 3, H, W). H and W must be divisible by 4 (two 2×
downsamplings). Whether the mask channel is actually seen is a config switch (`mask_channel`): off
reproduces the paper, whose networks only see the RGB image.

The layout follows the paper's code (umar07/image-inpainting, Keras): one 3×3 conv per level, max-pool
then BatchNorm then dropout on the way down, transposed convs with additive skips on the way up, a
3×3 conv + sigmoid head. The fused model adds a ConvMixer's features at the 8×8 bottleneck.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from inpaint.kernels import DepthwiseConv2d

VARIANTS = ("unet", "fused")
FUSIONS = ("concat", "add")


@dataclass
class ModelConfig:
    variant: str = "fused"  # "unet" (vanilla) or "fused" (U-Net + ConvMixer)
    widths: list[int] = field(default_factory=lambda: [64, 128, 256])  # channels at 1, 1/2, 1/4 size
    dropout: float = 0.0  # the paper's code uses 0.5 after every pooling and upsampling (configs/paper.yaml)
    mask_channel: bool = True  # feed the hole mask as a 4th input channel (the paper does not)
    fusion: str = "concat"  # the paper's text: concat + 1×1 conv; its code: "add"
    mixer_dim: int = 256
    mixer_depth: int = 2
    mixer_kernel_size: int = 5
    mixer_patch_size: int = 2  # 1, 2 or 4: the stem's stride, then average-pooled down to 1/4 size

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot build a model."""
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"model.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"model.widths must be 3 positive channel counts, got {self.widths}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.mixer_patch_size not in (1, 2, 4):
            raise ValueError(f"model.mixer_patch_size must be 1, 2 or 4, got {self.mixer_patch_size}")
        if self.mixer_depth < 1 or self.mixer_dim < 1:
            raise ValueError("model.mixer_depth and model.mixer_dim must be at least 1")
        if self.mixer_kernel_size < 1 or self.mixer_kernel_size % 2 == 0:
            raise ValueError(f"model.mixer_kernel_size must be odd and positive, got {self.mixer_kernel_size}")


def conv_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True))


def down(in_ch: int, out_ch: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.MaxPool2d(2), nn.BatchNorm2d(in_ch), nn.Dropout(dropout), conv_relu(in_ch, out_ch))


def up(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    # kernel 3, stride 2, output_padding 1: exactly doubles the size, like Keras' padding="same"
    return nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1)


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def conv_mixer(in_ch: int, dim: int, depth: int, kernel_size: int, patch_size: int) -> nn.Sequential:
    """ConvMixer (Trockman & Kolter, "Patches Are All You Need?"), pooled down to 1/4 of the input size."""
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
        nn.AvgPool2d(4 // patch_size),
    )


class UNet(nn.Module):
    """The paper's shallow U-Net: two downsamplings, a bottleneck at 1/4 size, additive skips."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        c1, c2, c3 = cfg.widths
        in_ch = 4 if cfg.mask_channel else 3
        self.enc1 = conv_relu(in_ch, c1)  # full size
        self.enc2 = down(c1, c2, cfg.dropout)  # 1/2
        self.bottleneck = down(c2, c3, cfg.dropout)  # 1/4
        self.up2 = up(c3, c2)
        self.up1 = up(c2, c1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Sequential(nn.Conv2d(c1, 3, 3, padding=1), nn.Sigmoid())

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The channels this network sees: RGB only, or RGB + mask."""
        if x.shape[1] != 4 or x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"expected (N, 4, H, W) with H, W divisible by 4, got {tuple(x.shape)}")
        return x if self.cfg.mask_channel else x[:, :3]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode: the bottleneck features and the skips, finest first."""
        s1 = self.enc1(self.inputs(x))
        s2 = self.enc2(s1)
        return self.bottleneck(s2), [s1, s2]

    def forward_head(self, z: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decode the bottleneck back to an RGB image in [0, 1]."""
        s1, s2 = skips
        y = self.dropout(self.up2(z) + s2)
        y = self.dropout(self.up1(y) + s1)
        return self.head(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, skips = self.forward_features(x)
        return self.forward_head(z, skips)


class FusedUNet(UNet):
    """The U-Net whose bottleneck is fused with a ConvMixer's features of the same input."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        c3 = cfg.widths[2]
        in_ch = 4 if cfg.mask_channel else 3
        self.mixer = conv_mixer(in_ch, cfg.mixer_dim, cfg.mixer_depth, cfg.mixer_kernel_size, cfg.mixer_patch_size)
        if cfg.fusion == "concat":
            self.fuse = nn.Conv2d(c3 + cfg.mixer_dim, c3, kernel_size=1)
        else:  # "add": project only when the widths differ (the paper's code has both at 256)
            self.fuse = nn.Identity() if cfg.mixer_dim == c3 else nn.Conv2d(cfg.mixer_dim, c3, kernel_size=1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z, skips = super().forward_features(x)
        m = self.mixer(self.inputs(x))
        z = self.fuse(torch.cat([z, m], dim=1)) if self.cfg.fusion == "concat" else z + self.fuse(m)
        return z, skips


def build_model(cfg: ModelConfig) -> UNet:
    """The model a config describes."""
    cfg.validate()
    return FusedUNet(cfg) if cfg.variant == "fused" else UNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_input(masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Stack a masked RGB batch (N, 3, H, W) and its mask (N, 1, H, W) into the (N, 4, H, W) model input."""
    return torch.cat([masked, mask.to(masked.dtype)], dim=1)
