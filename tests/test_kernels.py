"""inpaint.kernels: the fast depthwise conv is the same function as nn.Conv2d, with the same gradients,
and checkpoints written before it existed load and score the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from inpaint.checkpoints import model_from_state
from inpaint.kernels import DepthwiseConv2d, depthwise_weight_grad

CHECKPOINT = Path(__file__).parent / "data" / "checkpoint-7c4ea93.pt"  # written by the code of commit 7c4ea93


@pytest.fixture(autouse=True)
def one_thread():
    """The fast backward runs on one thread (a 1-CPU Ray worker), as training uses it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pair(channels: int, kernel_size: int, bias: bool, channels_last: bool) -> tuple[nn.Conv2d, DepthwiseConv2d]:
    reference = nn.Conv2d(channels, channels, kernel_size, groups=channels, padding="same", bias=bias)
    fast = DepthwiseConv2d(channels, kernel_size)
    if not bias:
        fast.bias = None
    fast.load_state_dict(reference.state_dict())
    if channels_last:
        reference, fast = (m.to(memory_format=torch.channels_last) for m in (reference, fast))
    return reference, fast


def forward_backward(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor, bf16: bool) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = conv(x)
    out.backward(grad.to(out.dtype))
    grads = [x.grad, conv.weight.grad, *([conv.bias.grad] if conv.bias is not None else [])]
    return [out.float(), *(g.float() for g in grads)]


@pytest.mark.parametrize(
    "kernel_size, bias, channels_last, bf16",
    [
        (5, True, False, False),
        (5, True, True, False),
        (3, False, True, False),
        (9, True, True, True),
        (5, True, True, True),
    ],
)
def test_same_outputs_and_gradients_as_nn_conv2d(kernel_size, bias, channels_last, bf16):
    torch.manual_seed(kernel_size)
    reference, fast = pair(24, kernel_size, bias, channels_last)
    x, grad = torch.randn(6, 24, 12, 10), torch.randn(6, 24, 12, 10)
    if channels_last:
        x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    expected = forward_backward(reference, x, grad, bf16)
    got = forward_backward(fast, x, grad, bf16)
    assert fast.weight.grad.stride() == fast.weight.stride()  # the layout DDP's gradient buckets expect
    # bf16: both round their inputs to 8 bits of mantissa, but accumulate in different orders
    tolerance = {"rtol": 2e-2, "atol": 5e-2} if bf16 else {"rtol": 1e-4, "atol": 1e-4}
    for name, want, have in zip(["output", "input grad", "weight grad", "bias grad"], expected, got, strict=False):
        torch.testing.assert_close(have, want, **tolerance, msg=name)


def test_the_weight_gradient_formula_matches_autograd_in_double():
    x, grad = torch.randn(3, 5, 7, 9, dtype=torch.float64), torch.randn(3, 5, 7, 9, dtype=torch.float64)
    weight = torch.randn(5, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.conv2d(x, weight, padding=1, groups=5).backward(grad)
    computed = depthwise_weight_grad(x, grad, 3).view(5, 1, 3, 3)  # accumulated in fp32
    torch.testing.assert_close(computed, weight.grad.float(), rtol=1e-5, atol=1e-5)


def test_inference_is_plain_nn_conv2d():
    reference, fast = pair(8, 5, True, False)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), reference(x), rtol=0, atol=0)


def test_a_checkpoint_from_before_the_fast_kernels_loads_and_scores_the_same():
    state = torch.load(CHECKPOINT, weights_only=True)
    model = model_from_state(state)  # strict load: every key and shape as that commit wrote them
    assert any(isinstance(module, DepthwiseConv2d) for module in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(state["input"]), state["output"], rtol=1e-5, atol=1e-6)


def test_training_on_one_thread_takes_the_fast_backward_and_more_threads_pytorchs():
    _, fast = pair(8, 5, True, False)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    assert type(fast(x).grad_fn).__name__ == "_DepthwiseConvBackward"
    torch.set_num_threads(2)  # (the fixture restores the count)
    assert type(fast(x).grad_fn).__name__ == "ConvolutionBackward0"
