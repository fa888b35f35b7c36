import cv2
import numpy as np
import pytest
import torch

from inpaint.checkpoints import train_scale
from inpaint.config import load_config
from inpaint.fill import hole_thickness
from inpaint.masks import KINDS, MaskConfig, apply_holes, fixed_masks, random_masks, squares

SIZES = [(32, 32), (128, 96)]


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


def test_training_squares_are_todays_three_uniforms_per_image():
    """The squares a seeded generator gives are what it gave before strokes came: side, top, left from its
    float64 uniforms (a repeated or resumed run trains on the same holes)."""
    cfg = MaskConfig(kind="random", min_size=4, max_size=12)
    masks = random_masks(50, 32, 48, cfg, torch.Generator().manual_seed(5))
    uniforms = torch.rand(50, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64).tolist()
    for mask, (u_side, u_top, u_left) in zip(masks, uniforms, strict=True):
        side = 4 + int(u_side * 9)
        assert square_of(mask) == (int(u_top * (32 - side + 1)), int(u_left * (48 - side + 1)), side, side)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_every_kind_gives_binary_holes_of_the_picture_size(kind, size):
    cfg = MaskConfig(kind=kind)
    fresh = random_masks(64, *size, cfg, torch.Generator().manual_seed(0))
    for masks in (fresh, fixed_masks(np.arange(64), *size, cfg, seed=3)):
        assert masks.shape == (64, 1, *size) and masks.dtype == torch.float32
        assert set(masks.unique().tolist()) == {0.0, 1.0}
        hole_pixels = masks.flatten(1).sum(1)
        assert (hole_pixels >= 1).all() and (hole_pixels < size[0] * size[1]).all()  # a hole, never all


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("coverage", [(0.05, 0.35), (0.2, 0.3)])
def test_strokes_cover_a_share_of_the_picture_in_the_configured_range(size, coverage):
    """Never more than max_coverage, short of min_coverage by less than a piece (here 3% at most), and the
    whole range drawn."""
    low, high = coverage
    cfg = MaskConfig(kind="strokes", min_coverage=low, max_coverage=high)
    shares = fixed_masks(np.arange(400), *size, cfg, seed=0).mean((1, 2, 3)).numpy()
    assert shares.max() <= high and shares.min() >= low - 0.03
    quarter = (high - low) / 4
    assert (shares < low + quarter).mean() > 0.05 and (shares > high - quarter).mean() > 0.05


def thicknesses(masks: torch.Tensor) -> np.ndarray:
    """How thick each 8-connected group of hole pixels is, as the fill path measures it."""
    found = []
    for mask in masks[:, 0].numpy().astype(np.uint8):
        count, labels = cv2.connectedComponents(mask, connectivity=8)
        found += [hole_thickness(labels == label) for label in range(1, count)]
    return np.array(found)


def test_strokes_scale_with_the_picture_and_train_scale_says_how_thick_they_are():
    medians = {}
    for side in (32, 128):
        drawn = thicknesses(fixed_masks(np.arange(200), side, side, MaskConfig(kind="strokes"), seed=0))
        scale = train_scale(load_config(None, ["masks.kind=strokes", f"data.image_size=[{side},{side}]"]))
        assert np.percentile(drawn, 25) <= scale.hole <= np.percentile(drawn, 75), (side, scale)
        medians[side] = np.median(drawn)
    assert 2.5 < medians[128] / medians[32] < 5.5  # a picture 4 times larger, strokes about 4 times thicker


def test_mixed_holes_train_at_their_largest_square():
    sets = ["masks.kind=mixed", "masks.min_size=16", "masks.max_size=48", "data.image_size=[128,128]"]
    assert train_scale(load_config(None, sets)).hole == 48


def is_square(mask: torch.Tensor, cfg: MaskConfig) -> bool:
    _, _, height, width = square_of(mask)
    return height == width and cfg.min_size <= height <= cfg.max_size and mask.sum() == height * width


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_mixed_gives_squares_on_about_square_share_of_the_images_and_strokes_on_the_rest(share):
    cfg = MaskConfig(kind="mixed", min_size=16, max_size=32, square_share=share)
    masks = fixed_masks(np.arange(600), 96, 128, cfg, seed=1)
    square = torch.tensor([is_square(mask, cfg) for mask in masks])
    assert abs(square.float().mean().item() - share) < 0.06
    stroke_shares = masks[~square].mean((1, 2, 3))
    assert ((stroke_shares >= cfg.min_coverage - 0.03) & (stroke_shares <= cfg.max_coverage)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_holes_are_a_pure_function_of_seed_and_index(kind):
    cfg = MaskConfig(kind=kind, min_size=4, max_size=16)
    a = fixed_masks(torch.tensor([0, 1, 2, 3, 4]), 32, 32, cfg, seed=7)
    b = fixed_masks(torch.tensor([3, 4]), 32, 32, cfg, seed=7)  # other batching, same images
    assert torch.equal(a[3:], b)
    assert not torch.equal(a, fixed_masks(torch.arange(5), 32, 32, cfg, seed=8))
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("kind", KINDS)
def test_training_holes_are_reproducible_from_the_seed_and_fresh_every_batch(kind):
    cfg = MaskConfig(kind=kind, min_size=4, max_size=16)
    holes, again = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    first = random_masks(8, 32, 32, cfg, holes)
    assert torch.equal(first, random_masks(8, 32, 32, cfg, again))
    assert not torch.equal(first, random_masks(8, 32, 32, cfg, holes))


def test_apply_holes_zeroes_only_the_hole():
    images = torch.rand(2, 3, 8, 8) + 0.1
    masks = squares(torch.tensor([2, 3]), torch.tensor([0, 4]), torch.tensor([1, 5]), 8, 8)
    out = apply_holes(images, masks)
    assert (out * masks).abs().sum() == 0
    assert torch.equal(out * (1 - masks), images * (1 - masks))


@pytest.mark.parametrize(
    "cfg, message",
    [
        (MaskConfig(min_size=10, max_size=4), "masks.min_size = 10 is larger than max_size (4)"),
        (MaskConfig(min_size=4, max_size=40), "masks.max_size = 40 is larger than the 32×32 images: use at most 32"),
        (MaskConfig(kind="mixed", max_size=40), "masks.max_size = 40 is larger than the 32×32 images"),
        (MaskConfig(min_size=0, max_size=4), "masks.min_size = 0 must be at least 1"),
        (MaskConfig(kind="circle"), "masks.kind = 'circle' is not a hole family: use one of random, diagonal, strokes"),
        (MaskConfig(kind="strokes", min_coverage=0), "masks.min_coverage = 0 must be in (0, 1)"),
        (MaskConfig(kind="strokes", max_coverage=1.0), "masks.max_coverage = 1.0 must be in (0, 1)"),
        (MaskConfig(min_coverage=0.4, max_coverage=0.3), "masks.min_coverage = 0.4 is larger than max_coverage (0.3)"),
        (MaskConfig(kind="mixed", square_share=1.5), "masks.square_share = 1.5 must be in [0, 1]"),
    ],
)
def test_impossible_holes_are_refused_naming_the_key(cfg, message):
    with pytest.raises(ValueError) as refused:
        cfg.validate(32, 32)
    assert message in str(refused.value)


def test_strokes_fit_pictures_their_unused_square_sizes_would_not():
    MaskConfig(kind="strokes", max_size=40).validate(32, 32)
