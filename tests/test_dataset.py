"""Validation and split step on the shared iris archive and on generated bad inputs."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import itertools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from kfp.dsl import Dataset, Markdown
from PIL import Image

from components.preprocess_dataset import preprocess_dataset
from pipeline.config import PipelineConfig
from pipeline.dag import pipeline_arguments
from pipeline.lib import records
from pipeline.lib.contract import DATA_REPORT_JSON, DATA_REPORT_MD, META_PATH
from pipeline.lib.params import PreprocessParams
from pipeline.lib.splits import split_sizes
from pipeline.steps.preprocess import prepare_dataset
from tests.support.imagegen import image_bytes, tar_entries, write_class_folders, zip_folder
from tests.support.prepared import load_report

SMALL = PipelineConfig(min_image_side=16, min_images_per_class=3).params_for(PreprocessParams)


@pytest.fixture(scope="module")
def iris_runs(iris_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared archive prepared three times: split seed 42 twice, 7 once."""
    base = tmp_path_factory.mktemp("iris")
    runs = {"a": 42, "b": 42, "other": 7}
    for name, split_seed in runs.items():
        params = PipelineConfig(split_seed=split_seed).params_for(PreprocessParams)
        prepare_dataset(iris_zip, base / name, params,
                        source_info={"url": str(iris_zip.name)})
    return {name: base / name for name in runs}


#: Per class (train, val, test) of 66 / 253 / 70 images at 15 % / 15 %, worked out by hand:
#: 9.9 -> 10, 37.95 -> 38, and 10.5 rounds half up to 11.
IRIS_SPLIT_COUNTS = {"iris-setosa": {"train": 46, "val": 10, "test": 10},
                     "iris-versicolour": {"train": 177, "val": 38, "test": 38},
                     "iris-virginica": {"train": 48, "val": 11, "test": 11}}


@pytest.mark.parametrize("n, val_fraction, test_fraction, expected", [
    (66, 0.15, 0.15, (46, 10, 10)),  # 9.9 rounds up
    (100, 0.1, 0.2, (70, 10, 20)),  # exact shares
    (66, 0.1, 0.2, (46, 7, 13)),  # 6.6 up, 13.2 down
    (10, 0.25, 0.25, (4, 3, 3)),  # 2.5 rounds half up, not to even
    (7, 0.15, 0.15, (5, 1, 1)),  # 1.05 down
    (3, 0.15, 0.15, (1, 1, 1)),  # 0.45 rounds to 0, raised to 1: every split non-empty
    (10, 0.0, 0.0, (8, 1, 1)),  # from 3 images on, val and test get one even at 0 %
    (2, 0.15, 0.15, (2, 0, 0)),  # below 3 images: no minimum, everything trains
    (1, 0.15, 0.15, (1, 0, 0)),
    (0, 0.15, 0.15, (0, 0, 0)),
    (4, 0.4, 0.4, (1, 1, 2)),  # 1.6 -> 2 + 2 leaves no training image: val gives one back
    (5, 0.5, 0.5, (1, 2, 2)),  # 3 + 3 > 4: val, then test, give one back
])
def test_split_sizes_match_hand_computed_shares(n: int, val_fraction: float,
                                                test_fraction: float,
                                                expected: tuple[int, int, int]) -> None:
    assert split_sizes(n, val_fraction, test_fraction) == expected


def _hashes(root: Path) -> dict[str, list[str]]:
    return {split: [e.sha256 for e in records.read_split(root, split)] for split in records.SPLITS}


def test_shared_iris_counts_and_label_conflicts(iris_runs: dict[str, Path]) -> None:
    report = load_report(iris_runs["a"])

    assert report["files_seen"] == 421
    assert report["classes"] == ["iris-setosa", "iris-versicolour", "iris-virginica"]
    assert records.load_classes(iris_runs["a"]) == report["classes"]
    assert report["conflicting_files_dropped"] == 32
    assert len(report["conflicting_duplicates"]) == 16
    assert all(len(set(g["classes"])) == 2 for g in report["conflicting_duplicates"])
    assert report["files_skipped"] == 0 and report["within_class_files_dropped"] == 0
    assert report["files_used"] == 421 - 32
    assert report["class_counts"] == {"iris-setosa": 66, "iris-versicolour": 253,
                                      "iris-virginica": 70}
    assert sum(report["split_sizes"].values()) == report["files_used"]
    assert report["majority_baseline"]["class"] == "iris-versicolour"
    assert report["source"] == {"url": "iris-image.zip"}
    assert "| iris-versicolour | 1 |" in (iris_runs["a"] / DATA_REPORT_MD).read_text()


