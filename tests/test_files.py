"""A full disk: every write names the file it could not write and leaves no temporary file."""

from __future__ import annotations

import builtins
import errno
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.lib.files import WriteError, atomic_write_bytes, atomic_write_json, atomic_writer
from pipeline.runners import write_json


class _FullDisk:
    """A file object whose writes fail as on a full disk once ``room`` bytes are written."""

    def __init__(self, handle: Any, room: int) -> None:
        self._handle = handle
        self._room = room

    def write(self, data: Any) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._handle.write(data)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Make every file opened for writing (``open``/``io.open``) hold only ``room`` bytes."""

    def install(room: int) -> None:
        real_open = builtins.open

        def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real_open(file, mode, *args, **kwargs)
            return _FullDisk(handle, room) if any(c in mode for c in "wax+") else handle

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)

    return install


def test_atomic_writes_name_the_path_and_leave_nothing(tmp_path: Path,
                                                       full_disk: Callable[[int], None]) -> None:
    target = tmp_path / "out" / "metrics.json"
    full_disk(10)
    with pytest.raises(WriteError, match=r"cannot write '.*out/metrics\.json': No space left") as e:
        atomic_write_json(target, {"accuracy": 0.5, "padding": "x" * 100})
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(WriteError, match=r"blob\.bin"):
        atomic_write_bytes(tmp_path / "out" / "blob.bin", b"0" * 100)
    assert list((tmp_path / "out").iterdir()) == []


def test_an_existing_file_survives_a_failed_rewrite(tmp_path: Path,
                                                    full_disk: Callable[[int], None]) -> None:
    target = atomic_write_json(tmp_path / "summary.json", {"old": True})
    full_disk(5)
    with pytest.raises(OSError, match=r"summary\.json"):
        write_json({"new": "x" * 100}, target)
    assert target.read_text() == '{\n  "old": true\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_errors_of_the_block_keep_their_own_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^source gone$"), \
            atomic_writer(tmp_path / "x.bin") as handle:
        handle.write(b"partial")
        raise FileNotFoundError("source gone")
    assert list(tmp_path.iterdir()) == []
