import pytest

from inpaint.config import Config, from_dict, load_config
from inpaint.errors import UserError


def test_defaults_then_file_then_overrides(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("model:\n  fusion: add\n  widths: [8, 16, 32]\ntrain:\n  epochs: 7\n  lr: 0.01\n")
    cfg = load_config(file, ["train.epochs=3", "masks.max_size=12", "tracking.run_name=x"])
    assert cfg.model.fusion == "add" and cfg.model.widths == [8, 16, 32]
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.01
    assert cfg.masks.max_size == 12 and cfg.tracking.run_name == "x"
    assert cfg.model.mixer_depth == Config().model.mixer_depth  # untouched default


def test_round_trip_through_a_dict():
    cfg = load_config(None, ["model.variant=unet", "data.limit=100", "train.lr=3e-4"])
    assert from_dict(cfg.to_dict()) == cfg


def test_ints_are_accepted_for_floats():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_registered_model_name_follows_the_variant():
    assert load_config().registered_model == "inpaint-fused-unet"
    assert load_config(None, ["model.variant=unet"]).registered_model == "inpaint-unet"
    assert load_config(None, ["tracking.registered_model=mine"]).registered_model == "mine"


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.fusoin=add", "unknown config key 'model.fusoin'"),
        ("trian.epochs=3", "unknown config key 'trian'"),
        ("train.epochs=three", "train.epochs must be int"),
        ("train.epochs=2.5", "train.epochs must be int"),
        ("model.mask_channel=1", "model.mask_channel must be bool"),
        ("model.widths=64", "model.widths must be list"),
        ("scaling.workers=0", "scaling.workers"),
        ("scaling.workers=-2", "positive worker count"),
        ("masks.min_size=20", "masks.min_size = 20 is larger than max_size \\(16\\)"),
        ("masks.kind=circle", "masks.kind = 'circle' is not a hole family: use one of random, diagonal, strokes"),
        ("val_masks.max_coverage=1.5", "val_masks.max_coverage = 1.5 must be in \\(0, 1\\)"),
        ("masks.square_share=-0.5", "masks.square_share = -0.5 must be in \\[0, 1\\]"),
        ("model.fusion=mul", "model.fusion"),
        ("train.loss=huber", "train.loss"),
        ("epochs", "not key=value"),
        ("train=3", "'train' is a section"),
        ("train.epochs.x=3", "'train.epochs' is a value"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(UserError, match=match):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad_yaml)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  depth: 3\n")
    with pytest.raises(UserError, match="unknown config key 'model.depth'"):
        load_config(unknown)


def test_shipped_config_files_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert files, "configs/ should ship at least the paper's configuration"
    for file in files:
        load_config(file)


def job_config(*argv: str):
    """The config a training job builds from these command-line arguments."""
    import argparse

    from inpaint.config import add_config_flags, flag_values

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    parser.add_argument("--epochs", type=int)
    args = parser.parse_args(argv)
    return load_config(args.config, args.set, values=flag_values(args, epochs="train.epochs"))


def test_job_flags_win_over_set():
    cfg = job_config("--set", "scaling.workers=4", "--workers", "2", "--data", "d", "--epochs", "3")
    assert (cfg.scaling.workers, cfg.data.path, cfg.train.epochs) == (2, "d", 3)


@pytest.mark.parametrize("text", ["runs #1", "1:30", "yes", "[a, b]", "~", "3", "a: b"])
def test_strings_from_flags_and_set_arrive_unchanged(text):
    # YAML would make these "runs", 90 (sexagesimal), True, a list, None, 3 and a mapping
    assert job_config("--data", text).data.path == text
    assert job_config("--set", f"data.path={text}").data.path == text
    assert job_config("--set", f"tracking.run_name={text}").tracking.run_name == text


@pytest.mark.parametrize(
    "override, value",
    [
        ("train.epochs=12", 12),
        ("train.lr=3e-4", 3e-4),
        ("model.widths=[8, 16, 32]", [8, 16, 32]),
        ("model.mask_channel=False", False),
        ("data.limit=null", None),
        ("data.limit=", None),
    ],
)
def test_set_values_are_read_as_their_field_type(override, value):
    key = override.split("=")[0]
    cfg = load_config(None, [override])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


@pytest.mark.parametrize("override", ["train.epochs=1:30", "train.lr=1:30", "model.mask_channel=yes"])
def test_set_values_are_parsed_strictly(override):
    with pytest.raises(UserError, match=override.split("=")[0]):
        load_config(None, [override])


@pytest.mark.parametrize("limit", [1, 9])
def test_a_limit_with_no_room_for_validation_is_refused(limit):
    with pytest.raises(UserError, match=f"data.limit = {limit} must be at least 10"):
        job_config("--limit", str(limit))
    assert job_config("--limit", "10").data.limit == 10


@pytest.mark.parametrize(
    "setting, avx512_bf16, amx, expected",
    [
        ("auto", True, False, "bf16"),
        ("auto", False, True, "bf16"),
        ("auto", False, False, "fp32"),  # emulated bf16 is no faster: stay in fp32
        ("fp32", True, True, "fp32"),
        ("bf16", False, False, "bf16"),
    ],
)
def test_precision_auto_means_bf16_only_on_native_bf16_cpus(monkeypatch, setting, avx512_bf16, amx, expected):
    import torch

    from inpaint.train import training_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert training_precision(load_config(None, [f"train.precision={setting}"])) == expected


def test_the_levers_script_says_how_the_paper_config_fuses():
    import re
    from pathlib import Path

    repo = Path(__file__).parents[1]
    claims = re.findall(r"fusion by (\w+)", (repo / "experiments" / "levers.sh").read_text())
    assert claims and set(claims) == {load_config(repo / "configs" / "paper.yaml").model.fusion}


@pytest.mark.parametrize(
    "settings, rows",
    [
        ([], (None, None)),
        (["data.limit=2000"], (1800, 200)),
        (["data.limit=100000"], (95000, 5000)),  # a tenth, at most data.val
        (["data.limit=2000", "data.val=50"], (1950, 50)),  # as prepare_data splits a limited source
        (["data.limit=2000", "data.val_limit=20"], (1800, 20)),
        (["data.val_limit=20"], (None, 20)),
    ],
)
def test_limited_rows_split_the_first_images_as_a_limited_source_is_split(settings, rows):
    from inpaint.driver import limited_rows

    assert limited_rows(load_config(None, settings)) == rows
