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

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

METRIC_NAMES = ("dice", "psnr_hole", "psnr", "l1_hole", "ssim")
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


class MetricTotals:
    """Sums over batches, so a whole split's metrics do not depend on how it was batched.

    Per-image metrics are averaged over images; Dice keeps the paper's definition over all pixels.
    """

    def __init__(self) -> None:
        self.sums = torch.zeros(6, dtype=torch.float64)  # psnr_hole, psnr, l1_hole, ssim, Σ(y·p), Σ(y+p)
        self.images = 0

    @torch.no_grad()
    def update(self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch; `pred` is the raw network output, composited here."""
        filled = composite(pred, target, mask)
        self.sums += torch.stack(
            [
                psnr_hole(target, filled, mask).sum(),
                psnr(target, filled).sum(),
                l1_hole(target, filled, mask).sum(),
                ssim(target, filled).sum(),
                (target * filled).sum(),
                (target + filled).sum(),
            ]
        ).double()
        self.images += target.shape[0]

    def state(self) -> torch.Tensor:
        """The totals as one tensor (sums then image count), for all-reducing across workers."""
        return torch.cat([self.sums, torch.tensor([self.images], dtype=torch.float64)])

    @staticmethod
    def compute(state: torch.Tensor) -> dict[str, float]:
        """Metrics from (possibly all-reduced) totals."""
        psnr_hole_sum, psnr_sum, l1_sum, ssim_sum, overlap, total, images = state.tolist()
        return {
            "dice": 2 * overlap / total,
            "psnr_hole": psnr_hole_sum / images,
            "psnr": psnr_sum / images,
            "l1_hole": l1_sum / images,
            "ssim": ssim_sum / images,
        }


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
