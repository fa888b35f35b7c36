import pytest
import torch

from inpaint.models import ModelConfig, build_model, count_parameters, model_input

VARIANTS = [
    dict(variant="unet"),
    dict(variant="unet", mask_channel=True),
    dict(variant="fused", fusion="concat"),
    dict(variant="fused", fusion="add"),
    dict(variant="fused", fusion="add", mixer_dim=64, mixer_patch_size=4, mask_channel=True),
    dict(variant="fused", fusion="concat", mixer_patch_size=1, mixer_kernel_size=9, mixer_depth=3),
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_output_shape_and_range(overrides, size):
    model = build_model(ModelConfig(widths=[8, 16, 32], **overrides)).eval()
    x = torch.rand(2, 4, *size)
    y = model(x)
    assert y.shape == (2, 3, *size)
    assert y.min() >= 0 and y.max() <= 1


def test_bottleneck_is_a_quarter_of_the_input():
    model = build_model(ModelConfig(widths=[8, 16, 32], mixer_dim=16)).eval()
    z, skips = model.forward_features(torch.rand(1, 4, 64, 48))
    assert z.shape == (1, 32, 16, 12)
    assert [s.shape[-2:] for s in skips] == [(64, 48), (32, 24)]


def test_sides_not_divisible_by_four_are_refused():
    model = build_model(ModelConfig(widths=[8, 16, 32]))
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 4, 30, 32))


def test_mask_channel_is_seen_only_when_asked():
    x = torch.rand(1, 4, 32, 32)
    x_other_mask = x.clone()
    x_other_mask[:, 3] = 1 - x_other_mask[:, 3]
    for mask_channel, same in [(False, True), (True, False)]:
        torch.manual_seed(0)
        model = build_model(ModelConfig(widths=[8, 16, 32], mask_channel=mask_channel)).eval()
        assert torch.equal(model(x), model(x_other_mask)) == same


def test_fused_output_depends_on_the_mixer():
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=[8, 16, 32], mixer_dim=32, fusion="add")).eval()
    x = torch.rand(1, 4, 32, 32)
    before = model(x)
    with torch.no_grad():
        model.mixer[0].weight.add_(1.0)
    assert not torch.allclose(before, model(x))


def test_paper_parameter_counts():
    # The paper's code: widths 64/128/256, ConvMixer dim 256, depth 2, kernel 5, patch 2 (quoted in docs/results.md)
    paper = dict(mask_channel=False, dropout=0.5)
    assert count_parameters(build_model(ModelConfig(variant="unet", **paper))) == 741_763
    assert count_parameters(build_model(ModelConfig(variant="fused", fusion="add", **paper))) == 892_547
    assert count_parameters(build_model(ModelConfig(variant="fused", fusion="concat", **paper))) == 1_023_875
    # the default recipe sees the mask: a 4th input channel to the U-Net's first conv (64·9) and the
    # ConvMixer's patch stem (256·2·2)
    assert count_parameters(build_model(ModelConfig())) == 1_023_875 + 64 * 9 + 256 * 4


def test_parameter_count_follows_the_config():
    small = count_parameters(build_model(ModelConfig(variant="fused", mixer_depth=1)))
    deep = count_parameters(build_model(ModelConfig(variant="fused", mixer_depth=4)))
    # each ConvMixer block: depthwise k×k (256·25 + 256), pointwise (256·256 + 256), two BatchNorms (4·256)
    assert deep - small == 3 * (256 * 25 + 256 + 256 * 256 + 256 + 4 * 256)


def test_model_input_stacks_mask_last():
    masked, mask = torch.rand(2, 3, 8, 8), torch.ones(2, 1, 8, 8)
    x = model_input(masked, mask)
    assert x.shape == (2, 4, 8, 8) and torch.equal(x[:, 3:], mask) and torch.equal(x[:, :3], masked)


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(variant="resnet"), "variant"),
        (dict(fusion="mul"), "fusion"),
        (dict(mixer_patch_size=3), "mixer_patch_size"),
        (dict(mixer_kernel_size=4), "mixer_kernel_size"),
        (dict(widths=[8, 16]), "widths"),
    ],
)
def test_bad_model_config_names_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        build_model(ModelConfig(**bad))
