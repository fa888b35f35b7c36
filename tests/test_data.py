import runpy
import subprocess
import sys
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from inpaint.data import (
    batch_to_tensor,
    cifar,
    hf_parquet,
    is_prepared,
    load_source,
    prepare,
    read_manifest,
    read_split,
    split_files,
)
from inpaint.data.sources import SOURCES
from inpaint.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def quiet(message: str) -> None:
    pass


def assert_splits_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for split, (images, labels) in expected.items():
        assert actual[split][0].dtype == np.uint8 and actual[split][1].dtype == np.int64
        np.testing.assert_array_equal(actual[split][0], images)
        np.testing.assert_array_equal(actual[split][1], labels)


# -----------------------------------------------------------------------------
# Reading sources


@pytest.mark.parametrize("layout", ["batches", "parent", "archive", "archive-parent"])
def test_cifar_reader_returns_exact_pixels_in_hwc(layout, cifar_folder, cifar_archive, cifar_splits):
    source = {
        "batches": cifar_folder,
        "parent": cifar_folder.parent,
        "archive": cifar_archive,
        "archive-parent": cifar_archive.parent,
    }[layout]
    assert_splits_equal(load_source(source, progress=quiet), cifar_splits)


def test_cifar_reader_limit_keeps_the_first_images(cifar_folder, cifar_splits):
    splits = load_source(cifar_folder, limit=10, progress=quiet)  # spans data_batch_1..3
    assert_splits_equal(splits, {name: (x[:10], y[:10]) for name, (x, y) in cifar_splits.items()})


def test_parquet_reader_file_and_folder(hf_file, hf_folder, hf_splits):
    assert_splits_equal(load_source(hf_file, progress=quiet), {"train": hf_splits["train"]})
    assert_splits_equal(load_source(hf_folder, progress=quiet), hf_splits)
    limited = load_source(hf_folder, limit=9, progress=quiet)  # spans both train shards
    assert_splits_equal(limited, {"train": tuple(a[:9] for a in hf_splits["train"]), "test": hf_splits["test"]})


