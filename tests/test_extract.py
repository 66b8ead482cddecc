"""Safe extraction: zip-slip, absolute paths, links out and zip bombs refused; junk, wrappers."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.lib.archive import (
    ArchiveTooLargeError,
    UnsafeArchiveError,
    safe_extract,
)
from tests.support.imagegen import image_bytes, tar_entries, zip_entries

LIMITS = {"max_bytes": 10_000_000, "max_entries": 1000}


def _all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_zip_slip_and_absolute_paths_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    outside = tmp_path / "victim.txt"
    archive = zip_entries(tmp_path / "evil.zip", {
        "good/ok.jpg": image_bytes(1),
        "../victim.txt": b"zip slip",
        "good/../../victim.txt": b"zip slip, nested",
        str(outside): b"absolute path",
        "C:\\windows\\evil.txt": b"drive path",
    })
    before = _all_files(tmp_path)
    target = tmp_path / "out"

    with pytest.raises(UnsafeArchiveError) as caught:
        safe_extract(archive, target, **LIMITS)

    message = str(caught.value)
    for name in ("../victim.txt", "good/../../victim.txt", str(outside), "C:\\\\windows"):
        assert name in message
    assert "good/ok.jpg" not in message
    assert len(caught.value.entries) == 4
    assert not outside.exists()
    assert not target.exists()
    assert _all_files(tmp_path) == before  # no staging folder or partial file left either


def test_tar_symlink_and_hardlink_pointing_out_are_refused(tmp_path: Path) -> None:
    archive = tar_entries(
        tmp_path / "links.tar", {"cls/a.jpg": image_bytes(1)},
        symlinks={"cls/passwd.jpg": "/etc/passwd", "cls/up.jpg": "../../secret"},
        hardlinks={"cls/hard.jpg": "../outside"},
    )
    target = tmp_path / "out"

    with pytest.raises(UnsafeArchiveError) as caught:
        safe_extract(archive, target, **LIMITS)

    assert sorted(caught.value.entries) == ["cls/hard.jpg", "cls/passwd.jpg", "cls/up.jpg"]
    assert "/etc/passwd" in str(caught.value)
    assert not target.exists()


def test_tar_link_inside_the_archive_becomes_a_plain_copy(tmp_path: Path) -> None:
    data = image_bytes(2)
    archive = tar_entries(tmp_path / "inner.tar.gz", {"a/x.jpg": data, "b/y.jpg": data},
                          mode="w:gz", symlinks={"b/link.jpg": "../a/x.jpg"})

    root = safe_extract(archive, tmp_path / "out", **LIMITS).root

    link = root / "b" / "link.jpg"
    assert not link.is_symlink() and link.read_bytes() == data


def test_zip_bomb_over_the_size_limit_is_refused_before_writing(tmp_path: Path) -> None:
    archive = zip_entries(tmp_path / "bomb.zip", {"cls/zeros.jpg": bytes(20_000_000)})
    assert archive.stat().st_size < 100_000  # small on disk, 20 MB unpacked
    target = tmp_path / "out"

    with pytest.raises(ArchiveTooLargeError, match="20000000 bytes, over the limit of 1000000"):
        safe_extract(archive, target, max_bytes=1_000_000, max_entries=1000)
    assert not target.exists()
    assert _all_files(tmp_path) == {"bomb.zip"}


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_entries_larger_than_declared_are_stopped_at_the_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Sizes are checked again while copying, in case a reader yields more than the header says.

    CPython's zipfile and tarfile stop at the declared size, so such a reader is simulated:
    each entry yields 600 bytes, under the 1000-byte limit alone but not together.
    """
    declared = {"cls/a.jpg": b"x" * 100, "cls/b.jpg": b"y" * 100}
    if kind == "zip":
        archive = zip_entries(tmp_path / "lying.zip", declared)
        monkeypatch.setattr(zipfile.ZipFile, "open",
                            lambda self, *args, **kwargs: io.BytesIO(bytes(600)))
    else:
        archive = tar_entries(tmp_path / "lying.tar", declared)
        monkeypatch.setattr(tarfile.TarFile, "extractfile",
                            lambda self, member: io.BytesIO(bytes(600)))
    target = tmp_path / "out"

    with pytest.raises(ArchiveTooLargeError, match="expands beyond"):
        safe_extract(archive, target, max_bytes=1_000, max_entries=10)
    assert not target.exists()
    assert _all_files(tmp_path) == {archive.name}, "no partial extraction may be left"


def test_too_many_entries_is_refused(tmp_path: Path) -> None:
    archive = zip_entries(tmp_path / "many.zip", {f"cls/{i}.jpg": b"x" for i in range(30)})
    with pytest.raises(ArchiveTooLargeError, match="30 entries, over the limit of 20"):
        safe_extract(archive, tmp_path / "out", max_bytes=10_000, max_entries=20)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz"),
                                         ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz")])
