from pathlib import Path

import pytest
import torch

from inpaint.checkpoints import load_checkpoint_state
from inpaint.config import from_dict, load_config
from inpaint.errors import UserError
from inpaint.metrics import reconstruction_loss
from inpaint.models import ModelConfig, build_model, count_parameters, model_input

BASELINE = Path(__file__).parent / "fixtures" / "baseline"
DEPTHS = [[8, 16], [8, 16, 32], [8, 16, 32, 64]]

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


@pytest.mark.parametrize("widths", DEPTHS, ids=len)
def test_the_bottleneck_is_at_the_size_multiples_scale(widths):
    """Each level halves the size; the ConvMixer's features are pooled to the bottleneck's, whatever the depth."""
    model = build_model(ModelConfig(widths=widths, mixer_dim=16)).eval()
    assert model.size_multiple == 2 ** (len(widths) - 1)
    z, skips = model.forward_features(torch.rand(1, 4, 64, 48))
    assert z.shape == (1, widths[-1], 64 // model.size_multiple, 48 // model.size_multiple)
    assert [s.shape[-2:] for s in skips] == [(64 // 2**i, 48 // 2**i) for i in range(len(widths) - 1)]


@pytest.mark.parametrize("widths, side", [([8, 16], 31), ([8, 16, 32], 30), ([8, 16, 32, 64], 36)])
def test_sides_not_multiples_of_the_size_multiple_are_refused(widths, side):
    model = build_model(ModelConfig(widths=widths, mixer_dim=16))
    with pytest.raises(ValueError, match=f"multiples of {model.size_multiple}"):
        model(torch.rand(1, 4, side, 32))


@pytest.mark.parametrize("variant", ["unet", "fused"])
@pytest.mark.parametrize("widths", [[8, 16], [8, 16, 32, 64]], ids=len)
def test_u_nets_of_two_and_four_levels_train_a_step(widths, variant):
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant=variant, widths=widths, mixer_dim=16, mixer_patch_size=2)).train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images, mask = torch.rand(2, 3, 32, 48), torch.zeros(2, 1, 32, 48)
    mask[..., 8:20, 10:22] = 1
    loss = reconstruction_loss(model(model_input(images * (1 - mask), mask)), images, mask, "hole_l1")
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", ["fused", "paper"])
def test_three_levels_keep_the_keys_and_parameter_order_of_earlier_checkpoints(name):
    """The names a checkpoint's weights load by, and the order an optimizer state's entries follow."""
    state = load_checkpoint_state(str(BASELINE / name))
    model = build_model(from_dict(state["config"]).model)
    assert list(model.state_dict()) == list(state["model"])
    parameters = dict(model.named_parameters())
    assert list(parameters) == [key for key in state["model"] if key in parameters]


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
        (dict(widths=[8]), "widths"),
        (dict(widths=[]), "widths"),
        (dict(widths=[8, 0, 16]), "widths"),
        (dict(widths=[8, 16], mixer_patch_size=4), "mixer_patch_size"),  # more than the bottleneck's scale, 2
        (dict(block="dense"), "block"),
        (dict(downsampling="avgpool"), "downsampling"),
        (dict(upsampling="bicubic"), "upsampling"),
        (dict(norm="layer"), "norm"),
        (dict(activation="tanh"), "activation"),
        (dict(fusion_scales="every"), "fusion_scales"),
        (dict(blocks_per_level=0), "blocks_per_level"),
        (dict(decoder_blocks=-1), "decoder_blocks"),
        (dict(bottleneck_dilations=[]), "bottleneck_dilations"),
        (dict(bottleneck_dilations=[1, 0]), "bottleneck_dilations"),
        (dict(prefill="lama"), "prefill"),
    ],
)
def test_bad_model_config_names_the_key(bad, key):
    with pytest.raises(ValueError, match=f"model.{key} ") as refused:
        build_model(ModelConfig(**bad))
    if isinstance(bad.get(key), str):  # a choice: the allowed values are named too
        assert "must be one of (" in str(refused.value)


def test_a_u_net_of_one_level_is_refused_naming_the_key_in_one_line():
    with pytest.raises(UserError) as refused:
        load_config(None, ["model.widths=[64]"])
    assert str(refused.value).startswith("model.widths must be") and "\n" not in str(refused.value)


def test_the_mixer_patch_may_be_as_large_as_the_bottlenecks_scale():
    model = build_model(ModelConfig(widths=[8, 16, 32, 64], mixer_dim=16, mixer_patch_size=8)).eval()
    assert model(torch.rand(1, 4, 16, 24)).shape == (1, 3, 16, 24)