def test_splits_are_disjoint_by_content_and_match_the_report(iris_runs: dict[str, Path]) -> None:
    report = load_report(iris_runs["a"])
    hashes = _hashes(iris_runs["a"])
    conflicting = {g["sha256"] for g in report["conflicting_duplicates"]}
    sets = {split: set(h) for split, h in hashes.items()}

    assert sets["train"].isdisjoint(sets["val"])
    assert sets["train"].isdisjoint(sets["test"])
    assert sets["val"].isdisjoint(sets["test"])
    assert not conflicting & set().union(*sets.values())
    for split in records.SPLITS:
        examples = records.read_split(iris_runs["a"], split)
        assert len(examples) == len(sets[split]) == report["split_sizes"][split]
        for example in examples:  # the label is the folder the file came from
            assert report["classes"][example.label] == example.path.split("/")[0]
            assert hashlib.sha256(example.image).hexdigest() == example.sha256  # kept as is
        for index, label in enumerate(report["classes"]):
            count = sum(e.label == index for e in examples)
            assert count == report["split_counts"][split][label]
            assert count == IRIS_SPLIT_COUNTS[label][split]


def test_same_seed_gives_an_identical_report_and_split(iris_runs: dict[str, Path]) -> None:
    for name in (DATA_REPORT_JSON, DATA_REPORT_MD):
        assert (iris_runs["a"] / name).read_text() == (iris_runs["b"] / name).read_text()
    assert _hashes(iris_runs["a"]) == _hashes(iris_runs["b"])


def test_the_training_seed_leaves_the_split_alone(tmp_path: Path) -> None:
    """Runs with other training seeds are scored on the same test images (paired rule).

    The preprocess component gets what the DAG hands it (the pipeline parameters it
    declares) for configs differing in the training ``seed`` and in ``split_seed``: the
    split is the same whatever ``seed``, and another for another ``split_seed``.
    """
    write_class_folders(tmp_path / "raw" / "flowers", {"a": 10, "b": 10, "c": 10})
    declared = inspect.signature(preprocess_dataset).parameters
    splits = {}
    for split_seed, seed in itertools.product((1, 2), (1, 2)):
        config = PipelineConfig(split_seed=split_seed, seed=seed, min_image_side=16,
                                min_images_per_class=3)
        arguments = {k: v for k, v in pipeline_arguments(config).items() if k in declared}
        out = tmp_path / f"split{split_seed}-seed{seed}"
        preprocess_dataset(
            raw_data=Dataset(name="raw_data", uri=str(tmp_path / "raw"),
                             metadata={META_PATH: "flowers"}),
            prepared_data=Dataset(name="prepared_data", uri=str(out / "prepared")),
            data_report=Markdown(name="data_report", uri=str(out / "report.md")), **arguments)
        splits[split_seed, seed] = {  # the shards' bytes: their images and their order
            split: [hashlib.sha256(Path(f).read_bytes()).hexdigest()
                    for f in records.split_files(out / "prepared", split)]
            for split in records.SPLITS}
    assert splits[1, 1] == splits[1, 2]
    assert splits[2, 1] == splits[2, 2]
    assert splits[1, 1]["test"] != splits[2, 1]["test"]


def test_another_split_seed_gives_another_split(iris_runs: dict[str, Path]) -> None:
    a, other = load_report(iris_runs["a"]), load_report(iris_runs["other"])
    assert a["class_counts"] == other["class_counts"]
    assert a["split_counts"] == other["split_counts"]  # same stratified sizes...
    assert set(_hashes(iris_runs["a"])["test"]) != set(_hashes(iris_runs["other"])["test"])
    assert a["split_fingerprints"]["test"] != other["split_fingerprints"]["test"]


