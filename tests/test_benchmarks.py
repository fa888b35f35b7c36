"""Every benchmark in its quick mode, so that none can rot: it runs, prints its tables, and writes
JSON with the fields docs/performance.md's tables come from. No timing is asserted here: the targets are
read from the benchmarks' own output on a quiet machine (see benchmarks/README.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from inpaint.masks import KINDS as MASK_KINDS
from inpaint.models.blocks import BLOCKS, DOWNSAMPLINGS, UPSAMPLINGS

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    proc = run_script(name, tmp_path, "--quick", "--json", str(out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "load average" in proc.stdout
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["quick"] is True
    assert result["machine"]["cores"] >= 1
    return result


def run_script(name: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def positive(row: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert row[key] > 0, (key, row)


def test_model_speed(tmp_path):
    result = run_benchmark("model_speed", tmp_path)
    positive(result["matmul_gflops"]["peak"], "fp32", "bf16")
    for counted in result["flops_per_image"].values():
        assert counted["train"] > counted["forward"] > 0
    rows = result["rows"]
    assert {(row["variant"], row["mode"]) for row in rows} == {
        (variant, mode) for variant in ("fused", "unet") for mode in ("fp32", "fp32+cl", "bf16", "bf16+cl")
    }
    for row in rows:
        positive(row, "step_ms", "images_per_s", "gflops", "share_of_peak", "speedup_vs_fp32")


@pytest.mark.ray
def test_ray_overhead(tmp_path):
    result = run_benchmark("ray_overhead", tmp_path)
    positive(result["matmul_gflops"], "fp32")
    plain, *jobs = result["rows"]
    assert plain["workers"] == 0 and [job["workers"] for job in jobs] == [2]
    for row in result["rows"]:
        positive(row, "steady_images_per_s", "share_of_peak", "vs_plain")
        assert len(row["epoch_images_per_s"]) == result["epochs"]
    for job in jobs:
        positive(job, "startup_s", "wall_s", "ray_cpu_s")
        assert len(job["worker_peak_rss_mib"]) == job["workers"] and min(job["worker_peak_rss_mib"]) > 0


@pytest.mark.ray
def test_data_path(tmp_path):
    result = run_benchmark("data_path", tmp_path)
    positive(result, "read_images_per_s")
    for row in result["rows"]:
        positive(row, "ingest_images_per_s", "ingest_cpu_ms_per_image", "train_images_per_s", "ingest_vs_train")


def test_picture_crops(tmp_path):
    """Quick mode on its generated pictures: a row per crop size with every rate positive and finite, and the
    data path's share the step's rate over the collate's."""
    result = run_benchmark("picture_crops", tmp_path)
    assert result["threads"] == 1 and result["precision"] in ("bf16", "fp32")
    assert result["pictures"]["count"] == 6 and result["pictures"]["formats"] == [".jpg", ".png", ".webp"]
    assert "picture_crops.py --quick" in result["command"]
    assert [row["crop"] for row in result["rows"]] == [64, 96]
    for row in result["rows"]:
        keys = ("crops_per_s_per_cpu", "tensors_per_s_per_cpu", "crop_cpu_ms", "tensor_cpu_ms")
        keys += ("step_images_per_s_per_cpu", "step_cpu_ms_per_image", "data_share", "data_share_cpu")
        keys += ("prefill_cpu_ms", "prefill_share_cpu")  # the recipe's Telea prefill
        assert all(math.isfinite(row[key]) for key in keys), row
        positive(row, *keys)
        assert row["data_share"] == pytest.approx(row["step_images_per_s_per_cpu"] / row["tensors_per_s_per_cpu"])


@pytest.mark.ray
def test_scaling(tmp_path):
    result = run_benchmark("scaling", tmp_path)
    assert [(row["size"], row["workers"]) for row in result["rows"]] == [(64, 2)]
    for row in result["rows"]:
        positive(row, "images_per_s", "train_s_per_epoch", "wall_s_per_epoch", "worker_peak_rss_mib")
    positive(result["projected"], "per_worker_images_per_s")


def test_layers(tmp_path):
    result = run_benchmark("layers", tmp_path)
    rows = result["rows"]
    assert rows[-1]["layer"] == "all layers" and len(rows) > 20
    assert {"DepthwiseConv2d", "ConvTranspose2d", "BatchNorm2d", "GELU"} <= {row["kind"] for row in rows}
    for row in rows:
        positive(row, "forward_ms", "train_ms_before", "train_ms_after")
        assert row["gflop"] >= 0 and row["share_after"] >= 0
    convs = [row for row in rows if "Conv" in row["kind"]]
    assert all(row["gflop"] > 0 for row in convs)
    family = {row["piece"]: row for row in result["family"]}  # every entry of the family's tables, alone
    assert {f"block {name}, bottleneck" for name in BLOCKS} | {f"down {name}" for name in DOWNSAMPLINGS} <= set(family)
    assert {f"up {name}" for name in UPSAMPLINGS} <= set(family)
    for row in family.values():
        positive(row, "forward_ms", "train_ms")
    assert family["block fourier, bottleneck"]["gflop"] > family["block residual, bottleneck"]["gflop"] > 0


