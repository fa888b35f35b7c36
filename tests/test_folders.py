"""Pictures of any size: folders of files (nested, mixed formats, a corrupt and a too-small one), Hugging Face
Parquet of mixed sizes, their train/val split, the crops made in the batch path, and training on them."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMALL_MODEL, finish, run_job
from mlflow import MlflowClient
from PIL import Image

from inpaint.data import folders
from inpaint.data.crops import crop_batch, enlarge_to
from inpaint.errors import UserError
from inpaint.train import PictureCrops

SIZES = [(70, 90), (64, 64), (100, 48 + 30), (81, 120), (66, 75), (90, 70), (120, 96), (72, 88)]


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def smooth_picture(height: int, width: int, seed: int) -> np.ndarray:
    """A picture with structure (gradients), so that JPEG keeps it close and crops differ by place."""
    rows, cols = np.mgrid[0:height, 0:width]
    phase = np.random.default_rng(seed).random(3) * 6
    channels = [127 + 120 * np.sin(rows / 9 + cols / 13 + p) for p in phase]
    return np.stack(channels, -1).astype(np.uint8)


@pytest.fixture
def picture_folder(tmp_path: Path) -> Path:
    """8 pictures of mixed sizes and formats in nested folders, a corrupt JPEG, a too-small PNG, a text file
    and a hidden file."""
    root = tmp_path / "pictures"
    for i, (height, width) in enumerate(SIZES):
        fmt, suffix = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
        path = root / ("nested/deeper" if i % 2 else "") / f"p{i}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded(smooth_picture(height, width, i), fmt))
    (root / "nested" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    (root / "tiny.png").write_bytes(encoded(smooth_picture(20, 30, 99), "PNG"))
    (root / "notes.txt").write_text("not a picture")
    (root / ".hidden.png").write_bytes(b"")
    return root


def names(pictures: list[folders.Picture], root: Path) -> list[str]:
    return [str(Path(path).relative_to(root)) for path, _, _ in pictures]


def test_a_folder_lists_its_pictures_in_nested_folders_and_splits_them_by_seed(picture_folder):
    splits = folders.list_pictures(str(picture_folder), "", 0.3, seed=0, limit=None)
    listed = sorted(names(splits["train"] + splits["val"], picture_folder))
    assert len(listed) == 10 and "nested/deeper/p1.jpg" in listed and "p2.webp" in listed
    assert not any(name.endswith((".txt", ".hidden.png")) for name in listed)
    assert len(splits["val"]) == 3  # 30% of 10
    again = folders.list_pictures(str(picture_folder), "", 0.3, seed=0, limit=None)
    other = folders.list_pictures(str(picture_folder), "", 0.3, seed=1, limit=None)
    assert again == splits and other["val"] != splits["val"]
    limited = folders.list_pictures(str(picture_folder), "", 0.3, seed=0, limit=5)
    assert sorted(limited["train"] + limited["val"]) == sorted(splits["train"] + splits["val"])[:5]


def test_a_val_folder_or_val_path_is_the_validation_split(picture_folder, tmp_path):
    (picture_folder / "val").mkdir()
    (picture_folder / "p0.png").rename(picture_folder / "val" / "p0.png")
    splits = folders.list_pictures(str(picture_folder), "", 0.5, seed=0, limit=None)
    assert names(splits["val"], picture_folder) == ["val/p0.png"] and len(splits["train"]) == 9
    elsewhere = tmp_path / "held-out"
    (picture_folder / "val").rename(elsewhere)
    splits = folders.list_pictures(str(picture_folder), str(elsewhere), 0.5, seed=0, limit=None)
    assert [Path(p).name for p, _, _ in splits["val"]] == ["p0.png"] and len(splits["train"]) == 9


def test_a_folder_without_pictures_is_refused_naming_what_it_expects(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"holds no pictures: expected \.jpg, \.jpeg, \.png, \.webp"):
        folders.list_pictures(str(tmp_path / "empty"), "", 0.1, seed=0, limit=None)
    with pytest.raises(UserError, match="does not exist"):
        folders.list_pictures(str(tmp_path / "missing"), "", 0.1, seed=0, limit=None)


def test_each_picture_is_checked_once_decoded(picture_folder):
    pictures = [(str(picture_folder / name), -1, 0) for name in ("p0.png", "nested/broken.jpg", "tiny.png")]
    rows = [row for piece in folders._pieces(pictures) for row in folders.read_piece(piece, crop=48)]
    assert [row["problem"] for row in rows] == ["", rows[1]["problem"], "small"]
    assert rows[1]["problem"] and "broken.jpg" in rows[1]["name"]
    assert [row["index"] for row in rows] == [0, 1, 2]


def test_hugging_face_parquet_of_mixed_sizes_is_read_row_by_row(tmp_path, write_hf_parquet):
    pictures = [smooth_picture(h, w, i) for i, (h, w) in enumerate(SIZES)]
    path = write_hf_parquet(tmp_path / "hf" / "train-00000.parquet", [encoded(p, "PNG") for p in pictures])
    splits = folders.list_pictures(str(path.parent), "", 0.25, seed=0, limit=None)
    assert len(splits["train"]) == 6 and len(splits["val"]) == 2
    rows = [row for piece in folders._pieces(splits["val"]) for row in folders.read_piece(piece, crop=32)]
    for row, (_, _, position) in zip(rows, splits["val"], strict=True):
        decoded = np.array(Image.open(io.BytesIO(row["image"])))
        np.testing.assert_array_equal(decoded, pictures[position])
        assert row["problem"] == "" and f"row {position}" in row["name"]


def test_validation_crops_are_fixed_and_training_crops_move_with_the_epoch():
    blobs = [encoded(smooth_picture(h, w, i), "PNG") for i, (h, w) in enumerate(SIZES)]
    names_, index = [f"p{i}" for i in range(len(blobs))], list(range(len(blobs)))
    val = crop_batch(blobs, names_, index, 48, seed=1234, epoch=None)
    assert val.shape == (8, 48, 48, 3) and val.dtype == np.uint8
    np.testing.assert_array_equal(val, crop_batch(blobs, names_, index, 48, seed=1234, epoch=None))
    epoch1 = crop_batch(blobs, names_, index, 48, seed=0, epoch=1)
    np.testing.assert_array_equal(epoch1, crop_batch(blobs, names_, index, 48, seed=0, epoch=1))
    assert not np.array_equal(epoch1, crop_batch(blobs, names_, index, 48, seed=0, epoch=2))
    # every crop is a window of its picture, mirrored or not; some of them mirrored
    mirrored = 0
    for i, blob in enumerate(blobs):
        picture = np.array(Image.open(io.BytesIO(blob)))
        windows = np.lib.stride_tricks.sliding_window_view(picture, (48, 48, 3))[..., :, :, :]
        found = (windows == epoch1[i]).all(axis=(-3, -2, -1)).any()
        found_mirrored = (windows == epoch1[i][:, ::-1]).all(axis=(-3, -2, -1)).any()
        assert found or found_mirrored
        mirrored += bool(found_mirrored and not found)
    assert 0 < mirrored < len(blobs)


def test_a_small_picture_is_enlarged_to_the_crop():
    assert enlarge_to(np.zeros((20, 30, 3), np.uint8), 48).shape == (48, 72, 3)
    assert enlarge_to(np.zeros((64, 50, 3), np.uint8), 48).shape == (64, 50, 3)


def test_the_batch_path_turns_encoded_pictures_into_float_crops():
    blobs = np.array([encoded(smooth_picture(70, 90, 0), "PNG"), encoded(smooth_picture(64, 64, 1), "JPEG")], object)
    batch = {"image": blobs, "name": np.array(["a", "b"], object), "index": np.array([3, 7])}
    images, index = PictureCrops(32, seed=5, epoch=None)(batch)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    assert index.tolist() == [3, 7]


# ---------------------------------------------------------------------------------------------
# Training on a folder of pictures, as a user runs it


@pytest.mark.ray
def test_training_on_a_folder_of_pictures_registers_a_model_of_that_scale(picture_folder, tmp_path):
    (picture_folder / "val").mkdir()
    for i in range(2):
        (picture_folder / "val" / f"v{i}.jpg").write_bytes(encoded(smooth_picture(64, 80, 50 + i), "JPEG"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--data", str(picture_folder), "--epochs", "2", "--workers", "2", "--json", str(tmp_path / "out.json")]
    for value in [*SMALL_MODEL, "data.crop_size=48", "data.crops_per_picture=2", "model.prefill=telea"]:
        args += ["--set", value]
    out = finish(run_job(args, tmp_path, uri), timeout=400)
    assert len(re.findall(r"val_psnr_hole [\d.]+ \(telea [\d.]+ alone\)", out)) == 2, out[-3000:]  # each epoch
    assert "train: left out 1 unreadable file(s) of 10: " in out and "broken.jpg (" in out, out[-3000:]
    assert "train: 1 picture(s) smaller than the 48-px crop, left out (data.small_pictures=resize keeps them)" in out
    assert "data: 16 training and 2 validation images" in out  # 8 usable pictures × 2 crops; the val/ folder's 2

    result = json.loads((tmp_path / "out.json").read_text())
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.data.params["data.crop_size"] == "48" and run.data.params["data.image_size"] == "[48, 48]"
    history = [m.value for m in client.get_metric_history(result["run_id"], "val_psnr_hole")]
    assert len(history) == 2 and all(np.isfinite(history))
    telea = [m.value for m in client.get_metric_history(result["run_id"], "prefill_val_psnr_hole")]
    assert len(telea) == 2 and telea[0] == telea[1]  # Telea alone, on the same crops and holes every epoch

    from inpaint.evaluate import load_model
    from inpaint.fill import inpaint_image

    model = load_model(result["model_uri"], tracking_uri=uri)
    assert model.train_scale.size == (48, 48) and model.prefill == "telea"  # how serve and inpaint_image.py fill
    name, version = result["model_uri"].removeprefix("models:/").split("/")
    tags = client.get_model_version(name, version).tags
    assert tags["train_size"] == "48x48" and tags["train_hole_px"] == f"{model.train_scale.hole:g}"
    photo = smooth_picture(90, 130, 5)
    hole = np.zeros((90, 130), bool)
    hole[30:50, 40:70] = True
    filled = inpaint_image(model, photo, hole, mode="scaled")
    np.testing.assert_array_equal(filled[~hole], photo[~hole])  # the known pixels come back unchanged
    assert not np.array_equal(filled[hole], photo[hole])


@pytest.mark.ray
def test_a_folder_with_no_usable_picture_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(4):
        (folder / f"b{i}.jpg").write_bytes(b"nope")
    proc = run_job(["--data", str(folder), "--set", "data.crop_size=32", "--set", "data.val_share=0.5"],
                   tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")  # fmt: skip
    out, _ = proc.communicate(timeout=300)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert len(errors) == 1, out[-3000:]
    assert "no train picture can be used (2 unreadable, 0 smaller than the 32-px crop)" in errors[0]


def test_a_parquet_file_without_pictures_makes_its_rows_unreadable_with_the_reason(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "notes.parquet")
    pictures = folders.list_pictures(str(tmp_path), "", 0.5, seed=0, limit=None)
    rows = [row for piece in folders._pieces(pictures["train"]) for row in folders.read_piece(piece, crop=32)]
    assert len(rows) == 1 and "has no image column" in rows[0]["problem"] and rows[0]["name"].endswith("notes.parquet")


def test_a_crop_the_network_cannot_take_is_refused_before_ray_starts(picture_folder):
    from inpaint.config import load_config
    from inpaint.driver import check_data

    cfg = load_config(None, values={"data.crop_size": 50, "scaling.storage_path": str(picture_folder.parent / "runs")})
    with pytest.raises(UserError, match=r"needs sides divisible by 4: use a data\.crop_size divisible by 4"):
        check_data(cfg, str(picture_folder))
    cfg = load_config(None, values={"data.crop_size": 12, "scaling.storage_path": str(picture_folder.parent / "runs")})
    with pytest.raises(UserError, match=r"masks\.max_size = 16 is larger than the 12×12 images"):
        check_data(cfg, str(picture_folder))
