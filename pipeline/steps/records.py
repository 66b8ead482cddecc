"""The on-disk contract between the preprocess step and the training steps: TFRecord splits.

A prepared data set is one self-contained directory, so a later step on another machine
needs nothing else::

    <root>/classes.json          ["iris-setosa", "iris-versicolour", "iris-virginica"]
    <root>/data_report.json      counts, skipped files, duplicates (see dataset.py)
    <root>/data_report.md        the same for people
    <root>/<split>/<split>-00000-of-00002.tfrecord   split in SPLITS

Each record holds the encoded image (JPEG or PNG, RGB), its label index into
``classes.json``, the sha256 of the original file's bytes, and its original relative path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

SPLITS: tuple[str, ...] = ("train", "val", "test")
CLASSES_FILE = "classes.json"
REPORT_JSON = "data_report.json"
REPORT_MD = "data_report.md"

FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "sha256": tf.io.FixedLenFeature([], tf.string),
    "path": tf.io.FixedLenFeature([], tf.string),
}


@dataclass(frozen=True)
class Example:
    """One validated image, ready to be written: encoded RGB bytes plus its identity."""

    image: bytes
    label: int
    sha256: str
    path: str


def serialize(example: Example) -> bytes:
    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = tf.train.Features(
        feature={
            "image": _bytes(example.image),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[example.label])),
            "sha256": _bytes(example.sha256.encode()),
            "path": _bytes(example.path.encode()),
        }
    )
    return tf.train.Example(features=features).SerializeToString()


def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parse one serialized record (usable inside ``tf.data.Dataset.map``)."""
    return tf.io.parse_single_example(serialized, FEATURES)


def write_split(
    root: Path, split: str, examples: Iterable[Example], num_shards: int = 2
) -> list[Path]:
    """Write ``examples`` round-robin into ``num_shards`` files under ``root/split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    directory = Path(root) / split
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(str(p)) for p in paths]
    try:
        for i, example in enumerate(examples):
            writers[i % num_shards].write(serialize(example))
    finally:
        for writer in writers:
            writer.close()
    return paths


def split_files(root: str | Path, split: str) -> list[str]:
    """The shard files of one split, sorted; ``FileNotFoundError`` names what is missing."""
    directory = Path(root) / split
    files = sorted(str(p) for p in directory.glob("*.tfrecord"))
    if not files:
        raise FileNotFoundError(f"no TFRecord shards for split {split!r} under {str(directory)!r}")
    return files


def read_split(root: str | Path, split: str) -> list[Example]:
    """Every record of a split in memory (small data sets, tests and reports)."""
    dataset = tf.data.TFRecordDataset(split_files(root, split)).map(parse)
    return [
        Example(
            image=bytes(r["image"].numpy()),
            label=int(r["label"].numpy()),
            sha256=r["sha256"].numpy().decode(),
            path=r["path"].numpy().decode(),
        )
        for r in dataset
    ]


def write_classes(root: Path, classes: list[str]) -> Path:
    path = Path(root) / CLASSES_FILE
    path.write_text(json.dumps(list(classes), indent=2) + "\n")
    return path


def load_classes(root: str | Path) -> list[str]:
    path = Path(root) / CLASSES_FILE
    try:
        classes = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"not a prepared data set: cannot read {str(path)!r} ({exc})"
        ) from exc
    if not isinstance(classes, list) or len(classes) < 2:
        raise ValueError(f"{str(path)!r} must list at least two class names")
    return [str(c) for c in classes]
