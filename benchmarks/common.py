"""What the benchmarks share: the machine and its matmul peak, FLOP counts, the training step,
synthetic datasets, `jobs/train.py` runs watched from outside, a tiny servable model, tables and JSON.

The scripts import this file as `common` (Python puts the script's folder on the path).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from inpaint import tables
from inpaint.checkpoints import save_checkpoint_state
from inpaint.config import Config, load_config
from inpaint.data import prepare
from inpaint.masks import random_masks
from inpaint.models import ModelConfig, build_model
from inpaint.models.cost import conv_backward_flop
from inpaint.train import build_optimizer, train_step

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "configs" / "paper.yaml"
# Quick mode (CI): the paper's layout at a width no benchmark needs minutes for.
TINY_MODEL = ["model.widths=[8,16,32]", "model.mixer_dim=16"]


# ---------------------------------------------------------------------------------------------
# The machine


def load_average() -> float:
    """The 1-minute load average: well above the benchmark's own threads, something else shared the cores."""
    return os.getloadavg()[0]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = re.search(r"flags\s*:\s*(.*)", info)
    flags = set(flags.group(1).split()) if flags else set()
    import ray  # late: only for its version

    return {
        "cpu": model.group(1) if model else platform.processor(),
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }


def matmul_gflops(dtype: torch.dtype, size: int, seconds: float) -> float:
    """The best GFLOP/s of a size² × size² matmul at the current torch thread count."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: first-call set-up is not the peak
    best, spent, reps = float("inf"), 0.0, 0
    while spent < seconds or reps < 3:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        elapsed = time.perf_counter() - start
        best, spent, reps = min(best, elapsed), spent + elapsed, reps + 1
    return 2 * size**3 / best / 1e9


def matmul_peak(size: int, seconds: float) -> dict[str, float]:
    """GFLOP/s per precision: the ceiling every throughput figure is compared with."""
    return {"fp32": matmul_gflops(torch.float32, size, seconds), "bf16": matmul_gflops(torch.bfloat16, size, seconds)}


def count_flops(cfg: ModelConfig, height: int, width: int) -> dict[str, float]:
    """FLOPs per image of the forward pass and of a training step (forward + backward), counted by PyTorch."""
    model = build_model(cfg).train()
    x = torch.rand(2, 4, height, width)
    with FlopCounterMode(display=False) as forward:
        model(x)
    with FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}
    ) as step:
        model(x).square().mean().backward()
    return {"forward": forward.get_total_flops() / 2, "train": step.get_total_flops() / 2}


def share(images_per_s: float, flops_per_image: float, peak_gflops: float) -> float:
    """The fraction of the matmul peak a throughput figure reaches."""
    return images_per_s * flops_per_image / (peak_gflops * 1e9)


# ---------------------------------------------------------------------------------------------
# The training step


def paper_config(overrides: list[str]) -> Config:
    """The paper's configuration (configs/paper.yaml) with `key=value` overrides on top."""
    return load_config(PAPER_CONFIG, overrides)


class TrainStep:
    """One step of the worker loop without Ray: fresh holes, then `inpaint.train.train_step`;
    `train.channels_last` as the worker applies it. `compile` runs the model through
    `torch.compile` (inductor), which the worker does not do.
    """

    def __init__(self, cfg: Config, height: int, width: int, compile: bool = False):
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.height, self.width = cfg, height, width
        model = build_model(cfg.model).train()
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.optimizer, self.scheduler = build_optimizer(model, cfg, steps_per_epoch=1)
        self.model = torch.compile(model) if compile else model
        self.holes = torch.Generator().manual_seed(cfg.train.seed)

    def __call__(self, images: torch.Tensor) -> float:
        masks = random_masks(len(images), self.height, self.width, self.cfg.masks, self.holes)
        return train_step(self.model, self.optimizer, self.scheduler, images, masks, self.cfg).item()


def time_steps(step: Callable[[], object], warmup: int, min_steps: int, min_seconds: float) -> float:
    """Seconds per call of `step` after `warmup` calls, timed over at least `min_steps` calls and `min_seconds`."""
    for _ in range(warmup):
        step()
    calls, start = 0, time.perf_counter()
    while calls < min_steps or time.perf_counter() - start < min_seconds:
        step()
        calls += 1
    return (time.perf_counter() - start) / calls


# ---------------------------------------------------------------------------------------------
# Data


def synthetic_prepared(root: Path, train: int, val: int, seed: int = 0) -> str:
    """A prepared dataset of `train` + `val` smooth random 32×32 images (reused when already there).

    Speed does not depend on what the pixels show; the images are written as a CIFAR-10 python
    folder and go through the project's own `prepare`.
    """
    out = root / f"synthetic-{train}-{val}"
    if (out / "manifest.json").exists():
        return str(out)
    rng = np.random.default_rng(seed)
    count = train + val
    coarse = rng.integers(0, 256, size=(count, 3, 4, 4), dtype=np.uint8)
    images = coarse.repeat(8, axis=2).repeat(8, axis=3).reshape(count, -1)  # planar rows, as CIFAR stores them
    source = root / f"source-{count}" / "cifar-10-batches-py"
    source.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(count), 5)
    batches = {f"data_batch_{i + 1}": images[part] for i, part in enumerate(parts)} | {"test_batch": images[:1]}
    for name, batch in batches.items():
        (source / name).write_bytes(pickle.dumps({b"data": batch, b"labels": [0] * len(batch)}))
    prepare(source, out, val=val, progress=lambda _: None)
    return str(out)


