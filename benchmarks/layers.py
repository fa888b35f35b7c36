"""Every layer of a model, forward and forward+backward, against the matmul peak measured in the same run.

Where a training step's time goes, layer by layer, each timed alone on the input shape it gets inside
the model, in the training precision and layout (bf16 autocast + channels_last for the default recipe)
at one thread, a worker's share. "before" is PyTorch's own layer; "after" is the layer the model now
uses, which differs only where inpaint/kernels.py has a faster formulation (the ConvMixer's depthwise
convs). The FLOPs come from torch.utils.flop_counter (depthwise backward counted with its groups).
A second table times every entry of the model family's tables (inpaint/models/blocks.py: each block kind,
downsampling and upsampling) alone, at the shapes the model's levels give it, in the same precision and
layout, whichever of them the model itself uses (a Fourier block's FFTs are timed there, not counted).

python benchmarks/layers.py --json layers.json                # the default recipe, batch 32
python benchmarks/layers.py --config configs/paper.yaml --set train.batch_size=32
python benchmarks/layers.py --quick                           # CI: a tiny model, seconds
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from common import TINY_MODEL, load_average, machine, matmul_peak, print_table, write_json
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from inpaint.config import load_config
from inpaint.kernels import DepthwiseConv2d
from inpaint.models import ModelConfig, build_model
from inpaint.models.blocks import BLOCKS, DOWNSAMPLINGS, UPSAMPLINGS, Layers
from inpaint.models.cost import conv_backward_flop
from inpaint.train import training_precision

SIZE = 32  # CIFAR-10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML config file (default: the default recipe)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, a worker's share)")
    parser.add_argument("--reps", type=int, default=15, help="timed calls per layer (the median counts)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="CI: tiny model, a few seconds")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.matmul_size, args.matmul_seconds = 2, 256, 0.1
        args.set = [*TINY_MODEL, "train.batch_size=4", *args.set]
    return args


def layer_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, torch.Size]]:
    """Each leaf layer that runs, in the order it runs, with the shape of its input."""
    seen: list[tuple[str, nn.Module, torch.Size]] = []
    hooks = [
        module.register_forward_hook(lambda m, inputs, _, name=name: seen.append((name, m, inputs[0].shape)))
        for name, module in model.named_modules()
        if not list(module.children())
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    return seen


def pytorch_layer(module: nn.Module) -> nn.Module:
    """The layer as plain PyTorch would run it: an nn.Conv2d in place of a DepthwiseConv2d."""
    if not isinstance(module, DepthwiseConv2d):
        return module
    plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, groups=module.groups, padding="same")
    plain.load_state_dict(module.state_dict())
    return (
        plain.to(memory_format=torch.channels_last)
        if module.weight.is_contiguous(memory_format=torch.channels_last) and not module.weight.is_contiguous()
        else plain
    )


def timed(call: Any, reps: int) -> float:
    """Median milliseconds of `call()` after two untimed calls."""
    import time

    call(), call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def measure(module: nn.Module, shape: torch.Size, bf16: bool, channels_last: bool, reps: int) -> dict[str, float]:
    """Forward ms and forward+backward ms of one layer."""
    layout = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    x = torch.rand(shape).contiguous(memory_format=layout).requires_grad_()
    inplace = getattr(module, "inplace", False)  # (the U-Net's ReLUs): on a copy, timed with the layer

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return module(x.clone() if inplace else x)

    grad = torch.rand_like(forward())

    def forward_backward() -> None:
        forward().backward(grad)

    return {"forward_ms": timed(forward, reps), "train_ms": timed(forward_backward, reps)}


def count_flops(module: nn.Module, shape: torch.Size) -> int:
    """FLOPs of the layer's forward+backward, counted on a copy of PyTorch's own layer in eval mode (the useful
    work; running the compiled kernel under FlopCounterMode would also make torch.compile give up on it)."""
    x = torch.rand(shape).requires_grad_()
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counted:
        copy.deepcopy(pytorch_layer(module)).eval()(x.clone()).sum().backward()
    return counted.get_total_flops()


def family_pieces(cfg: ModelConfig, batch: int) -> list[tuple[str, nn.Module, torch.Size]]:
    """Every block kind at the first level (full size, its width) and into the bottleneck (its size, from the
    level above's width), every downsampling of the first level, every upsampling back to it."""
    widths, layers = cfg.widths, Layers(cfg.norm, cfg.activation)
    bottom = SIZE // cfg.size_multiple
    first, into_bottom = (batch, widths[0], SIZE, SIZE), (batch, widths[-2], bottom, bottom)
    pieces = []
    for name, block in BLOCKS.items():
        pieces.append((f"block {name}, level 1", block(widths[0], widths[0], layers, 1), first))
        pieces.append((f"block {name}, bottleneck", block(widths[-2], widths[-1], layers, 1), into_bottom))
    for name, down in DOWNSAMPLINGS.items():
        pieces.append((f"down {name}", nn.Sequential(*down(widths[0], cfg.dropout)), first))
    for name, up in UPSAMPLINGS.items():
        pieces.append((f"up {name}", up(widths[1], widths[0]), (batch, widths[1], SIZE // 2, SIZE // 2)))
    return [(name, module, torch.Size(shape)) for name, module, shape in pieces]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    precision, channels_last = training_precision(cfg), cfg.train.channels_last
    load_before = load_average()
    peak_before = matmul_peak(args.matmul_size, args.matmul_seconds)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.rand(cfg.train.batch_size, 4, SIZE, SIZE)
    rows = []
    for name, module, shape in layer_inputs(model, x):
        after = measure(module, shape, precision == "bf16", channels_last, args.reps)
        plain = pytorch_layer(module)
        before = (
            after
            if plain is module
            else measure(copy.deepcopy(plain), shape, precision == "bf16", channels_last, args.reps)
        )
        rows.append(
            {
                "layer": name,
                "kind": type(module).__name__,
                "input": "×".join(map(str, shape[1:])),
                "forward_ms": after["forward_ms"],
                "train_ms_before": before["train_ms"],
                "train_ms_after": after["train_ms"],
                "gflop": count_flops(module, shape) / 1e9,
            }
        )
        print(f"  {name}: {before['train_ms']:.2f} → {after['train_ms']:.2f} ms", flush=True)
    family = []
    for name, module, shape in family_pieces(cfg.model, cfg.train.batch_size):
        module = module.train().to(memory_format=torch.channels_last) if channels_last else module.train()
        timing = measure(module, shape, precision == "bf16", channels_last, args.reps)
        family.append(
            {"piece": name, "input": "×".join(map(str, shape[1:])), **timing, "gflop": count_flops(module, shape) / 1e9}
        )
        print(f"  {name}: {timing['train_ms']:.2f} ms", flush=True)
    peak_after = matmul_peak(args.matmul_size, args.matmul_seconds)
    peak = max(peak_before[precision], peak_after[precision])
    for row in rows:
        for when in ("before", "after"):
            row[f"share_{when}"] = row["gflop"] / (row[f"train_ms_{when}"] / 1e3) / peak
    total = {key: sum(row[key] for row in rows) for key in ("forward_ms", "train_ms_before", "train_ms_after", "gflop")}
    rows.append({"layer": "all layers", "kind": "", "input": "", **total})
    for when in ("before", "after"):
        rows[-1][f"share_{when}"] = total["gflop"] / (total[f"train_ms_{when}"] / 1e3) / peak

    print_table(
        f"{precision}{' + channels_last' if channels_last else ''}, batch {cfg.train.batch_size}, {args.threads} "
        f"thread(s); share: of the same-run {precision} matmul peak, {peak:.0f} GFLOP/s",
        rows,
        [
            ("layer", "layer", "s"),
            ("kind", "kind", "s"),
            ("input", "input C×H×W", "s"),
            ("forward_ms", "fwd ms", ".2f"),
            ("train_ms_before", "fwd+bwd ms before", ".2f"),
            ("train_ms_after", "after", ".2f"),
            ("gflop", "GFLOP", ".3f"),
            ("share_before", "share before", ".1%"),
            ("share_after", "after", ".1%"),
        ],
    )
    for row in family:
        row["share"] = row["gflop"] / (row["train_ms"] / 1e3) / peak
    print_table(
        "the model family's pieces (inpaint/models/blocks.py), each alone, same precision, layout and batch",
        family,
        [
            ("piece", "piece", "s"),
            ("input", "input C×H×W", "s"),
            ("forward_ms", "fwd ms", ".2f"),
            ("train_ms", "fwd+bwd ms", ".2f"),
            ("gflop", "GFLOP", ".3f"),
            ("share", "share", ".1%"),
        ],
    )
    load_after = load_average()
    print(f"\nload average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    write_json(
        args.json,
        {
            "benchmark": "layers",
            "quick": args.quick,
            "machine": machine(),
            "threads": args.threads,
            "precision": precision,
            "channels_last": channels_last,
            "batch": cfg.train.batch_size,
            "load_average": {"before": load_before, "after": load_after},
            "matmul_gflops": {"before": peak_before, "after": peak_after, "peak": peak},
            "rows": rows,
            "family": family,
        },
    )


if __name__ == "__main__":
    main()
