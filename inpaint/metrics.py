"""How a filled image is scored, and the losses it is trained with.

Images are float tensors (N, 3, H, W) in [0, 1]; masks (N, 1, H, W) are 1 in the hole. Metrics score
the prediction composited into the known pixels (`composite`), so only the hole can differ from the
target, as a user would see the result.

- `dice`: the paper's score, exactly as its code computes it: 2·Σ(y·p) / Σ(y + p) over every pixel of
  the batch, no smoothing. It barely moves (~0.61 for a perfect CIFAR-10 image, ~0.57 for the unfilled
  input), so it is reported for comparison only.
- `psnr_hole`, `l1_hole`: PSNR and mean absolute error over the hole pixels only, per image;
- `psnr`, `ssim`: over the whole image, per image; SSIM with the standard 11×11 Gaussian window
  (sigma 1.5), from torchmetrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchmetrics.functional.image import structural_similarity_index_measure

LOSSES = ("mse", "l1", "hole_mse", "hole_l1")
MAX_PSNR = 100.0  # what a perfect reconstruction scores instead of infinity


def composite(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The prediction inside the hole, the known pixels outside it."""
    return pred * mask + target * (1 - mask)


def dice(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The paper's Dice coefficient over the whole batch (a scalar)."""
    return 2 * (target * pred).sum() / (target + pred).sum()


def _psnr(squared_error_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    mse = squared_error_sum / count
    return (10 * torch.log10(1 / mse)).clamp(max=MAX_PSNR)


def psnr(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """PSNR of each image (N,), peak 1."""
    return _psnr(((target - pred) ** 2).flatten(1).sum(1), torch.tensor(target[0].numel()))


def psnr_hole(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR of each image over its hole pixels only (N,)."""
    channels = target.shape[1]
    return _psnr(((target - pred) ** 2 * mask).flatten(1).sum(1), mask.flatten(1).sum(1) * channels)


def l1_hole(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of each image over its hole pixels only (N,)."""
    channels = target.shape[1]
    return ((target - pred).abs() * mask).flatten(1).sum(1) / (mask.flatten(1).sum(1) * channels)


def ssim(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """SSIM of each image (N,), 11×11 Gaussian window, sigma 1.5, data range 1."""
    return structural_similarity_index_measure(
        pred, target, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0, reduction="none"
    )


@dataclass(frozen=True)
class Metric:
    """A score of filled images: which way is better, how it is printed, and its per-image function
    (target, filled, mask) -> (N,), averaged over images; Dice alone is a ratio of sums over all pixels."""

    name: str
    higher_is_better: bool
    format: str  # PSNRs in dB to 2 decimals, the [0, 1] scores to 4
    per_image: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


# Every score a split gets, in the order tables show them: adding a metric is adding a row here.
METRICS = {
    metric.name: metric
    for metric in (
        Metric("dice", True, ".4f"),
        Metric("psnr_hole", True, ".2f", psnr_hole),
        Metric("l1_hole", False, ".4f", l1_hole),
        Metric("ssim", True, ".4f", lambda target, filled, mask: ssim(target, filled)),
        Metric("psnr", True, ".2f", lambda target, filled, mask: psnr(target, filled)),
    )
}
METRIC_NAMES = tuple(METRICS)
VAL_METRICS = ("val_loss", *(f"val_{name}" for name in METRICS))  # what validation reports


def metric_mode(name: str) -> str:
    """ "min" or "max": which way a reported metric (e.g. `val_l1_hole`, `train_loss`) improves."""
    base = name.removeprefix("raw_").removeprefix("val_").removeprefix("train_")
    metric = METRICS.get(base)
    return "min" if base == "loss" or (metric and not metric.higher_is_better) else "max"


def best_so_far(metrics: dict[str, float], best: dict[str, float], by: str) -> dict[str, float]:
    """`best_epoch` and `best_val_*`: the validation metrics of the best epoch so far by `by` (`train.best_metric`),
    given this epoch's `metrics` and the `best_*` reported with the last one. The run registers that epoch's
    model, so sorting runs by `best_<by>` in the MLflow UI agrees with the registry and with `@best`."""
    if f"best_{by}" in best:
        better = metrics[by] > best[f"best_{by}"] if metric_mode(by) == "max" else metrics[by] < best[f"best_{by}"]
        if not better:
            return dict(best)
    return {"best_epoch": metrics["epoch"]} | {f"best_{k}": v for k, v in metrics.items() if k.startswith("val_")}


def format_metric(name: str, value: float) -> str:
    """A reported metric (e.g. `val_psnr_hole`) as tables and logs print it."""
    metric = METRICS.get(name.removeprefix("raw_").removeprefix("val_"))
    return f"{value:{metric.format if metric else '.4f'}}"


class MetricTotals:
    """Named sums over batches, so that a whole split's metrics do not depend on how it was batched, nor on
    how it was shared among workers (`all_reduce_sums` adds the workers' sums)."""

    def __init__(self) -> None:
        self.sums = {"images": 0.0, "dice_overlap": 0.0, "dice_total": 0.0}
        self.sums |= {name: 0.0 for name, metric in METRICS.items() if metric.per_image}

    @torch.no_grad()
    def update(self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch; `pred` is the raw network output, composited here."""
        filled = composite(pred, target, mask)
        self.sums["images"] += target.shape[0]
        self.sums["dice_overlap"] += (target * filled).sum().item()
        self.sums["dice_total"] += (target + filled).sum().item()
        for name, metric in METRICS.items():
            if metric.per_image:
                self.sums[name] += metric.per_image(target, filled, mask).sum().item()

    def compute(self) -> dict[str, float]:
        """The metrics, by name, from the sums (possibly all-reduced)."""
        sums = self.sums
        scores = {"dice": 2 * sums["dice_overlap"] / sums["dice_total"]}
        scores |= {name: sums[name] / sums["images"] for name, metric in METRICS.items() if metric.per_image}
        return {name: scores[name] for name in METRICS}


def all_reduce_sums(groups: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Named sums added up over the DDP workers in one all-reduce (in float64); unchanged outside DDP.

    Every worker passes the same groups and names; they are sent in sorted order, so dict order is free."""
    keys = [(group, name) for group in sorted(groups) for name in sorted(groups[group])]
    values = torch.tensor([groups[group][name] for group, name in keys], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    reduced: dict[str, dict[str, float]] = {group: {} for group in groups}
    for (group, name), value in zip(keys, values.tolist(), strict=True):
        reduced[group][name] = value
    return reduced


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mse", hole_weight: float = 6.0
) -> torch.Tensor:
    """Training loss: "mse" over the image (the paper's), "l1", or their hole-weighted forms.

    The hole-weighted forms weigh hole pixels `hole_weight` times the known ones, as inpainting work
    does since partial convolutions (Liu et al. 2018): the known pixels are easy and otherwise dominate.
    """
    error = (pred - target) ** 2 if kind in ("mse", "hole_mse") else (pred - target).abs()
    if kind in ("mse", "l1"):
        return error.mean()
    weights = 1 + (hole_weight - 1) * mask
    return (error * weights).mean() / weights.mean()
