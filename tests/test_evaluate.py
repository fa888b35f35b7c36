"""Evaluation: the baselines on hand-worked cases, the evaluation job against a just-trained tiny model
(as a checkpoint folder and as a registered MLflow model), and filling a user's image file."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from inpaint import pictures, tracking
from inpaint.checkpoints import CHECKPOINT_FILE
from inpaint.config import load_config
from inpaint.data import read_split, to_float_images
from inpaint.evaluate import BASELINES, load_model, mean_fill, zero_fill
from inpaint.fill import flip_averaged_fill, model_fill
from inpaint.masks import apply_holes, random_masks, squares
from inpaint.metrics import MAX_PSNR, METRIC_NAMES, MetricTotals, reconstruction_loss
from inpaint.models import build_model, model_input

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.widths=[8,16,32]", "model.mixer_dim=16", "model.mask_channel=true", "model.dropout=0"]


def score(fill, images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    totals = MetricTotals()
    totals.update(images, fill(apply_holes(images, masks), masks), masks)
    return totals.compute()


def one_hole(n: int = 2, size: int = 32, side: int = 8, at: int = 10) -> torch.Tensor:
    return squares(torch.full((n,), side), torch.full((n,), at), torch.full((n,), at), size, size)


def job(name: str):
    return runpy.run_path(str(REPO / "jobs" / f"{name}.py"))["main"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors here are tiny: a second thread only waits for the first, and slows everything down badly
    when other jobs hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> SimpleNamespace:
    """A tiny fused model trained for a few seconds on the tiny training split, saved as a checkpoint folder
    (as Ray Train's workers write it) and logged, registered as `tiny`, to a SQLite MLflow store."""
    root = tmp_path_factory.mktemp("trained")
    cfg = load_config(None, TINY_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    images = to_float_images(read_split(tiny_data, "train")[0])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    holes = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = images[torch.randint(len(images), (16,), generator=holes)]
        masks = random_masks(len(batch), 32, 32, cfg.masks, holes)
        pred = model(model_input(apply_holes(batch, masks), masks))
        loss = reconstruction_loss(pred, batch, masks, "hole_l1")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    checkpoint = root / "checkpoint_000001"
    checkpoint.mkdir()
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1}, checkpoint / CHECKPOINT_FILE)

    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "inpaint", "tiny", cfg.to_dict())
    example = model_input(apply_holes(images[:2], one_hole()), one_hole()).numpy()
    model_uri = tracking.log_model(run_id, model, example, registered_name="tiny", tracking_uri=uri)
    tracking.end_run(run_id, tracking_uri=uri)
    return SimpleNamespace(model=model, checkpoint=checkpoint, tracking_uri=uri, model_uri=model_uri, root=root)


# ---------------------------------------------------------------------------------------------
# Baselines, on cases worked out by hand


def test_mean_fill_of_a_constant_image_is_exact():
    images = torch.full((2, 3, 32, 32), 0.3)
    images[1] = torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1)
    metrics = score(mean_fill, images, one_hole())
    assert metrics["psnr_hole"] == MAX_PSNR and metrics["psnr"] == MAX_PSNR
    assert metrics["l1_hole"] == pytest.approx(0, abs=1e-6) and metrics["ssim"] == pytest.approx(1, abs=1e-4)


def test_mean_fill_sees_only_the_known_pixels():
    images = torch.full((1, 3, 32, 32), 0.25)
    masks = one_hole(1)
    images = images + 0.5 * masks  # the hole holds 0.75, which the fill must not know
    filled = mean_fill(apply_holes(images, masks), masks)
    torch.testing.assert_close(filled, torch.full_like(images, 0.25))


def test_zero_fill_of_a_constant_image_misses_by_its_colour():
    colour = 0.6
    metrics = score(zero_fill, torch.full((2, 3, 32, 32), colour), one_hole())
    assert metrics["l1_hole"] == pytest.approx(colour)
    assert metrics["psnr_hole"] == pytest.approx(-20 * np.log10(colour), abs=1e-4)  # MSE = colour²


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_opencv_fills_a_constant_image_almost_exactly(method):
    images = torch.full((2, 3, 32, 32), 153 / 255)  # a whole uint8 level: no rounding on the way in
    metrics = score(BASELINES[method], images, one_hole(side=11, at=2))
    assert metrics["l1_hole"] <= 1 / 255


