"""What a network costs: its parameter count, and the FLOPs of a training step per image, as
`torch.utils.flop_counter` counts them (each run logs both, `inpaint.train.start_worker`)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

FLOP_BATCH = 2  # images in the counted step: FLOPs are linear in the batch, and 1 would hide BatchNorm's batch


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_backward_flop(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: object,
    _stride: object,
    _padding: object,
    _dilation: object,
    transposed: bool,
    _output_padding: object,
    _groups: int,
    output_mask: list[bool],
    out_shape: object = None,
) -> int:
    """A convolution's backward: the input gradient and the weight gradient each take exactly the
    multiplications of the forward pass. (torch's own formula ignores `groups` and counts the ConvMixer's
    depthwise convs as dense ones: 256 times too many FLOPs.)"""
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * sum(map(bool, output_mask[:2]))


def forward_backward_flops(model: nn.Module, height: int, width: int) -> int:
    """FLOPs per (height × width) image of the forward pass and the backward of a loss, in fp32.

    Counted on a copy in eval mode: the same convolutions and matmuls as training, each run by PyTorch's own
    kernels (the depthwise convs' faster training backward, `inpaint.kernels`, is not one FlopCounterMode
    sees), and the model's own weights, gradients and BatchNorm statistics stay untouched. FlopCounterMode
    has no formula for FFTs: a Fourier block's transforms (O(HW log HW) per channel) are not counted."""
    counted_model = copy.deepcopy(model).float().eval()
    x = torch.rand(FLOP_BATCH, 4, height, width, generator=torch.Generator().manual_seed(0))  # not the global stream
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flop}
    with torch.enable_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        counted_model(x).square().mean().backward()
    return counter.get_total_flops() // FLOP_BATCH