# ---------------------------------------------------------------------------------------------
# A real `jobs/train.py` run, watched from outside

PROGRESS = re.compile(r"epoch (\d+) step (\d+)/(\d+)\s+loss \S+\s+(\d+) img/s")
EPOCH_END = re.compile(r"epoch (\d+)/(\d+)\s+train_loss")


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def _process(pid: int) -> dict[str, Any] | None:
    """Name, peak RSS (MiB) and CPU seconds of a live process, from /proc."""
    try:
        cmdline = (Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]).decode(errors="replace")
        status = Path(f"/proc/{pid}/status").read_text()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "name": cmdline,
        "peak_rss_mib": int(hwm.group(1)) / 1024 if hwm else 0.0,
        "cpu_s": (int(fields[11]) + int(fields[12])) / ticks,  # utime + stime
    }


def _descendants(root: int) -> list[int]:
    children, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def run_train_job(
    data: str, workdir: Path, workers: int, cpus_per_worker: float, epochs: int, overrides: list[str]
) -> dict[str, Any]:
    """Run `python jobs/train.py` (paper config + `overrides`) as a user would, in its own local Ray;
    return its per-epoch metrics (from its MLflow run), the times of its output lines, and the peak
    RSS and CPU time of its processes (workers, driver, and Ray's own)."""
    workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{workdir}/mlflow.db"
    sets = [*overrides, f"scaling.cpus_per_worker={cpus_per_worker}", "scaling.max_failures=0"]
    command = [sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(PAPER_CONFIG), "--data", data]
    command += ["--workers", str(workers), "--epochs", str(epochs), "--tracking-uri", uri, "--json", "result.json"]
    command += [f"--set={s}" for s in sets]
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}  # a fresh Ray, never another's
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    processes: dict[int, dict[str, Any]] = {}  # the latest reading of every process the job started
    while proc.poll() is None:
        for pid in _descendants(proc.pid):
            seen, before = _process(pid), processes.get(pid)
            if seen and before:  # both only grow; an exiting process reads empty, an idle worker gets a role
                seen["peak_rss_mib"] = max(seen["peak_rss_mib"], before["peak_rss_mib"])
                seen["cpu_s"] = max(seen["cpu_s"], before["cpu_s"])
                seen["name"] = before["name"] if "RayTrainWorker" in before["name"] else seen["name"]
            if seen:
                processes[pid] = seen
        time.sleep(0.5)
    wall = time.perf_counter() - start
    reader.join()
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        raise RuntimeError(f"jobs/train.py failed ({proc.returncode}):\n{tail}")

    cfg = paper_config(sets)
    run_id = json.loads((workdir / "result.json").read_text())["run_id"]
    epoch_rows = _epoch_metrics(uri, run_id)
    progress = [(t, *map(int, m.groups())) for t, line in lines if (m := PROGRESS.search(line))]
    ends = {int(m.group(1)): t for t, line in lines if (m := EPOCH_END.search(line))}
    # the first progress line says how long epoch 1 had run: start-up ends where epoch 1's loop began
    t, _, step, _, rate = next(p for p in progress if p[1] == 1)
    loop_start = t - step * cfg.train.batch_size * workers / rate
    for row in epoch_rows:
        row["end_s"] = ends.get(row["epoch"])
    kinds = {"worker": [], "driver": [], "ray": []}
    for pid, seen in processes.items():
        kind = "driver" if pid == proc.pid else "worker" if "RayTrainWorker" in seen["name"] else "ray"
        kinds[kind].append(seen)
    return {
        "workers": workers,
        "cpus_per_worker": cpus_per_worker,
        "batch_per_worker": cfg.train.batch_size,
        "wall_s": wall,
        "startup_s": loop_start,
        "last_epoch_line_s": max(ends.values()),
        "epochs": epoch_rows,
        "worker_peak_rss_mib": sorted(p["peak_rss_mib"] for p in kinds["worker"]),
        "driver_peak_rss_mib": processes[proc.pid]["peak_rss_mib"],
        "cpu_s": {kind: sum(p["cpu_s"] for p in seen) for kind, seen in kinds.items()},
    }


def _epoch_metrics(uri: str, run_id: str) -> list[dict[str, Any]]:
    from mlflow import MlflowClient  # late: MLflow's import is slow and only job runs need it

    client = MlflowClient(uri)
    keys = ("images_per_s", "train_loss", "val_psnr_hole")
    history = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}
    return [{"epoch": step, **{key: history[key][step] for key in keys}} for step in sorted(history["images_per_s"])]


# ---------------------------------------------------------------------------------------------
# Serving


def quick_checkpoint(root: Path) -> str:
    """A tiny untrained model as a checkpoint folder, as Ray Train's workers write it."""
    cfg = load_config(None, TINY_MODEL)
    torch.manual_seed(0)
    folder = root / "checkpoint_000000"
    folder.mkdir(parents=True)
    model = build_model(cfg.model)
    save_checkpoint_state(str(folder), {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0})
    return str(folder)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Output


def print_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Rows as a Markdown table under `title`, as docs/performance.md holds them; `columns` are (key, header,
    format spec), a missing value "-"."""
    cells = [[format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns] for row in rows]
    print(f"\n{title}\n" + tables.markdown([header for _, header, _ in columns], cells))


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path:
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {path}")
