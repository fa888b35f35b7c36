"""Training-step speed of the paper's models against this machine's own matmul peak, in one run.

For the fused (U-Net + ConvMixer, fusion "add") and vanilla U-Net configurations of configs/paper.yaml,
at each batch size and in each mode (fp32 or bf16 autocast, NCHW or channels_last), one training step
(fresh holes, forward, MSE loss, backward, Adam) is timed on random 32×32 images. The FLOPs of a step
are counted by torch.utils.flop_counter, so images/s × FLOPs/image ÷ the matmul GFLOP/s measured
in the same run (of the precision the mode computes in) is the share of the hardware's peak.

python benchmarks/model_speed.py --json model_speed.json
python benchmarks/model_speed.py --variants fused --batches 64 --modes fp32 bf16+cl --threads 1
python benchmarks/model_speed.py --variants fused --batches 64 --modes bf16+cl --set model.dropout=0
python benchmarks/model_speed.py --quick    # CI: a tiny model, seconds
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from common import (
    TINY_MODEL,
    TrainStep,
    count_flops,
    load_average,
    machine,
    matmul_peak,
    paper_config,
    print_table,
    share,
    time_steps,
    write_json,
)

# precision, then "+cl" for channels_last, "+compile" for torch.compile (minutes of compiling each)
MODES = ("fp32", "fp32+cl", "bf16", "bf16+cl")
EXTRA_MODES = ("fp32+compile", "fp32+cl+compile", "bf16+compile", "bf16+cl+compile")
VARIANTS = ("fused", "unet")
SIZE = 32  # CIFAR-10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batches", nargs="+", type=int, default=[2, 64, 256])
    parser.add_argument("--modes", nargs="+", choices=MODES + EXTRA_MODES, default=list(MODES))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for all")
    parser.add_argument("--seconds", type=float, default=8.0, help="time each configuration at least this long")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="CI: tiny model and sizes, a few seconds")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.seconds, args.warmup = [2, 8], 0.2, 1
        args.matmul_size, args.matmul_seconds = 256, 0.1
        args.set = [*TINY_MODEL, *args.set]
    return args


def measure(args: argparse.Namespace, variant: str, batch: int, mode: str, flops: float) -> dict[str, Any]:
    precision, *options = mode.split("+")
    overrides = [f"model.variant={variant}", f"train.precision={precision}", f"train.channels_last={'cl' in options}"]
    cfg = paper_config([*args.set, *overrides])
    step = TrainStep(cfg, SIZE, SIZE, compile="compile" in options)
    images = torch.rand(batch, 3, SIZE, SIZE)
    seconds = time_steps(lambda: step(images), args.warmup, min_steps=3, min_seconds=args.seconds)
    return {
        "variant": variant,
        "batch": batch,
        "mode": mode,
        "precision": precision,
        "channels_last": "cl" in options,
        "compile": "compile" in options,
        "step_ms": seconds * 1e3,
        "images_per_s": batch / seconds,
        "gflops": batch / seconds * flops / 1e9,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    peak_before = matmul_peak(args.matmul_size, args.matmul_seconds)
    flops = {
        variant: count_flops(paper_config([*args.set, f"model.variant={variant}"]).model, SIZE, SIZE)
        for variant in args.variants
    }
    rows = []
    for variant in args.variants:
        for batch in args.batches:
            for mode in args.modes:
                rows.append(measure(args, variant, batch, mode, flops[variant]["train"]))
                print(f"  {variant} batch {batch} {mode}: {rows[-1]['images_per_s']:.1f} img/s", flush=True)
    peak_after = matmul_peak(args.matmul_size, args.matmul_seconds)
    peak = {p: max(peak_before[p], peak_after[p]) for p in peak_before}
    for row in rows:
        row["share_of_peak"] = share(row["images_per_s"], flops[row["variant"]]["train"], peak[row["precision"]])
        fp32 = [r for r in rows if (r["variant"], r["batch"], r["mode"]) == (row["variant"], row["batch"], "fp32")]
        row["speedup_vs_fp32"] = row["images_per_s"] / fp32[0]["images_per_s"] if fp32 else None

    print_table(
        f"matmul {args.matmul_size}² at {args.threads} threads (GFLOP/s)",
        [{"when": "before", **peak_before}, {"when": "after", **peak_after}],
        [("when", "", "s"), ("fp32", "fp32", ".0f"), ("bf16", "bf16", ".0f")],
    )
    print_table(
        "FLOPs per image (FlopCounterMode)",
        [{"variant": v, **{k: f / 1e6 for k, f in counted.items()}} for v, counted in flops.items()],
        [("variant", "variant", "s"), ("forward", "forward MFLOP", ".1f"), ("train", "fwd+bwd MFLOP", ".1f")],
    )
    print_table(
        f"training step, {SIZE}×{SIZE} images, {args.threads} threads (share: of the same-run matmul peak "
        "of the precision the mode computes in)",
        rows,
        [
            ("variant", "variant", "s"),
            ("batch", "batch", "d"),
            ("mode", "mode", "s"),
            ("step_ms", "ms/step", ".1f"),
            ("images_per_s", "img/s", ".1f"),
            ("gflops", "GFLOP/s", ".1f"),
            ("share_of_peak", "share", ".1%"),
            ("speedup_vs_fp32", "vs fp32", ".2f"),
        ],
    )
    load_after = load_average()
    print(f"\nload average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    write_json(
        args.json,
        {
            "benchmark": "model_speed",
            "quick": args.quick,
            "machine": machine(),
            "threads": args.threads,
            "image_size": SIZE,
            "load_average": {"before": load_before, "after": load_after},
            "matmul_gflops": {"size": args.matmul_size, "before": peak_before, "after": peak_after, "peak": peak},
            "flops_per_image": flops,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