def test_tar_flavours_extract_and_skip_junk(tmp_path: Path, mode: str, suffix: str) -> None:
    files = {
        "a/1.jpg": image_bytes(1), "b/2.jpg": image_bytes(2),
        "a/.DS_Store": b"junk", "b/Thumbs.db": b"junk", "b/.hidden.jpg": b"hidden",
        "__MACOSX/a/._1.jpg": b"resource fork",
    }
    archive = tar_entries(tmp_path / f"data{suffix}", files, mode=mode)

    extraction = safe_extract(archive, tmp_path / "out", **LIMITS)

    assert extraction.root == tmp_path / "out"
    assert _all_files(extraction.root) == {"a", "b", "a/1.jpg", "b/2.jpg"}
    assert sorted(s["path"] for s in extraction.skipped) == [
        "__MACOSX/a/._1.jpg", "a/.DS_Store", "b/.hidden.jpg", "b/Thumbs.db"]


def test_single_wrapping_folder_is_accepted_and_macosx_junk_skipped(tmp_path: Path) -> None:
    archive = zip_entries(tmp_path / "wrapped.zip", {
        "flowers/": b"",
        "flowers/setosa/1.jpg": image_bytes(1),
        "flowers/virginica/2.jpg": image_bytes(2),
        "__MACOSX/flowers/setosa/._1.jpg": b"resource fork",
        "flowers/.DS_Store": b"junk",
    })

    root = safe_extract(archive, tmp_path / "out", **LIMITS).root

    assert root == tmp_path / "out" / "flowers"
    assert sorted(p.name for p in root.iterdir()) == ["setosa", "virginica"]
    assert not (tmp_path / "out" / "__MACOSX").exists()


def test_lone_folder_of_images_is_a_class_not_a_wrapper(tmp_path: Path) -> None:
    archive = zip_entries(tmp_path / "one.zip", {"setosa/1.jpg": image_bytes(1)})
    assert safe_extract(archive, tmp_path / "out", **LIMITS).root == tmp_path / "out"


def test_not_an_archive_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "data.zip"
    bogus.write_text("not an archive")
    with pytest.raises(ValueError, match="not a zip or tar"):
        safe_extract(bogus, tmp_path / "out", **LIMITS)


def test_a_highly_compressed_entry_is_refused_within_the_size_limit(tmp_path: Path) -> None:
    """8 MB of zeros in a few KB: far below max_archive_bytes, but no photo expands 1000x."""
    archive = zip_entries(tmp_path / "bomb.zip", {"cls/a.jpg": image_bytes(1),
                                                  "cls/zeros.bmp": bytes(8_000_000)})
    with pytest.raises(ArchiveTooLargeError, match=r"entry 'cls/zeros\.bmp' .* expands \d+x "
                       r".*over the limit of 200x \(max_entry_compression_ratio\)"):
        safe_extract(archive, tmp_path / "out", **LIMITS)
    assert _all_files(tmp_path) == {"bomb.zip"}


def test_many_small_compressible_entries_hit_the_archive_ratio(tmp_path: Path) -> None:
    """Each entry is below the per-entry floor (1 MiB); together they expand ~1000x."""
    archive = zip_entries(tmp_path / "many.zip",
                          {f"cls/{i}.bmp": bytes(900_000) for i in range(8)})
    with pytest.raises(ArchiveTooLargeError, match=r"many\.zip' expands \d+x .*over the limit "
                       r"of 50x \(max_archive_compression_ratio\)"):
        safe_extract(archive, tmp_path / "out", **LIMITS)
    assert _all_files(tmp_path) == {"many.zip"}


def test_a_compressed_tar_bomb_is_refused_by_the_archive_ratio(tmp_path: Path) -> None:
    archive = tar_entries(tmp_path / "bomb.tar.gz", {"cls/zeros.bmp": bytes(8_000_000)},
                          mode="w:gz")
    with pytest.raises(ArchiveTooLargeError, match="max_archive_compression_ratio"):
        safe_extract(archive, tmp_path / "out", **LIMITS)
    # a looser limit lets the same archive through
    root = safe_extract(archive, tmp_path / "out", **LIMITS, max_archive_ratio=1e6).root
    assert (root / "cls" / "zeros.bmp").stat().st_size == 8_000_000


def test_an_entry_is_cut_at_its_declared_size(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Data beyond an entry's declared size stops the copy at that size, not at the budget."""
    archive = zip_entries(tmp_path / "liar.zip", {"cls/a.jpg": b"x" * 1000})
    monkeypatch.setattr(zipfile.ZipFile, "open",
                        lambda self, info: io.BytesIO(b"x" * 3_000_000))  # a lying stream
    with pytest.raises(ArchiveTooLargeError, match=r"'cls/a\.jpg' .* expands beyond 1000 bytes"):
        safe_extract(archive, tmp_path / "out", **LIMITS)
    assert _all_files(tmp_path) == {"liar.zip"}


def test_names_that_are_not_utf8_are_skipped_with_a_reason(tmp_path: Path) -> None:
    archive = tar_entries(tmp_path / "latin1.tar", {"cls/ok.jpg": image_bytes(1),
                                                    "cls/caf\udce9.jpg": image_bytes(2)})
    extraction = safe_extract(archive, tmp_path / "out", **LIMITS)
    assert _all_files(extraction.root) == {"cls", "cls/ok.jpg"}
    assert extraction.skipped == [{"path": "cls/caf\\xe9.jpg",
                                   "reason": "file name is not valid UTF-8"}]
