"""The networks: the `model.*` config, and the network it builds.

- `network.py`: `InpaintingNetwork`, the type every network is (its size multiple, its training scale);
- `blocks.py`: the U-Net's blocks and its down- and upsamplings, by name;
- `convmixer.py`: the ConvMixer;
- `unet.py`: the U-Net of any depth (`UNet`) and the one fused with a ConvMixer (`FusedUNet`);
- `cost.py`: what a network costs: its parameters, its training FLOPs per image;
- `prefill.py`: what it sees in the hole: zeros, or OpenCV's fill that it then corrects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inpaint.models.blocks import ACTIVATIONS, BLOCKS, DOWNSAMPLINGS, NORMS, UPSAMPLINGS
from inpaint.models.cost import count_parameters, forward_backward_flops
from inpaint.models.network import InpaintingNetwork, TrainScale
from inpaint.models.prefill import PREFILLS, prefill_holes
from inpaint.models.unet import FusedUNet, UNet

__all__ = [
    "FusedUNet",
    "InpaintingNetwork",
    "ModelConfig",
    "TrainScale",
    "UNet",
    "LEGACY_MODEL",
    "build_model",
    "count_parameters",
    "forward_backward_flops",
    "model_input",
]

VARIANTS = ("unet", "fused")
FUSIONS = ("concat", "add")
FUSION_SCALES = ("bottleneck", "all")
# What each key added after the first saved configs meant before it existed: today's network. A saved config
# (a checkpoint's, a registered model's run, a resumed run's) that lacks one gets this value, not the
# default of the day (`config.from_dict`), so that it still builds its network when the defaults change.
LEGACY_MODEL = {
    "block": "plain",
    "blocks_per_level": 1,
    "decoder_blocks": 0,
    "downsampling": "maxpool",
    "upsampling": "transposed",
    "norm": "batch",
    "activation": "relu",
    "fusion_scales": "bottleneck",
    "bottleneck_dilations": [1],
    "prefill": "none",
}


@dataclass
class ModelConfig:
    variant: str = "fused"  # "unet" (vanilla) or "fused" (U-Net + ConvMixer)
    widths: list[int] = field(default_factory=lambda: [64, 128, 256])  # channels per level: at 1, 1/2, 1/4 … size
    block: str = "plain"  # each level's block (blocks.BLOCKS)
    blocks_per_level: int = 1  # the first changes the width, the others keep it
    decoder_blocks: int = 0  # blocks after each upsampling and its skip (the paper's decoder has none)
    downsampling: str = "maxpool"  # blocks.DOWNSAMPLINGS
    upsampling: str = "transposed"  # blocks.UPSAMPLINGS
    norm: str = "batch"  # blocks.NORMS: the residual and Fourier blocks' (the paper's block has none)
    activation: str = "relu"  # blocks.ACTIVATIONS: every block's but NAFNet's (its own gate)
    bottleneck_dilations: list[int] = field(default_factory=lambda: [1])  # the bottleneck's blocks', cycled
    dropout: float = 0.0  # the paper's code uses 0.5 after every pooling and upsampling (configs/paper.yaml)
    mask_channel: bool = True  # feed the hole mask as a 4th input channel (the paper does not)
    fusion: str = "concat"  # the paper's text: concat + 1×1 conv; its code: "add"
    mixer_dim: int = 256
    mixer_depth: int = 2
    mixer_kernel_size: int = 5
    mixer_patch_size: int = 2  # the stem's stride, a power of 2 up to size_multiple; then pooled to the bottleneck
    fusion_scales: str = "bottleneck"  # where the mixer's features join: the bottleneck, or "all" (every skip too)
    prefill: str = "none"  # the hole as the network sees it: zeros, or OpenCV's "telea" / "ns" fill that it corrects

    @property
    def size_multiple(self) -> int:
        """What the input's sides must be a multiple of: the bottleneck's scale, 2 to the downsamplings."""
        return 2 ** (len(self.widths) - 1)

    @property
    def in_channels(self) -> int:
        return 4 if self.mask_channel else 3

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot build a model."""
        choices = [("variant", VARIANTS), ("fusion", FUSIONS), ("fusion_scales", FUSION_SCALES)]
        choices += [("block", tuple(BLOCKS)), ("norm", tuple(NORMS)), ("activation", tuple(ACTIVATIONS))]
        choices += [("downsampling", tuple(DOWNSAMPLINGS)), ("upsampling", tuple(UPSAMPLINGS))]
        choices += [("prefill", tuple(PREFILLS))]
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        # one level would be a plain conv net with no bottleneck, nothing a U-Net's skips join
        if len(self.widths) < 2 or min(self.widths) < 1:
            raise ValueError(f"model.widths must be 2 or more positive channel counts (levels), got {self.widths}")
        if self.blocks_per_level < 1:
            raise ValueError(f"model.blocks_per_level must be at least 1, got {self.blocks_per_level}")
        if self.decoder_blocks < 0:
            raise ValueError(f"model.decoder_blocks must be 0 or more, got {self.decoder_blocks}")
        if not self.bottleneck_dilations or min(self.bottleneck_dilations) < 1:
            raise ValueError(
                f"model.bottleneck_dilations must be 1 or more positive dilations, got {self.bottleneck_dilations}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        patches = tuple(2**k for k in range(len(self.widths)))  # the divisors of size_multiple
        if self.mixer_patch_size not in patches:
            raise ValueError(
                f"model.mixer_patch_size must be one of {patches} with {len(self.widths)} model.widths "
                f"(a divisor of the bottleneck's scale {self.size_multiple}), got {self.mixer_patch_size}"
            )
        if self.mixer_depth < 1 or self.mixer_dim < 1:
            raise ValueError("model.mixer_depth and model.mixer_dim must be at least 1")
        if self.mixer_kernel_size < 1 or self.mixer_kernel_size % 2 == 0:
            raise ValueError(f"model.mixer_kernel_size must be odd and positive, got {self.mixer_kernel_size}")


def build_model(cfg: ModelConfig) -> InpaintingNetwork:
    """The network a config describes."""
    cfg.validate()
    return FusedUNet(cfg) if cfg.variant == "fused" else UNet(cfg)


def model_input(masked: torch.Tensor, mask: torch.Tensor, prefill: str = "none") -> torch.Tensor:
    """Stack a masked RGB batch (N, 3, H, W), its hole pixels filled as `model.prefill` says, and its mask
    (N, 1, H, W) into the (N, 4, H, W) model input."""
    return torch.cat([prefill_holes(masked, mask, prefill), mask.to(masked.dtype)], dim=1)