@pytest.mark.ray
def test_time_to_quality(tmp_path):
    result = run_benchmark("time_to_quality", tmp_path)
    (row,) = result["rows"]
    assert row["label"] == "current" and row["epochs"] == 2 and len(row["psnr_by_epoch"]) == 2
    positive(row, "images_per_s", "last_psnr_hole")
    reached, never = row["minutes_to"]["5"], row["minutes_to"]["100"]
    assert never is None and 0 < reached <= row["psnr_by_epoch"][-1][1]  # by the last epoch's minute at the latest


@pytest.mark.ray
def test_serve_load(tmp_path):
    result = run_benchmark("serve_load", tmp_path)
    rows = result["rows"]
    expected = {(batching, concurrency) for batching in ("on", "off") for concurrency in (1, 8, 32)}
    assert {(row["batching"], row["concurrency"]) for row in rows} == expected
    for row in rows:
        assert row["errors"] == 0
        positive(row, "requests_per_s", "p50_ms", "p99_ms", "mean_batch")
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]


def smooth_photo(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like picture: smooth colour blobs and a little grain, so that every fill scores a finite PSNR."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 16 + 2, width // 16 + 2, 3)).astype(np.uint8)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(int)
    return np.clip(smooth + rng.integers(-8, 9, size=smooth.shape), 0, 255).astype(np.uint8)


@pytest.mark.ray
def test_photo_holes(tmp_path):
    """Quick mode on three photos of other sizes and formats: a row per photo and hole kind, the known pixels
    back from the server unchanged, and Telea's figure equal to cv2.inpaint's on that hole, computed here."""
    photos = tmp_path / "photos"
    photos.mkdir()
    sizes = {"a.png": (64, 80), "b.jpg": (96, 72), "c.png": (70, 70)}  # (height, width)
    for seed, (name, (height, width)) in enumerate(sizes.items()):
        Image.fromarray(smooth_photo(height, width, seed)).save(photos / name)
    (photos / "README.md").write_text("not a photo")
    kinds = ["square16", "square32", "square48"] + (["strokes"] if "strokes" in MASK_KINDS else [])
    out = tmp_path / "photo_holes.json"
    args = ["--quick", "--photos", str(photos), "--kinds", ",".join(kinds), "--json", str(out)]
    proc = run_script("photo_holes", tmp_path, *args, "--picture", str(tmp_path / "examples.png"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "load average" in proc.stdout and "photos 3/3" in proc.stdout
    result = json.loads(out.read_text())
    assert result["benchmark"] == "photo_holes" and result["quick"] is True and result["machine"]["cores"] >= 1
    rows = result["rows"]
    assert [(row["photo"], row["kind"]) for row in rows] == [(name, kind) for name in sizes for kind in kinds]
    assert [s["kind"] for s in result["summary"]] == [*kinds, "all"]
    assert [s["holes"] for s in result["summary"]] == [3] * len(kinds) + [3 * len(kinds)]
    assert all(row["known_changed"] == 0 for row in rows)
    for row in rows:
        assert all(np.isfinite(row[f"psnr_{method}"]) for method in ("model", "telea", "ns")), row
    assert Image.open(tmp_path / "examples.png").size[0] > 4 * 128

    row = next(row for row in rows if row["photo"] == "b.jpg" and row["kind"] == "square32")
    top, left, height, width = row["box"]
    assert (height, width) == (32, 32) and row["hole_pixels"] == 32 * 32
    assert top + height <= 96 and left + width <= 72
    truth = np.array(Image.open(photos / "b.jpg").convert("RGB"))  # the JPEG as decoded: the server's truth too
    hole = np.zeros(truth.shape[:2], np.uint8)
    hole[top : top + height, left : left + width] = 1
    telea = cv2.inpaint(truth, hole, 3, cv2.INPAINT_TELEA)
    error = (telea.astype(float) - truth.astype(float))[hole == 1] / 255
    assert row["psnr_telea"] == pytest.approx(10 * np.log10(1 / np.mean(error**2)), abs=1e-3)
    assert row["l1_telea"] == pytest.approx(np.mean(np.abs(error)), abs=1e-5)