def _bad_input_folder(root: Path) -> Path:
    """Three classes of 4 good JPEGs, plus every kind of bad or odd file in ``a/``."""
    write_class_folders(root, {"a": 4, "b": 4, "c": 4})
    good = (root / "a" / "img-000.jpg").read_bytes()
    a = root / "a"
    whole = image_bytes(101)
    (a / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # headers intact, pixels cut
    (a / "empty.jpeg").write_bytes(b"")
    (a / "notes.jpg").write_text("this is text, not a photo\n")
    (a / "readme.txt").write_text("not an image extension\n")
    (a / "tiny.png").write_bytes(image_bytes(102, size=8, fmt="PNG"))
    (a / "alpha.PNG").write_bytes(image_bytes(103, mode="RGBA", fmt="PNG"))
    (a / "gray.JPG").write_bytes(image_bytes(104, mode="L"))
    (a / "palette.gif").write_bytes(image_bytes(105, mode="P", fmt="GIF"))
    (a / "bitmap.bmp").write_bytes(image_bytes(106, fmt="BMP"))
    (a / "copy-of-000.jpg").write_bytes(good)  # same class: keep one
    (root / "b" / "also-in-b.jpg").write_bytes((root / "c" / "img-000.jpg").read_bytes())
    return root


def test_bad_and_odd_files_are_skipped_converted_or_dropped(tmp_path: Path) -> None:
    folder = _bad_input_folder(tmp_path / "raw")
    archive = zip_folder(folder, tmp_path / "raw.zip", extra={
        "__MACOSX/a/._img-000.jpg": b"\x00\x05\x16\x07resource fork",
        "a/.DS_Store": b"junk",
    })
    out = tmp_path / "out"

    report = prepare_dataset(archive, out, SMALL)

    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert reasons == {
        "a/truncated.jpg": "corrupt or truncated",
        "a/empty.jpeg": "empty file",
        "a/notes.jpg": "not an image",
        "a/readme.txt": "unsupported file type",
        "a/tiny.png": "too small",
    }
    assert report["files_seen"] == 12 + 11
    assert {i["path"] for i in report["ignored"]} == {"__MACOSX/a/._img-000.jpg", "a/.DS_Store"}
    assert report["within_class_duplicates"] == [{
        "sha256": hashlib.sha256((folder / "a" / "img-000.jpg").read_bytes()).hexdigest(),
        "class": "a", "kept": "a/copy-of-000.jpg", "dropped": ["a/img-000.jpg"]}]
    assert report["conflicting_duplicates"][0]["paths"] == ["b/also-in-b.jpg", "c/img-000.jpg"]
    assert report["duplicates_dropped"] == 3
    assert report["class_counts"] == {"a": 4 + 4, "b": 4, "c": 3}
    assert {c["path"]: c["mode"] for c in report["converted_to_rgb"]} == {
        "a/alpha.PNG": "RGBA", "a/gray.JPG": "L", "a/palette.gif": "P", "a/bitmap.bmp": "RGB"}

    stored = {e.path: e for split in records.SPLITS for e in records.read_split(out, split)}
    assert len(stored) == report["files_used"] == 15
    for path in ("a/alpha.PNG", "a/gray.JPG", "a/palette.gif", "a/bitmap.bmp"):
        with Image.open(io.BytesIO(stored[path].image)) as image:
            assert (image.format, image.mode) == ("PNG", "RGB")
    with Image.open(io.BytesIO(stored["a/alpha.PNG"].image)) as image:
        assert image.size == (48, 48)
    assert stored["b/img-000.jpg"].image == (folder / "b" / "img-000.jpg").read_bytes()
    assert json.loads((out / DATA_REPORT_JSON).read_text()) == report


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_empty_class_folder_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    folder = write_class_folders(tmp_path / "raw", {"a": 4, "b": 4})
    (folder / "empty-class").mkdir()
    out = tmp_path / "out" / "prepared"

    with pytest.raises(ValueError, match=r"'empty-class' has 0 \(empty folder\)"):
        prepare_dataset(folder, out, SMALL)
    assert not out.exists()
    assert _leftovers(out.parent) == []


def test_single_class_set_is_a_clear_error(tmp_path: Path) -> None:
    folder = write_class_folders(tmp_path / "raw", {"only": 5})
    archive = zip_folder(folder, tmp_path / "one.zip")
    with pytest.raises(ValueError, match=r"at least 2 class folders.*found 1: 'only'"):
        prepare_dataset(archive, tmp_path / "out", SMALL)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_too_few_usable_images_per_class_is_a_clear_error(tmp_path: Path) -> None:
    folder = write_class_folders(tmp_path / "raw", {"a": 4, "b": 2})
    (folder / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match=r"'b' has 2 \(1 skipped\); at least 3"):
        prepare_dataset(folder, tmp_path / "out", SMALL)


def test_rerun_replaces_a_prepared_set_but_not_a_foreign_folder(tmp_path: Path) -> None:
    folder = write_class_folders(tmp_path / "raw", {"a": 4, "b": 4})
    out = tmp_path / "out"
    prepare_dataset(folder, out, SMALL)
    shutil.rmtree(folder / "b")
    write_class_folders(folder, {"b": 5}, seed=1)

    assert prepare_dataset(folder, out, SMALL)["class_counts"] == {"a": 4, "b": 5}
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a prepared data set"):
        prepare_dataset(folder, foreign, SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_names_that_are_not_utf8_are_skipped_and_reported(tmp_path: Path) -> None:
    """A tar written under Latin-1 used to crash the step with UnicodeEncodeError."""
    files = {f"{label}/img-{i}.jpg": image_bytes(c * 100 + i)
             for c, label in enumerate(("a", "b")) for i in range(4)}
    files["a/caf\udce9.jpg"] = image_bytes(999)
    files["b\udcff/x.jpg"] = image_bytes(998)
    archive = tar_entries(tmp_path / "latin1.tar", files)

    report = prepare_dataset(archive, tmp_path / "out", SMALL)

    assert report["files_used"] == 8
    reasons = {i["path"]: i["reason"] for i in report["ignored"]}
    assert reasons["a/caf\\xe9.jpg"] == "file name is not valid UTF-8"
    assert reasons["b\\xff/x.jpg"] == "file name is not valid UTF-8"
    assert load_report(tmp_path / "out")["ignored"] == report["ignored"]


def test_a_folder_with_names_that_are_not_utf8_is_prepared(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "flowers", {"a": 4, "b": 4})
    (Path(os.fsdecode(bytes(root / "a") + b"/caf\xe9.jpg"))).write_bytes(image_bytes(999))
    Path(os.fsdecode(bytes(root) + b"/c\xff")).mkdir()
    Path(os.fsdecode(bytes(root) + b"/c\xff/x.jpg")).write_bytes(image_bytes(998))

    report = prepare_dataset(root, tmp_path / "out", SMALL)

    assert report["classes"] == ["a", "b"]
    assert {s["path"]: s["reason"] for s in report["skipped"]} == {
        "a/caf\\xe9.jpg": "file name is not valid UTF-8",
        "c\\xff": "file name is not valid UTF-8",
    }
    assert "caf\\xe9" in (tmp_path / "out" / DATA_REPORT_MD).read_text()


def test_files_over_max_image_bytes_are_skipped_unread(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_class_folders(tmp_path / "flowers", {"a": 4, "b": 4})
    (root / "a" / "huge.bmp").write_bytes(b"BM" + bytes(300_000))
    read: list[str] = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: read.append(self.name) or real_read_bytes(self))

    report = prepare_dataset(root, tmp_path / "out",
                             dataclasses.replace(SMALL, max_image_bytes=100_000))

    assert report["skipped"] == [{"path": "a/huge.bmp", "reason": "file too large",
                                  "detail": "300002 bytes, over max_image_bytes 100000"}]
    assert "huge.bmp" not in read


def test_a_full_disk_names_the_output_and_leaves_nothing(tmp_path: Path,
                                                        full_disk: Callable[[int], None]) -> None:
    root = write_class_folders(tmp_path / "flowers", {"a": 4, "b": 4})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    full_disk(2000)
    with pytest.raises(OSError, match=r"cannot write the prepared data set '.*out': cannot "
                       r"write '.*\.tfrecord': No space left on device"):
        prepare_dataset(root, tmp_path / "out", SMALL)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
