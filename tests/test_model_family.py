"""The model family beyond the paper's (issue 25): every `model.*` choice builds, trains a step and exports
as the registered graph does at 3 and 4 levels; saved configs without the family's keys keep building
today's network once the defaults change; what a network costs."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch.export import Dim

from inpaint import tracking
from inpaint.checkpoints import load_checkpoint_state, model_from_state
from inpaint.config import Config, from_dict, load_config
from inpaint.metrics import reconstruction_loss
from inpaint.models import LEGACY_MODEL, ModelConfig, build_model, count_parameters, forward_backward_flops, model_input
from inpaint.models.blocks import ACTIVATIONS, BLOCKS, DOWNSAMPLINGS, NORMS, UPSAMPLINGS
from inpaint.models.prefill import PREFILLS
from inpaint.train import log_cost

ROOT = Path(__file__).parents[1]
BASELINE = Path(__file__).parent / "fixtures" / "baseline"
OLDEST = Path(__file__).parent / "data" / "checkpoint-7c4ea93.pt"  # the first saved config this project loads
LEVELS = {3: [8, 16, 32], 4: [8, 16, 32, 64]}

# Between them, every entry of every table and every new key's values (`test_the_family_covers_every_choice`).
FAMILY = {
    "residual": dict(block="residual", downsampling="stride", upsampling="bilinear", norm="group", activation="gelu",
                     blocks_per_level=2, bottleneck_dilations=[1, 2], decoder_blocks=1),
    "nafnet": dict(block="nafnet", upsampling="nearest", fusion_scales="all", mixer_patch_size=1, blocks_per_level=3,
                   bottleneck_dilations=[2, 4]),
    "fourier": dict(block="fourier", upsampling="pixelshuffle", norm="none", activation="silu", fusion_scales="all",
                    fusion="add", mixer_patch_size=4, decoder_blocks=2),
    "plain-dilated": dict(block="plain", activation="gelu", bottleneck_dilations=[2], downsampling="stride",
                          prefill="ns"),
    "unet-residual": dict(variant="unet", block="residual", fusion_scales="all"),
    "residual-telea": dict(block="residual", prefill="telea"),
}  # fmt: skip
# Their residual head starts at 0, so nothing before it gets a gradient on the first step (`prefill.py`).
PREFILLED = {name for name, options in FAMILY.items() if options.get("prefill", "none") != "none"}


def family_config(name: str, levels: int) -> ModelConfig:
    return ModelConfig(widths=LEVELS[levels], mixer_dim=16, **FAMILY[name])


def test_the_family_covers_every_choice():
    tables = {"block": BLOCKS, "downsampling": DOWNSAMPLINGS, "upsampling": UPSAMPLINGS, "norm": NORMS}
    tables |= {"activation": ACTIVATIONS, "fusion_scales": ("bottleneck", "all"), "prefill": PREFILLS}
    for key, table in tables.items():
        tried = {getattr(ModelConfig(**options), key) for options in FAMILY.values()}
        assert tried == set(table), key


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("name", FAMILY)
def test_every_choice_trains_a_step(name, levels):
    torch.manual_seed(0)
    model = build_model(family_config(name, levels)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, mask = torch.rand(2, 3, 32, 48), torch.zeros(2, 1, 32, 48)
    mask[..., 8:20, 10:22] = 1
    before = [p.detach().clone() for p in model.parameters()]
    loss = reconstruction_loss(model(model_input(images * (1 - mask), mask)), images, mask, "hole_l1")
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    # NAFNet's residual scales start at 0, so the convs inside its branches get no gradient on the first step
    assert all(changed) if name != "nafnet" and name not in PREFILLED else any(changed)


def test_the_fourier_block_trains_under_bf16_autocast():
    """torch.fft has no bf16 CPU kernels: the Fourier unit runs in fp32 inside the bf16 forward."""
    torch.manual_seed(0)
    model = build_model(family_config("fourier", 3)).train()
    x = torch.rand(2, 4, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().mean().backward()
    assert torch.isfinite(y.float()).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("name", FAMILY)
def test_every_choice_exports_with_free_height_and_width(name, levels):
    """As `tracking.log_model` saves it: mlflow.pytorch.log_model(serialization_format="pt2") exports the eval
    model with Dim.AUTO on the signature's free dimensions (batch, height, width); the graph then runs other
    sizes than its example's and gives the module's output."""
    torch.manual_seed(0)
    model = build_model(family_config(name, levels)).eval()
    graph = torch.export.export(
        model, (torch.rand(2, 4, 32, 32),), dynamic_shapes=[{0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}]
    ).module()
    for shape in [(2, 4, 32, 32), (3, 4, 48, 64)]:
        x = torch.rand(shape)
        with torch.no_grad():
            torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-6)


def test_dilations_cycle_through_the_bottlenecks_blocks():
    cfg = ModelConfig(widths=[8, 16, 32], block="residual", blocks_per_level=3, bottleneck_dilations=[1, 2])
    model = build_model(cfg)
    convs = [m for m in model.bottleneck.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [conv.dilation[0] for conv in convs] == [1, 1, 2, 2, 1, 1]  # two convs a block
    assert {m.dilation[0] for m in model.enc2.modules() if isinstance(m, torch.nn.Conv2d)} == {1}


@pytest.mark.parametrize("scales, reaches_the_skips", [("bottleneck", False), ("all", True)])
def test_the_mixer_joins_every_skip_only_when_asked(scales, reaches_the_skips):
    """`fusion_scales: all`: one more fusion per skip, and a change of the ConvMixer's stem then moves every
    skip (the finest at 4× the mixer's size), not only the bottleneck."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=[8, 16, 32], mixer_dim=16, mixer_patch_size=4, fusion_scales=scales)).eval()
    assert ({"fuse1.weight", "fuse2.weight"} <= set(model.state_dict())) == reaches_the_skips
    x = torch.rand(1, 4, 32, 32)
    before = model.forward_features(x)
    with torch.no_grad():
        model.mixer[0].weight.add_(1.0)
    after = model.forward_features(x)
    assert not torch.allclose(before[0], after[0])
    for skip, moved in zip(before[1], after[1], strict=True):
        assert (not torch.allclose(skip, moved)) == reaches_the_skips


# ---------------------------------------------------------------------------------------------
# Saved configs keep building their network when the defaults change

NEW_DEFAULTS = dict(
    block="residual", blocks_per_level=2, downsampling="stride", upsampling="bilinear", norm="group",
    activation="silu", fusion_scales="all", bottleneck_dilations=[1, 2], decoder_blocks=1,
)  # fmt: skip


@pytest.fixture
def new_defaults(monkeypatch):
    """ModelConfig's defaults as a future default recipe may set them."""
    monkeypatch.setattr(ModelConfig, "__init__", functools.partialmethod(ModelConfig.__init__, **NEW_DEFAULTS))
    assert Config().model.block == "residual" and Config().model.bottleneck_dilations == [1, 2]


def test_legacy_values_cover_every_key_the_oldest_saved_config_lacks():
    oldest = torch.load(OLDEST, map_location="cpu", weights_only=True)["config"]["model"]
    assert set(LEGACY_MODEL) == {f.name for f in dataclasses.fields(ModelConfig)} - set(oldest)
    assert set(NEW_DEFAULTS) <= set(LEGACY_MODEL)


@pytest.mark.parametrize("name", ["fused", "paper"])
def test_a_saved_config_without_the_family_keys_builds_todays_network_after_the_defaults_change(name, new_defaults):
    state = load_checkpoint_state(str(BASELINE / name))
    assert not set(LEGACY_MODEL) & set(state["config"]["model"])
    model = model_from_state(state)  # a checkpoint, and a registered model (its run's logged config): strict load
    assert list(model.state_dict()) == list(state["model"])
    resumed = load_config(None, base=state["config"])  # a --resume'd run's saved params
    for key, value in LEGACY_MODEL.items():
        assert getattr(resumed.model, key) == value == getattr(from_dict(state["config"]).model, key)


def test_a_saved_config_with_the_family_keys_keeps_them(new_defaults):
    saved = Config(model=ModelConfig(**LEGACY_MODEL)).to_dict()
    saved["model"]["block"] = "fourier"
    assert from_dict(saved).model.block == "fourier" and from_dict(saved).model.norm == "batch"


def test_the_papers_config_pins_todays_network_after_the_defaults_change(new_defaults):
    paper = load_config(ROOT / "configs" / "paper.yaml").model
    assert {key: getattr(paper, key) for key in LEGACY_MODEL} == LEGACY_MODEL


# ---------------------------------------------------------------------------------------------
# Cost


def test_training_flops_per_image_grow_with_the_width_and_leave_the_model_alone():
    torch.manual_seed(0)
    narrow, wide = (build_model(ModelConfig(widths=[w, 2 * w, 4 * w], mixer_dim=16)).train() for w in (8, 16))
    state = {key: value.clone() for key, value in narrow.state_dict().items()}
    rng = torch.get_rng_state()
    flops = forward_backward_flops(narrow, 32, 32)
    assert 0 < flops < forward_backward_flops(wide, 32, 32)
    assert forward_backward_flops(narrow, 64, 64) == 4 * flops  # per image, linear in the pixels
    assert narrow.training and all(p.grad is None for p in narrow.parameters())
    assert all(torch.equal(state[key], value) for key, value in narrow.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())  # the workers' random streams stay in step
    assert count_parameters(wide) > count_parameters(narrow)


def test_a_run_logs_its_cost_once_at_step_0(tmp_path):
    """What the rank-0 worker logs at the start of a run (and again, as a no-op, after every restart)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "inpaint", "cost", {})
    model = build_model(ModelConfig(widths=[8, 16, 32], mixer_dim=16))
    for _ in range(2):
        log_cost(model, 32, 48, run_id, uri)
    client = MlflowClient(uri)
    parameters = client.get_metric_history(run_id, "model_parameters")
    gflops = client.get_metric_history(run_id, "model_gflops_per_image")
    assert [(m.step, m.value) for m in parameters] == [(0, count_parameters(model))]
    assert [(m.step, m.value) for m in gflops] == [(0, forward_backward_flops(model, 32, 48) / 1e9)]