# ---------------------------------------------------------------------------------------------
# Models at any size


def test_registered_model_is_rebuilt_to_take_any_size(trained):
    rebuilt = load_model(trained.model_uri, trained.tracking_uri)
    graph = mlflow.pytorch.load_model(trained.model_uri)  # the pt2 export, with free height and width
    masks = one_hole(3)
    masked = apply_holes(torch.rand(3, 3, 32, 32), masks)
    with torch.no_grad():
        torch.testing.assert_close(model_fill(rebuilt, masked, masks), graph(model_input(masked, masks)))
        small = model_input(masked[..., :28, :24], masks[..., :28, :24])
        torch.testing.assert_close(rebuilt(small), graph(small))
    odd = model_fill(rebuilt, masked[..., :30, :27], masks[..., :30, :27])
    assert odd.shape == (3, 3, 30, 27) and odd.min() >= 0 and odd.max() <= 1


@pytest.mark.parametrize("height, width", [(64, 64), (48, 80)])
def test_the_registered_graph_fills_other_sizes_than_the_training_size(trained, height, width):
    """The contract `tracking.log_model` states: the logged pt2 graph (trained on 32×32) takes any size
    whose sides are multiples of its size multiple (4), and gives what the network rebuilt from its config gives."""
    graph = mlflow.pytorch.load_model(trained.model_uri)
    masks = squares(torch.full((2,), 12), torch.full((2,), 20), torch.full((2,), 30), height, width)
    inputs = model_input(apply_holes(torch.rand(2, 3, height, width), masks), masks)
    with torch.no_grad():
        filled = graph(inputs)
        assert filled.shape == (2, 3, height, width)
        torch.testing.assert_close(filled, load_model(trained.model_uri, trained.tracking_uri)(inputs))


def test_model_fill_pads_by_replicating_the_border(trained):
    masks = one_hole(1)
    masked = apply_holes(torch.rand(1, 3, 32, 32), masks)
    cropped = model_fill(trained.model, masked[..., :30, :29], masks[..., :30, :29])
    padded = torch.nn.functional.pad(torch.cat([masked, masks], 1)[..., :30, :29], (0, 3, 0, 2), mode="replicate")
    with torch.no_grad():
        torch.testing.assert_close(cropped, trained.model(padded)[..., :30, :29])


# ---------------------------------------------------------------------------------------------
# The evaluation job


