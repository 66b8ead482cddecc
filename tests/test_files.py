"""A full disk: every write names the file it could not write and leaves no temporary file."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.lib.files import WriteError, atomic_write_json, atomic_writer


def test_atomic_writes_name_the_path_and_leave_nothing(tmp_path: Path,
                                                       full_disk: Callable[[int], None]) -> None:
    target = tmp_path / "out" / "metrics.json"
    full_disk(10)
    with pytest.raises(WriteError, match=r"cannot write '.*out/metrics\.json': No space left") as e:
        atomic_write_json(target, {"accuracy": 0.5, "padding": "x" * 100})
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(WriteError, match=r"blob\.bin"), \
            atomic_writer(tmp_path / "out" / "blob.bin", "wb") as handle:
        handle.write(b"0" * 100)
    assert list((tmp_path / "out").iterdir()) == []


def test_an_existing_file_survives_a_failed_rewrite(tmp_path: Path,
                                                    full_disk: Callable[[int], None]) -> None:
    target = atomic_write_json(tmp_path / "summary.json", {"old": True})
    full_disk(5)
    with pytest.raises(OSError, match=r"summary\.json"):
        atomic_write_json(target, {"new": "x" * 100})
    assert target.read_text() == '{\n  "old": true\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_errors_of_the_block_keep_their_own_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^source gone$"), \
            atomic_writer(tmp_path / "x.bin") as handle:
        handle.write(b"partial")
        raise FileNotFoundError("source gone")
    assert list(tmp_path.iterdir()) == []
