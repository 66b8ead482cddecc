"""The TFRecord contract: records written without TensorFlow read back exactly with it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from pipeline.lib import records

EXAMPLES = [
    records.Example(image=bytes(range(256)) * 200, label=1, sha256="ab" * 32,
                    path="iris-setosa/blüte 1.jpg"),
    records.Example(image=b"\xff\xd8", label=300, sha256="", path=""),  # multi-byte varint
    records.Example(image=b"", label=0, sha256="cd" * 32, path="x.png"),
]


def _tf_example(example: records.Example) -> tf.train.Example:
    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    return tf.train.Example(features=tf.train.Features(feature={
        "image": _bytes(example.image),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[example.label])),
        "sha256": _bytes(example.sha256.encode()),
        "path": _bytes(example.path.encode()),
    }))


@pytest.mark.parametrize("example", EXAMPLES, ids=["jpeg", "big-label", "empty"])
def test_serialize_decodes_as_the_same_tf_example(example: records.Example) -> None:
    assert tf.train.Example.FromString(records.serialize(example)) == _tf_example(example)


def test_framing_is_byte_identical_to_tf_record_writer(tmp_path: Path) -> None:
    payload = records.serialize(EXAMPLES[0])
    with tf.io.TFRecordWriter(str(tmp_path / "ref.tfrecord")) as writer:
        writer.write(payload)
    assert records.frame(payload) == (tmp_path / "ref.tfrecord").read_bytes()


def test_written_split_reads_back_through_tf_data(tmp_path: Path) -> None:
    paths = records.write_split(tmp_path, "val", EXAMPLES, num_shards=2)
    assert [p.name for p in paths] == ["val-00000-of-00002.tfrecord",
                                       "val-00001-of-00002.tfrecord"]
    back = records.read_split(tmp_path, "val")
    assert sorted(back, key=lambda e: e.label) == sorted(EXAMPLES, key=lambda e: e.label)
    first = records.read_split(tmp_path, "val", limit=1)
    assert len(EXAMPLES) > 1 and first == back[:1]  # only what the caller needs


def test_corrupted_record_is_rejected_by_tf_crc_check(tmp_path: Path) -> None:
    (path, _) = records.write_split(tmp_path, "test", EXAMPLES[:1], num_shards=2)
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # a byte of the image payload
    path.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset([str(path)]))


def test_preprocess_step_does_not_import_tensorflow() -> None:
    """The download, preprocess and select steps run without paying TensorFlow's import."""
    code = ("import sys; import components.download_dataset, components.preprocess_dataset, "
            "components.select_model, pipeline.steps.download, pipeline.steps.preprocess, "
            "pipeline.steps.select; sys.exit('tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"tensorflow imported: {done.stderr}"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupted_shard_is_named_with_the_no_cache_hint(tmp_path: Path, damage: str) -> None:
    """TensorFlow's DataLossError names no file; the reading path names it and the way out."""
    from pipeline.lib import inputs

    paths = records.write_split(tmp_path, "train", EXAMPLES * 2, num_shards=2)
    data = bytearray(paths[1].read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[-10:]
    paths[1].write_bytes(bytes(data))

    for read in (lambda: inputs.read_labels(tmp_path, "train"),
                 lambda: list(inputs.load_examples(tmp_path, "train", 32, cache=False))):
        # TensorFlow's own error here is a DataLossError that names no file
        with pytest.raises(Exception, match=re.escape(f"corrupted TFRecord file "
                                                      f"{str(paths[1])!r}: ")
                           + ".* rerun with --no-cache") as caught:
            read()
        assert isinstance(caught.value, records.CorruptRecordError)
    records.verify_shard(paths[0])  # the intact shard passes
