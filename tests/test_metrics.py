import math
import multiprocessing
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import free_ports
from skimage.metrics import structural_similarity

from inpaint.masks import MaskConfig, apply_holes, fixed_masks, squares
from inpaint.metrics import (
    METRICS,
    Metric,
    MetricTotals,
    all_reduce_sums,
    best_so_far,
    composite,
    dice,
    format_metric,
    l1_hole,
    metric_mode,
    psnr,
    psnr_hole,
    reconstruction_loss,
    ssim,
)


def test_dice_on_a_hand_made_array():
    y = torch.tensor([0.0, 0.5, 1.0, 1.0])
    p = torch.tensor([0.0, 1.0, 1.0, 0.0])
    # 2·(0 + 0.5 + 1 + 0) / (0 + 1.5 + 2 + 1) = 3 / 4.5
    assert dice(y, p).item() == pytest.approx(2 / 3)


def test_dice_of_a_perfect_prediction_is_not_one():
    y = torch.full((1, 3, 2, 2), 0.5)
    # 2·Σy² / 2Σy = Σy² / Σy = 0.5: the paper's Dice rewards bright images, not right ones
    assert dice(y, y).item() == pytest.approx(0.5)


def test_psnr_hole_and_l1_hole_by_hand():
    target = torch.zeros(1, 3, 4, 4)
    pred = torch.zeros(1, 3, 4, 4)
    mask = squares(torch.tensor([2]), torch.tensor([0]), torch.tensor([0]), 4, 4)
    pred[:, :, 0, 0] = 0.1  # one hole pixel off by 0.1 in every channel, 4 hole pixels
    pred[:, :, 3, 3] = 1.0  # a known pixel: ignored by the hole metrics
    mse_hole = 0.1**2 / 4
    assert psnr_hole(target, pred, mask).item() == pytest.approx(10 * math.log10(1 / mse_hole), rel=1e-5)
    assert l1_hole(target, pred, mask).item() == pytest.approx(0.1 / 4, rel=1e-5)
    mse_image = (3 * 0.1**2 + 3 * 1.0) / (3 * 16)
    assert psnr(target, pred).item() == pytest.approx(10 * math.log10(1 / mse_image), rel=1e-5)


def test_perfect_prediction_scores_the_maximum():
    y = torch.rand(2, 3, 16, 16)
    mask = squares(torch.tensor([4, 5]), torch.tensor([1, 2]), torch.tensor([3, 4]), 16, 16)
    assert torch.all(psnr_hole(y, y, mask) == 100)
    assert torch.all(l1_hole(y, y, mask) == 0)
    assert torch.allclose(ssim(y, y), torch.ones(2))


def test_ssim_matches_scikit_image():
    rng = np.random.default_rng(0)
    y = rng.random((32, 32, 3))
    p = np.clip(y + rng.normal(0, 0.1, y.shape), 0, 1)
    expected = structural_similarity(
        y, p, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )
    got = ssim(torch.from_numpy(y).permute(2, 0, 1)[None], torch.from_numpy(p).permute(2, 0, 1)[None])
    assert got.item() == pytest.approx(expected, abs=1e-3)


def test_composite_keeps_known_pixels():
    y, p = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    mask = squares(torch.tensor([2]), torch.tensor([1]), torch.tensor([1]), 4, 4)
    assert torch.equal(composite(p, y, mask), mask.expand(1, 3, 4, 4))


def test_totals_do_not_depend_on_batching():
    torch.manual_seed(0)
    y, p = torch.rand(6, 3, 16, 16), torch.rand(6, 3, 16, 16)
    mask = fixed_masks(torch.arange(6), 16, 16, MaskConfig(min_size=3, max_size=8), seed=0)
    whole, parts = MetricTotals(), MetricTotals()
    whole.update(y, p, mask)
    for s in (slice(0, 1), slice(1, 4), slice(4, 6)):
        parts.update(y[s], p[s], mask[s])
    a, b = whole.compute(), parts.compute()
    assert a == pytest.approx(b)
    filled = composite(p, y, mask)
    assert a["dice"] == pytest.approx(dice(y, filled).item())
    assert a["psnr_hole"] == pytest.approx(psnr_hole(y, filled, mask).mean().item())


def test_hole_weighted_loss_weighs_the_hole():
    y = torch.zeros(1, 3, 4, 4)
    mask = squares(torch.tensor([2]), torch.tensor([0]), torch.tensor([0]), 4, 4)
    in_hole, outside = y.clone(), y.clone()
    in_hole[:, :, 0, 0] = 1
    outside[:, :, 3, 3] = 1
    assert reconstruction_loss(in_hole, y, mask, "mse") == reconstruction_loss(outside, y, mask, "mse")
    ratio = reconstruction_loss(in_hole, y, mask, "hole_l1", 6.0) / reconstruction_loss(
        outside, y, mask, "hole_l1", 6.0
    )
    assert ratio.item() == pytest.approx(6.0)


