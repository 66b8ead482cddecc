"""A simulated full disk: files opened for writing hold only a few bytes (ENOSPC after)."""

from __future__ import annotations

import builtins
import errno
import io
from collections.abc import Callable
from typing import Any

import pytest


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
