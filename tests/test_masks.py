import pytest
import torch

from inpaint.masks import MaskConfig, apply_holes, fixed_masks, random_masks, squares


def square_of(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the hole in a (1, H, W) mask."""
    rows = mask[0].any(1).nonzero().flatten()
    cols = mask[0].any(0).nonzero().flatten()
    return int(rows[0]), int(cols[0]), len(rows), len(cols)


def test_squares_draws_exactly_the_square():
    m = squares(torch.tensor([3]), torch.tensor([1]), torch.tensor([2]), 6, 7)
    expected = torch.zeros(1, 1, 6, 7)
    expected[0, 0, 1:4, 2:5] = 1
    assert torch.equal(m, expected)


@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_random_holes_are_squares_in_range_and_inside(size):
    cfg = MaskConfig(kind="random", min_size=4, max_size=12)
    masks = random_masks(500, *size, cfg, torch.Generator().manual_seed(0))
    sides = set()
    for m in masks:
        top, left, h, w = square_of(m)
        assert h == w and 4 <= h <= 12
        assert m.sum() == h * w  # one filled square, nothing outside it
        sides.add(h)
    assert sides == set(range(4, 13))  # every side in the range is drawn
    # placed anywhere: holes touch each border of the image somewhere
    assert masks[:, 0, 0, :].any() and masks[:, 0, -1, :].any()
    assert masks[:, 0, :, 0].any() and masks[:, 0, :, -1].any()


def test_diagonal_holes_match_the_papers_code():
    masks = fixed_masks(torch.arange(2000), 32, 32, MaskConfig(kind="diagonal"), seed=0)
    offsets = set()
    for m in masks:
        top, left, h, w = square_of(m)
        assert (h, w) == (11, 11) and top == left
        offsets.add(top)
    assert offsets == set(range(2, 20))


def test_fixed_holes_are_a_pure_function_of_seed_and_index():
    cfg = MaskConfig(kind="random", min_size=4, max_size=16)
    a = fixed_masks(torch.tensor([0, 1, 2, 3, 4]), 32, 32, cfg, seed=7)
    b = fixed_masks(torch.tensor([3, 4]), 32, 32, cfg, seed=7)  # other batching, same images
    assert torch.equal(a[3:], b)
    assert not torch.equal(a, fixed_masks(torch.arange(5), 32, 32, cfg, seed=8))
    assert not torch.equal(a[0], a[1])


def test_training_holes_are_fresh_every_batch():
    cfg = MaskConfig(kind="random", min_size=4, max_size=16)
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(random_masks(8, 32, 32, cfg, g), random_masks(8, 32, 32, cfg, g))


def test_apply_holes_zeroes_only_the_hole():
    images = torch.rand(2, 3, 8, 8) + 0.1
    masks = squares(torch.tensor([2, 3]), torch.tensor([0, 4]), torch.tensor([1, 5]), 8, 8)
    out = apply_holes(images, masks)
    assert (out * masks).abs().sum() == 0
    assert torch.equal(out * (1 - masks), images * (1 - masks))


@pytest.mark.parametrize(
    "cfg, match",
    [
        (MaskConfig(min_size=10, max_size=4), "larger than max_size"),
        (MaskConfig(min_size=4, max_size=40), "larger than the 32×32 images"),
        (MaskConfig(min_size=0, max_size=4), "at least 1"),
        (MaskConfig(kind="circle"), "kind"),
    ],
)
def test_impossible_holes_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        cfg.validate(32, 32)
