"""The on-disk contract between the preprocess step and the training steps: TFRecord splits.

A prepared data set is one self-contained directory, so a later step on another machine
needs nothing else::

    <root>/classes.json          ["iris-setosa", "iris-versicolour", "iris-virginica"]
    <root>/data_report.json      counts, skipped files, duplicates (see lib/data_report.py)
    <root>/data_report.md        the same for people
    <root>/<split>/<split>-00000-of-00002.tfrecord   split in SPLITS

Each record holds the encoded image (JPEG or PNG, RGB), its label index into
``classes.json``, the sha256 of the original file's bytes, and its original relative path.

Writing needs no TensorFlow: records are ``tf.train.Example`` protos encoded by hand (four
fields, wire format below) in TFRecord framing with masked CRC32C, so the preprocess step's
process does not pay TensorFlow's import (seconds per step, see bench/local_overhead.py).
Reading (``parse``, ``read_split``) runs in the TensorFlow steps and imports it there.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c

from pipeline.lib.contract import CLASSES_FILE
from pipeline.lib.files import atomic_write_json, atomic_writer

if TYPE_CHECKING:
    import tensorflow as tf

SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Feature names and their tf.io dtype names, the schema ``serialize`` writes.
FEATURE_DTYPES = {"image": "string", "label": "int64", "sha256": "string", "path": "string"}


@dataclass(frozen=True)
class Example:
    """One validated image, ready to be written: encoded RGB bytes plus its identity."""

    image: bytes
    label: int
    sha256: str
    path: str


# --- protobuf wire format of tf.train.Example (example.proto, feature.proto) -------------
def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64s take ten bytes, as protobuf encodes them
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    return _field(1, _field(1, value))  # Feature.bytes_list = BytesList{value: [value]}


def _int64_feature(value: int) -> bytes:
    return _field(3, _field(1, _varint(value)))  # Feature.int64_list, packed values


def serialize(example: Example) -> bytes:
    """``example`` as a serialized ``tf.train.Example`` (parsed by ``tf.io.parse_*``)."""
    features = {
        "image": _bytes_feature(example.image),
        "label": _int64_feature(example.label),
        "sha256": _bytes_feature(example.sha256.encode()),
        "path": _bytes_feature(example.path.encode()),
    }
    # Features.feature is map<string, Feature>: entries {1: key, 2: value}.
    entries = b"".join(_field(1, _field(1, key.encode()) + _field(2, value))
                       for key, value in features.items())
    return _field(1, entries)  # Example.features


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame(record: bytes) -> bytes:
    """One TFRecord: length, masked CRC32C of the length, data, masked CRC32C of the data."""
    length = struct.pack("<Q", len(record))
    return length + _masked_crc(length) + record + _masked_crc(record)


def feature_spec() -> dict[str, Any]:
    """The ``tf.io`` parsing spec of :data:`FEATURE_DTYPES`."""
    import tensorflow as tf

    return {name: tf.io.FixedLenFeature([], getattr(tf, dtype))
            for name, dtype in FEATURE_DTYPES.items()}


def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parse one serialized record (usable inside ``tf.data.Dataset.map``)."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec())


def write_split(
    root: Path, split: str, examples: Iterable[Example], num_shards: int = 2
) -> list[Path]:
    """Write ``examples`` round-robin into ``num_shards`` files under ``root/split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    directory = Path(root) / split
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    with contextlib.ExitStack() as stack:  # on any error every shard's temporary file goes
        writers = [stack.enter_context(atomic_writer(p, "wb")) for p in paths]
        for i, example in enumerate(examples):
            writers[i % num_shards].write(frame(serialize(example)))
    return paths


def split_files(root: str | Path, split: str) -> list[str]:
    """The shard files of one split, sorted; ``FileNotFoundError`` names what is missing."""
    directory = Path(root) / split
    files = sorted(str(p) for p in directory.glob("*.tfrecord"))
    if not files:
        raise FileNotFoundError(f"no TFRecord shards for split {split!r} under {str(directory)!r}")
    return files


class CorruptRecordError(ValueError):
    """A TFRecord shard fails its framing or checksums; the message names the file."""


#: Shards already checked by this process, by (path, size, mtime): each is read once more.
_VERIFIED: set[tuple[str, int, int]] = set()


def verify_shard(path: str | Path) -> None:
    """Check every record's framing and checksums, naming the file when one fails.

    TensorFlow reports such damage as a ``DataLossError`` that names no file, deep inside
    training; this check runs first, without TensorFlow, one record in memory at a time.
    """
    path = Path(path)
    offset = 0
    with open(path, "rb") as handle:
        while header := handle.read(12):
            problem = ""
            if len(header) < 12:
                problem = "truncated record header"
            elif _masked_crc(header[:8]) != header[8:]:
                problem = "corrupted record length (checksum mismatch)"
            else:
                (length,) = struct.unpack("<Q", header[:8])
                data, crc = handle.read(length), handle.read(4)
                if len(data) < length or len(crc) < 4:
                    problem = "truncated record"
                elif _masked_crc(data) != crc:
                    problem = "corrupted record data (checksum mismatch)"
            if problem:
                raise CorruptRecordError(
                    f"corrupted TFRecord file {str(path)!r}: {problem} at byte {offset}; the "
                    "prepared data set is damaged. If it came from kfp.local's cache, rerun "
                    "with --no-cache (or remove .kfp_cache under the --output-dir folder)"
                )
            offset += 12 + length + 4


def checked_split_files(root: str | Path, split: str) -> list[str]:
    """:func:`split_files`, each shard verified (:func:`verify_shard`) once per process."""
    files = split_files(root, split)
    for name in files:
        stat = Path(name).stat()
        key = (str(Path(name).resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _VERIFIED:
            verify_shard(name)
            _VERIFIED.add(key)
    return files


def read_split(root: str | Path, split: str, limit: int | None = None) -> list[Example]:
    """The records of a split in memory, the first ``limit`` only when given (the train step
    needs one example image, not a whole split of a possibly large data set)."""
    import tensorflow as tf

    dataset = tf.data.TFRecordDataset(split_files(root, split)).map(parse)
    if limit is not None:
        dataset = dataset.take(limit)
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
    return atomic_write_json(Path(root) / CLASSES_FILE, list(classes))


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