def test_download_into_empty_folder_fails_with_instructions(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    torchvision = SimpleNamespace(datasets=SimpleNamespace(CIFAR10=offline))
    monkeypatch.setattr(cifar, "import_torchvision", lambda: torchvision)
    with pytest.raises(UserError, match=r"could not download CIFAR-10 .*cifar-10-python\.tar\.gz"):
        load_source(tmp_path, download=True, progress=quiet)


# Each source module on its own: `find` claims its own layouts only, and its reader reads them.


def test_cifar_finds_its_layouts_only(cifar_folder, cifar_archive, cifar_splits, hf_file, tmp_path):
    for path in (cifar_folder, cifar_folder.parent, cifar_archive, cifar_archive.parent):
        assert_splits_equal(cifar.find(path)(None, quiet), cifar_splits)
    (tmp_path / "empty").mkdir()
    assert [cifar.find(path) for path in (hf_file, tmp_path / "empty", tmp_path / "missing")] == [None] * 3


def test_hf_parquet_finds_files_and_folders_of_shards(hf_file, hf_folder, hf_splits, tmp_path):
    assert_splits_equal(hf_parquet.find(hf_file)(None, quiet), {"train": hf_splits["train"]})
    assert_splits_equal(hf_parquet.find(hf_folder)(None, quiet), hf_splits)
    (tmp_path / "empty").mkdir()
    assert hf_parquet.find(tmp_path / "empty") is None and hf_parquet.find(tmp_path / "missing") is None


def test_the_first_source_in_the_table_that_claims_a_path_reads_it(cifar_folder, cifar_splits, hf_file):
    assert [kind.find for kind in SOURCES] == [cifar.find, hf_parquet.find]
    (cifar_folder / "extra.parquet").write_bytes(hf_file.read_bytes())  # both kinds claim this folder
    assert_splits_equal(load_source(cifar_folder, progress=quiet), cifar_splits)


def test_prepare_refuses_a_prepared_dataset_as_its_source(tmp_path, hf_file):
    prepare(hf_file, tmp_path / "once", val=4, progress=quiet)
    with pytest.raises(UserError, match=r"once is already a prepared dataset; pass it to training directly"):
        prepare(tmp_path / "once", tmp_path / "twice", val=4, progress=quiet)


# -----------------------------------------------------------------------------
# Preparing


def test_prepare_splits_and_round_trips_pixels(tmp_path, hf_folder, hf_splits):
    out = tmp_path / "out"
    manifest = prepare(hf_folder, out, val=4, progress=quiet)
    assert manifest["splits"] == {"train": 8, "val": 4, "test": 5}
    assert (manifest["height"], manifest["width"], manifest["format"]) == (6, 8, "inpaint-prepared/1")
    settings = (manifest["source"], manifest["seed"], manifest["val"], manifest["limit"])
    assert settings == (str(hf_folder.resolve()), 0, 4, None)
    assert read_manifest(out) == manifest

    source_images, source_labels = hf_splits["train"]
    positions = {}
    for split in ("train", "val"):
        table = pq.read_table(split_files(out, split))
        assert table.schema.names == ["image", "height", "width", "label", "index"]
        assert set(table.column("height").to_pylist()) == {6} and set(table.column("width").to_pylist()) == {8}
        images, index = read_split(out, split)
        np.testing.assert_array_equal(index, np.arange(len(images)))
        # The stored bytes are the raw pixels in HWC order.
        np.testing.assert_array_equal(
            np.frombuffer(table.column("image")[0].as_py(), np.uint8).reshape(6, 8, 3), images[0]
        )
        # Each prepared image is a distinct source image; its label travels with it.
        rows = [next(i for i in range(len(source_images)) if (source_images[i] == image).all()) for image in images]
        assert rows == sorted(rows), "each split keeps source order"
        np.testing.assert_array_equal(table.column("label").to_numpy(), source_labels[rows])
        positions[split] = set(rows)
    assert positions["train"].isdisjoint(positions["val"])
    assert positions["train"] | positions["val"] == set(range(len(source_images)))

    test_images, test_index = read_split(out, "test")
    np.testing.assert_array_equal(test_images, hf_splits["test"][0])
    np.testing.assert_array_equal(test_index, np.arange(5))
    np.testing.assert_array_equal(read_split(out, "train", limit=3)[0], read_split(out, "train")[0][:3])


def test_prepare_cifar_in_shards_with_its_test_split(tmp_path, cifar_archive):
    manifest = prepare(cifar_archive, tmp_path / "out", val=5, shard_rows=4, progress=quiet)
    assert manifest["splits"] == {"train": 15, "val": 5, "test": 6}
    assert [Path(f).name for f in split_files(tmp_path / "out", "train")] == [f"part-0000{i}.parquet" for i in range(4)]
    assert len(read_split(tmp_path / "out", "train")[0]) == 15


def test_prepare_is_deterministic_and_seeded(tmp_path, hf_file):
    def val_images(name: str, seed: int) -> np.ndarray:
        prepare(hf_file, tmp_path / name, val=4, seed=seed, progress=quiet)
        return read_split(tmp_path / name, "val")[0]

    np.testing.assert_array_equal(val_images("a", seed=0), val_images("b", seed=0))
    assert not np.array_equal(val_images("a", seed=0), val_images("c", seed=1))


def test_rerun_is_skipped_and_other_settings_refused(tmp_path, hf_file):
    out = tmp_path / "out"
    manifest = prepare(hf_file, out, val=4, progress=quiet)
    shards = sorted(out.rglob("*.parquet"))
    mtimes = [shard.stat().st_mtime_ns for shard in shards]
    messages = []
    assert prepare(hf_file, out, val=4, progress=messages.append) == manifest
    assert "already prepared" in messages[0]
    assert [shard.stat().st_mtime_ns for shard in sorted(out.rglob("*.parquet"))] == mtimes
    with pytest.raises(UserError, match=r"val 4 \(now 3\).*another --out"):
        prepare(hf_file, out, val=3, progress=quiet)


def test_the_same_source_by_a_relative_path_is_the_same_dataset(tmp_path, hf_file, monkeypatch):
    out = tmp_path / "out"
    manifest = prepare(hf_file, out, val=4, progress=quiet)
    monkeypatch.chdir(hf_file.parent)
    messages = []
    assert prepare(Path(hf_file.name), out, val=4, progress=messages.append) == manifest
    assert "already prepared" in messages[0]
    with pytest.raises(UserError, match=r"source .* \(now .*other\.parquet'\)"):
        prepare(Path("other.parquet"), out, val=4, progress=quiet)


def test_interrupted_run_is_redone(tmp_path, hf_file):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "part-00007.parquet").write_bytes(b"half a shard")
    (out / "val").mkdir()
    assert not is_prepared(out)
    prepare(hf_file, out, val=4, progress=quiet)
    assert is_prepared(out)
    assert [Path(f).name for f in split_files(out, "train")] == ["part-00000.parquet"]
    assert len(read_split(out, "train")[0]) == 8


def test_prepare_writes_to_a_uri(tmp_path, hf_file):
    uri = f"file://{tmp_path}/nested/out"
    prepare(hf_file, uri, val=4, progress=quiet)
    assert (tmp_path / "nested" / "out" / "manifest.json").is_file()
    assert len(read_split(uri, "val")[0]) == 4


def test_readers_refuse_an_unprepared_dir(tmp_path):
    (tmp_path / "train").mkdir()
    for read in (read_manifest, lambda path: read_split(path, "train"), lambda path: split_files(path, "train")):
        with pytest.raises(UserError, match=r"not a prepared dataset.*jobs/prepare\.py --source SRC"):
            read(tmp_path)


