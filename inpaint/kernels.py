"""Faster formulations of layers whose PyTorch CPU backward is slow: the same parameters, the same function.

PyTorch's CPU weight gradient of a depthwise convolution (the ConvMixer's `groups == channels` conv)
takes many times longer than its forward pass and input gradient together, and longer in bf16 than in
fp32 (the figures: docs/performance.md, benchmarks/layers.py). `DepthwiseConv2d` is an `nn.Conv2d` (same weights,
same state-dict keys, so checkpoints and registered models are unchanged) whose training backward
computes that gradient with one reduction compiled by `torch.compile` (with no working C++ compiler it
warns once and runs the reduction eagerly, slower but still ahead of PyTorch's). Inference is plain
`nn.Conv2d`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """∂loss/∂weight of a stride-1 depthwise conv with "same" padding: for each channel and kernel tap, the
    sum over the batch and the image of the output gradient times the input shifted by that tap;
    (C, K·K), accumulated in fp32."""
    pad, (height, width) = kernel_size // 2, grad_out.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    taps = [
        (grad_out * padded[..., i : i + height, j : j + width]).sum((0, 2, 3), dtype=torch.float32)
        for i in range(kernel_size)
        for j in range(kernel_size)
    ]
    return torch.stack(taps, 1)


@functools.cache
def compiled_weight_grad() -> Any:
    """`depthwise_weight_grad` compiled: the K·K reductions become one pass over the two tensors."""
    return torch.compile(depthwise_weight_grad, dynamic=None)


_compiler_failed = False  # set once torch.compile has failed here (no C++ compiler): eager from then on


def weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """`depthwise_weight_grad`, compiled where torch.compile works, else eager (still faster than PyTorch's)."""
    global _compiler_failed
    if not _compiler_failed:
        try:
            return compiled_weight_grad()(x, grad_out, kernel_size)
        except (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError) as err:
            _compiler_failed = True
            logger.warning("torch.compile failed, depthwise weight gradients stay uncompiled: %s", err)
    return depthwise_weight_grad(x, grad_out, kernel_size)


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # the conv in autocast's precision, as nn.Conv2d would run it; the backward reuses what it saw
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        x_c, weight_c = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x_c, weight_c)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        pad = weight.shape[-1] // 2
        with torch.autocast("cpu", enabled=False):
            bias_c = None if bias is None else bias.to(dtype)
            return F.conv2d(x_c, weight_c, bias_c, padding=pad, groups=weight.shape[0])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_c, weight_c = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        channels, _, kernel_size, _ = weight_c.shape
        grad_out = grad_out.to(x_c.dtype)
        with torch.autocast("cpu", enabled=False):
            # the input gradient is the forward conv of the output gradient with the kernel turned 180°
            grad_x = F.conv2d(grad_out, weight_c.flip(-1, -2), padding=kernel_size // 2, groups=channels)
            # in the weight's own strides (channels_last or not), which DDP's gradient buckets expect
            grad_weight = torch.empty_like(weight_c, dtype=weight_dtype).copy_(
                weight_grad(x_c, grad_out, kernel_size).view(weight_c.shape)
            )
            grad_bias = None if bias_dtype is None else grad_out.sum((0, 2, 3), dtype=torch.float32).to(bias_dtype)
        return grad_x.to(x_dtype), grad_weight, grad_bias


class DepthwiseConv2d(nn.Conv2d):
    """`nn.Conv2d(channels, channels, kernel_size, groups=channels, padding="same")`, odd kernel, whose
    training backward on one thread is `_DepthwiseConv`'s."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"DepthwiseConv2d needs an odd kernel size, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, groups=channels, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One torch thread (a 1-CPU Ray worker, the default) is where the compiled reduction was measured
        # faster in a whole training step; with more threads PyTorch's parallel backward won (docs/performance.md).
        if self.training and torch.is_grad_enabled() and x.device.type == "cpu" and torch.get_num_threads() == 1:
            return _DepthwiseConv.apply(x, self.weight, self.bias)
        return super().forward(x)  # inference (and torch.export): plain nn.Conv2d