def test_evaluation_job_compares_every_method_and_logs_it(trained, tiny_data, tmp_path, capsys):
    args = ["--model", str(trained.checkpoint), "--second-model", "models:/tiny/1", "--data", str(tiny_data)]
    args += ["--tracking-uri", trained.tracking_uri, "--json", str(tmp_path / "eval.json")]
    job("evaluate")(args)
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())

    methods = ["model", "model2", "telea", "ns", "mean", "zero"]
    assert [row["method"] for row in report["rows"]] == methods
    assert all(set(row) == {"method", *METRIC_NAMES} for row in report["rows"])
    assert report["images"] == 8 and report["split"] == "test"  # the prepared dataset's test split
    assert report["holes"] == {"kind": "diagonal", "seed": 1234, "description": "diagonal 11×11 squares, seed 1234"}
    rows = {row["method"]: row for row in report["rows"]}
    for name in METRIC_NAMES:  # the checkpoint and the registered model hold the same weights
        assert rows["model"][name] == pytest.approx(rows["model2"][name], abs=1e-5)
    assert rows["telea"]["psnr_hole"] > rows["mean"]["psnr_hole"] > rows["zero"]["psnr_hole"]  # smooth images
    assert "| method | dice | psnr_hole | l1_hole | ssim | psnr |" in out
    assert all(f"| {method} |" in out for method in methods)

    client = MlflowClient(trained.tracking_uri)
    run = client.get_run(report["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "inpaint-eval"
    assert run.data.params["models.model2"] == "models:/tiny/1" and run.data.params["holes.kind"] == "diagonal"
    assert set(run.data.metrics) == {f"{method}_{name}" for method in methods for name in METRIC_NAMES}
    assert run.data.metrics["telea_psnr_hole"] == pytest.approx(rows["telea"]["psnr_hole"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts >= {"table.md", "table.csv", "evaluation.json", "samples.png"}
    table = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/table.csv")
    assert table.splitlines()[0] == "method,dice,psnr_hole,l1_hole,ssim,psnr" and len(table.splitlines()) == 7
    picture = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="samples.png")
    with Image.open(picture) as png:  # 8 rows of 128-pixel tiles; masked | 5 fills | truth; a label strip
        assert png.size == (7 * 130 + 2, 8 * 130 + 2 + pictures.LABEL_HEIGHT)


def test_evaluation_job_on_a_raw_source_of_any_size(trained, hf_file, tmp_path):
    """An HF Parquet file without a test split: every image, 6×8 pixels (padded to 8×8 for the model)."""
    args = ["--model", str(trained.checkpoint), "--data", str(hf_file), "--holes", "random", "--min-size", "2"]
    args += ["--max-size", "4", "--limit", "5", "--tracking-uri", trained.tracking_uri, "--json", str(tmp_path / "e")]
    job("evaluate")(args)
    report = json.loads((tmp_path / "e").read_text())
    assert report["images"] == 5 and report["split"] == "all"
    assert report["holes"]["min_size"] == 2 and report["holes"]["max_size"] == 4
    assert all(np.isfinite(row["psnr_hole"]) for row in report["rows"])


@pytest.mark.parametrize("kind", ["strokes", "mixed"])
def test_evaluation_job_scores_free_form_holes(trained, tiny_data, tmp_path, kind):
    args = ["--model", str(trained.checkpoint), "--data", str(tiny_data), "--holes", kind, "--max-coverage", "0.2"]
    args += ["--tracking-uri", trained.tracking_uri, "--json", str(tmp_path / "e")]
    job("evaluate")(args)
    report = json.loads((tmp_path / "e").read_text())
    assert report["holes"]["kind"] == kind and report["holes"]["max_coverage"] == 0.2
    assert "5%–20% of the picture" in report["holes"]["description"]
    assert all(np.isfinite(row["psnr_hole"]) for row in report["rows"])


def wrong_architecture(trained) -> str:
    """A checkpoint whose config describes wider layers than its weights have."""
    state = torch.load(trained.checkpoint / CHECKPOINT_FILE, weights_only=True)
    state["config"]["model"]["widths"] = [16, 32, 64]
    folder = trained.root / "wrong"
    folder.mkdir(exist_ok=True)
    torch.save(state, folder / CHECKPOINT_FILE)
    return str(folder)


def unreadable_checkpoint(trained) -> str:
    folder = trained.root / "unreadable"
    folder.mkdir(exist_ok=True)
    (folder / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    return str(folder)


def model_without_config(trained) -> str:
    """A model logged to a run that jobs/train.py did not start: no config.json to rebuild it from."""
    client = MlflowClient(trained.tracking_uri)
    run = client.create_run(client.get_experiment_by_name("inpaint").experiment_id)
    example = np.zeros((2, 4, 32, 32), dtype=np.float32)
    return tracking.log_model(run.info.run_id, trained.model, example, "bare", tracking_uri=trained.tracking_uri)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "models:/missing/1"}, "cannot load the MLflow model models:/missing/1"),
        ({"--model": "no/such/checkpoint"}, "no checkpoint folder or MLflow model 'no/such/checkpoint'"),
        ({"--model": wrong_architecture}, "is not a model this project can rebuild: Error(s) in loading state_dict"),
        ({"--model": unreadable_checkpoint}, "unreadable/state.pt is not a checkpoint written by jobs/train.py"),
        ({"--model": str(REPO)}, "holds no state.pt"),
        ({"--model": model_without_config}, "models:/bare/1 was not logged by jobs/train.py: its run"),
        ({"--data": "no/such/data"}, "source no/such/data does not exist"),
        ({"--holes": "random", "--max-size": "40"}, "holes.max_size = 40 is larger than the 32×32 images"),
    ],
)
def test_evaluation_job_bad_input_is_one_error_line(trained, tiny_data, capsys, change, message):
    values = {"--model": str(trained.checkpoint), "--data": str(tiny_data), "--tracking-uri": trained.tracking_uri}
    values |= {key: value(trained) if callable(value) else value for key, value in change.items()}
    capsys.readouterr()  # what making the input printed
    with pytest.raises(SystemExit) as exit_info:
        job("evaluate")([item for pair in values.items() for item in pair])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------