def test_batch_to_tensor_matches_pixels(tmp_path, hf_file, hf_splits):
    prepare(hf_file, tmp_path / "out", val=4, progress=quiet)
    table = pq.read_table(split_files(tmp_path / "out", "train"))
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.schema.names}
    assert batch["image"].dtype == object  # as Ray Data hands binary columns over
    images, index = batch_to_tensor(batch)
    expected, _ = read_split(tmp_path / "out", "train")
    assert images.shape == (8, 3, 6, 8) and images.dtype == torch.float32
    torch.testing.assert_close(images, torch.from_numpy(expected).permute(0, 3, 1, 2).float() / 255)
    assert index.dtype == torch.int64 and index.tolist() == list(range(8))


# -----------------------------------------------------------------------------
# Bad input: each a UserError naming the problem


def rgb(height: int = 6, width: int = 8) -> Image.Image:
    return Image.new("RGB", (width, height), (10, 20, 30))


@pytest.fixture
def bad_sources(tmp_path, write_hf_parquet) -> dict[str, Path]:
    (tmp_path / "notes.txt").write_text("not a table")
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "data_batch_1").write_bytes(b"")
    good_file = write_hf_parquet(tmp_path / "good.parquet", [rgb()])
    good = pq.read_table(good_file)
    (tmp_path / "truncated.parquet").write_bytes(good_file.read_bytes()[: good_file.stat().st_size // 2])
    pq.write_table(good.rename_columns(["pixels", "label"]), tmp_path / "columns.parquet")
    return {
        "missing": tmp_path / "missing",
        "empty folder": tmp_path / "empty-folder",
        "not parquet": tmp_path / "notes.txt",
        "truncated": tmp_path / "truncated.parquet",
        "no image column": tmp_path / "columns.parquet",
        "undecodable": write_hf_parquet(tmp_path / "broken.parquet", [rgb(), b"\x89PNG garbage"]),
        "mixed sizes": write_hf_parquet(tmp_path / "mixed.parquet", [rgb(), rgb(4, 5)]),
        "grayscale": write_hf_parquet(tmp_path / "gray.parquet", [rgb().convert("L")]),
        "rgba": write_hf_parquet(tmp_path / "rgba.parquet", [rgb(), rgb().convert("RGBA")]),
        "no rows": write_hf_parquet(tmp_path / "empty.parquet", []),
        "cifar batches missing": tmp_path / "cifar",
    }


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", r"missing does not exist"),
        ("empty folder", r"empty-folder holds no dataset.*--download"),
        ("not parquet", r"notes\.txt is not a Parquet file"),
        ("truncated", r"truncated\.parquet is not a Parquet file \(.*corrupted"),
        ("no image column", r"no image column \(columns: pixels, label\).*struct\{bytes"),
        ("undecodable", r"broken\.parquet row 1 is not an image this project can read \(.*\); use a JPEG, PNG"),
        ("mixed sizes", r"mixed\.parquet row 1 is 5x4 but the images before it are 8x6"),
        ("grayscale", r"gray\.parquet row 0 has mode L; .*expects RGB"),
        ("rgba", r"rgba\.parquet row 1 has mode RGBA; .*expects RGB"),
        ("no rows", r"empty\.parquet\) has no rows"),
        ("cifar batches missing", r"lacks the CIFAR-10 batches data_batch_2"),
    ],
)
def test_bad_sources_are_user_errors(bad_sources, kind, message):
    with pytest.raises(UserError, match=message):
        load_source(bad_sources[kind], progress=quiet)


def test_damaged_cifar_files_are_user_errors(tmp_path, cifar_folder):
    (cifar_folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"data_batch_3 is not a CIFAR-10 python batch"):
        load_source(cifar_folder, progress=quiet)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(UserError, match=r"cannot read the archive .*cifar-10-python\.tar\.gz"):
        load_source(tmp_path / "cifar-10-python.tar.gz", progress=quiet)


def test_bad_settings_are_user_errors(tmp_path, hf_file):
    with pytest.raises(UserError, match=r"--val 12 leaves no training images.*12 train images"):
        prepare(hf_file, tmp_path / "out", val=12, progress=quiet)
    with pytest.raises(UserError, match=r"--val 5 leaves no training images.*--limit 5"):
        prepare(hf_file, tmp_path / "out", val=5, limit=5, progress=quiet)
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# The job


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/prepare.py", *args], cwd=REPO, capture_output=True, text=True)


def test_job_help_explains_itself():
    result = run_job("--help")
    assert result.returncode == 0
    for words in ("cifar-10-batches-py", "Hugging Face", "manifest.json", "interrupted", "--val", "--download"):
        assert words in result.stdout


def test_job_prepares_and_summarizes(tmp_path, hf_file, capsys):
    main = runpy.run_path(str(REPO / "jobs" / "prepare.py"))["main"]
    main(["--source", str(hf_file), "--out", str(tmp_path / "out"), "--val", "4"])
    assert "train 8, val 4 rows of 8x6 images" in capsys.readouterr().out


def test_job_missing_source_is_one_error_line(tmp_path):
    result = run_job("--source", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "missing does not exist" in result.stderr