@pytest.fixture(scope="module")
def cifar10_sample() -> torch.Tensor:
    """The first 1,000 CIFAR-10 training images from $INPAINT_DATA (CI points it at ../shared/data/cifar10)."""
    source = os.environ.get("INPAINT_DATA")
    if not source:
        pytest.skip("INPAINT_DATA is not set: point it at a CIFAR-10 source to check the paper's Dice figures")
    from inpaint.data import load_source, to_float_images

    images, _ = load_source(source, limit=1000)["train"]
    return to_float_images(images)


def test_paper_dice_on_cifar10(cifar10_sample):
    """The brief's figures: Dice ≈ 0.608 for a perfect image, ≈ 0.573 for the unfilled input."""
    images = cifar10_sample
    masks = fixed_masks(torch.arange(len(images)), 32, 32, MaskConfig(kind="diagonal"), seed=0)
    assert dice(images, images).item() == pytest.approx(0.608, abs=0.01)
    assert dice(images, apply_holes(images, masks)).item() == pytest.approx(0.573, abs=0.01)


def sums_on_rank(rank: int, port: int, halves: list, results) -> None:
    """One half of a batch's totals on each of two gloo ranks, added up by `all_reduce_sums`."""
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    totals = MetricTotals()
    totals.update(*halves[rank])
    reduced = all_reduce_sums({"val": totals.sums, "train": {"loss": float(rank + 1)}})
    totals.sums = reduced["val"]
    results.put((rank, totals.compute(), reduced["train"]))
    dist.destroy_process_group()


def test_named_sums_reduced_over_two_ranks_score_the_whole_split():
    torch.manual_seed(0)
    y, p = torch.rand(6, 3, 16, 16), torch.rand(6, 3, 16, 16)
    mask = fixed_masks(torch.arange(6), 16, 16, MaskConfig(min_size=3, max_size=8), seed=0)
    whole = MetricTotals()
    whole.update(y, p, mask)
    halves = [(y[:2], p[:2], mask[:2]), (y[2:], p[2:], mask[2:])]  # unequal shares, as the last batch makes
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_ports(1)[0]
    ranks = [context.Process(target=sums_on_rank, args=(rank, port, halves, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    reported = [results.get(timeout=60) for _ in ranks]
    for process in ranks:
        process.join(60)
    for _, scores, train in reported:  # every rank gets the whole split's metrics, by name
        assert scores == pytest.approx(whole.compute(), abs=1e-6)  # float32 sums of other batches
        assert list(scores) == list(METRICS) and train == {"loss": 3.0}


def test_a_metric_added_to_the_table_is_scored_and_reported_by_name(monkeypatch):
    """Adding a metric is one edit: a row of `METRICS` reaches the totals, their reduction and `compute`."""
    hole_share = Metric("hole_share", False, ".4f", lambda target, filled, mask: mask.flatten(1).mean(1))
    monkeypatch.setitem(METRICS, "hole_share", hole_share)
    mask = squares(torch.tensor([4, 8]), torch.tensor([0, 0]), torch.tensor([0, 0]), 16, 16)
    totals = MetricTotals()
    totals.update(torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16), mask)
    totals.sums = all_reduce_sums({"val": totals.sums})["val"]  # outside DDP: unchanged
    assert totals.compute()["hole_share"] == pytest.approx((16 / 256 + 64 / 256) / 2)
    assert metric_mode("val_hole_share") == "min" and metric_mode("raw_val_hole_share") == "min"
    assert metric_mode("val_psnr_hole") == "max" and metric_mode("train_loss") == metric_mode("val_loss") == "min"
    assert format_metric("val_psnr_hole", 21.456) == "21.46" and format_metric("val_dice", 0.61234) == "0.6123"


def test_best_so_far_keeps_the_best_epoch_by_the_registering_metric():
    first = {"epoch": 1, "val_psnr_hole": 15.0, "val_l1_hole": 0.2, "train_loss": 0.3}
    second = {"epoch": 2, "val_psnr_hole": 14.0, "val_l1_hole": 0.1, "train_loss": 0.2}
    best = best_so_far(first, {}, "val_psnr_hole")
    assert best == {"best_epoch": 1, "best_val_psnr_hole": 15.0, "best_val_l1_hole": 0.2}
    assert best_so_far(second, best, "val_psnr_hole") == best  # a worse hole PSNR keeps epoch 1's
    by_l1 = best_so_far(second, best_so_far(first, {}, "val_l1_hole"), "val_l1_hole")
    assert by_l1["best_epoch"] == 2 and by_l1["best_val_psnr_hole"] == 14.0  # lower L1 is better