# One user image


def test_inpaint_image_fills_only_the_holes_at_any_size(trained, tmp_path, capsys):
    image = np.random.default_rng(0).integers(0, 256, size=(30, 45, 3), dtype=np.uint8)
    hole = np.zeros((30, 45), dtype=bool)
    hole[5:15, 20:33] = True
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(hole.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    args = ["--model", "models:/tiny/1", "--tracking-uri", trained.tracking_uri, "--image", str(tmp_path / "in.png")]
    job("inpaint_image")([*args, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out" / "x.png")])

    with Image.open(tmp_path / "out" / "x.png") as png:
        assert png.format == "PNG" and png.size == (45, 30)
        filled = np.asarray(png.convert("RGB"))
    np.testing.assert_array_equal(filled[~hole], image[~hole])
    assert (filled[hole] != image[hole]).any()
    assert "130 hole pixels of 45x30 filled" in capsys.readouterr().out


def test_flip_averaging_fills_the_holes_with_the_mean_of_both_fills_and_nothing_else(trained, tmp_path):
    image = np.random.default_rng(1).integers(0, 256, size=(30, 45, 3), dtype=np.uint8)
    hole = np.zeros((30, 45), dtype=bool)
    hole[5:15, 8:20] = True  # off the vertical centre line: the mirrored fill sees other surroundings
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(hole.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    args = ["--model", str(trained.checkpoint), "--image", str(tmp_path / "in.png")]
    args += ["--mask", str(tmp_path / "mask.png")]
    job("inpaint_image")([*args, "--out", str(tmp_path / "plain.png")])
    job("inpaint_image")([*args, "--out", str(tmp_path / "flip.png"), "--flip-average"])
    plain, flipped = (np.asarray(Image.open(tmp_path / name).convert("RGB")) for name in ("plain.png", "flip.png"))

    np.testing.assert_array_equal(flipped[~hole], image[~hole])
    assert (flipped[hole] != plain[hole]).any()
    target, mask = to_float_images(image[None]), torch.from_numpy(hole[None, None]).float()
    masked = apply_holes(target, mask)
    mirrored = model_fill(trained.model, masked.flip(-1), mask.flip(-1)).flip(-1)
    expected = (model_fill(trained.model, masked, mask) + mirrored) / 2
    torch.testing.assert_close(flip_averaged_fill(trained.model, masked, mask), expected)
    assert np.abs(flipped[hole].astype(int) - (expected[0].permute(1, 2, 0).numpy()[hole] * 255)).max() <= 1


def test_evaluation_job_reports_flip_averaging_in_rows_of_its_own(trained, tiny_data, tmp_path):
    args = ["--model", str(trained.checkpoint), "--data", str(tiny_data), "--flip-average"]
    job("evaluate")([*args, "--tracking-uri", trained.tracking_uri, "--json", str(tmp_path / "eval.json")])
    rows = {row["method"]: row for row in json.loads((tmp_path / "eval.json").read_text())["rows"]}
    assert list(rows) == ["model", "model-flip", "telea", "ns", "mean", "zero"]
    assert rows["model-flip"]["psnr_hole"] != rows["model"]["psnr_hole"]


def test_inpaint_image_refuses_a_mask_of_another_size(trained, tmp_path, capsys):
    Image.new("RGB", (45, 30)).save(tmp_path / "in.png")
    Image.new("L", (32, 32)).save(tmp_path / "mask.png")
    args = ["--model", str(trained.checkpoint), "--image", str(tmp_path / "in.png")]
    with pytest.raises(SystemExit):
        job("inpaint_image")([*args, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert err.startswith("error: the mask") and "is 32x32 but the image" in err and err.count("\n") == 1
    assert not (tmp_path / "out.png").exists()
