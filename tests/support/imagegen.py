"""Test helpers: small real images (seeded noise) and archives built from folders or entries."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, *, size: int = 48, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A distinct, decodable image: seeded noise, so different seeds give different bytes."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}
    if mode == "P":
        base = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        image = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        shape = (size, size) if channels[mode] == 1 else (size, size, channels[mode])
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_class_folders(root: Path, counts: dict[str, int], *, seed: int = 0) -> Path:
    """``root/<class>/img-<i>.jpg`` with ``counts[class]`` distinct JPEGs each."""
    for c, (label, n) in enumerate(sorted(counts.items())):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (folder / f"img-{i:03d}.jpg").write_bytes(image_bytes(seed * 10_000 + c * 1000 + i))
    return root


def zip_folder(folder: Path, archive: Path, *, prefix: str = "",
               extra: dict[str, bytes] | None = None) -> Path:
    """Zip every file under ``folder`` (names relative to it, under ``prefix``) plus ``extra``."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            handle.write(path, prefix + path.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            handle.writestr(name, data)
    return archive


def zip_entries(archive: Path, entries: dict[str, bytes]) -> Path:
    """A zip holding exactly ``entries`` (name as stored -> bytes), malicious names included."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for name, data in entries.items():
            handle.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return archive


def tar_entries(archive: Path, files: dict[str, bytes], *, mode: str = "w",
                symlinks: dict[str, str] | None = None,
                hardlinks: dict[str, str] | None = None) -> Path:
    """A tar (``mode`` "w", "w:gz", "w:bz2", "w:xz") with files and link entries as given."""
    with tarfile.open(archive, mode) as handle:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks or {}), (tarfile.LNKTYPE, hardlinks or {})):
            for name, target in links.items():
                info = tarfile.TarInfo(name)
                info.type = kind
                info.linkname = target
                handle.addfile(info)
    return archive
