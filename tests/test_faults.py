"""Hostile input met where users meet it: each case is refused early, in one line, no traceback.

Sweep files too large to expand, config values no step could hold, loose YAML, output paths
that cannot be written, downloads that are no archive, links and FIFOs in a data folder, an
image bomb in an archive (issue 22; the config ranges are issue 18's mutation item 3).
"""

from __future__ import annotations

import http.server
import io
import os
import struct
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import sweep
from pipeline.cli import main
from pipeline.cli_args import resolve_config
from pipeline.config import RANGES, PipelineConfig
from pipeline.lib.contract import EXECUTOR_OUTPUT, META_SKIPPED
from pipeline.lib.fetch import fetch_dataset
from pipeline.lib.params import DownloadParams, PreprocessParams
from pipeline.lib.sniff import NotAnArchiveError, archive_kind
from pipeline.runners import StepFailedError
from pipeline.steps import download, preprocess
from pipeline.stepspec import SPECS_BY_TASK
from tests.support.imagegen import image_bytes, write_class_folders, zip_folder
from tests.support.prepared import load_report


def _refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI in process; it must exit 2 with one error line and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("pipeline.py: error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any step starting fails the test: refusals must come before the work."""
    def work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started")

    monkeypatch.setattr("pipeline.cli.run_local", work)
    monkeypatch.setattr("pipeline.cli.compile_pipeline", work)


# --- 1. a sweep grid is counted, not expanded -------------------------------------------------


def test_a_huge_sweep_grid_is_refused_by_its_count_before_expanding_it(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        no_work: None) -> None:
    """4 keys x 1,000 values is 10^12 trials: expanding them exhausted memory (issue 22)."""
    def expanded(*args: object) -> None:
        raise AssertionError("the grid was expanded before its size was checked")

    monkeypatch.setattr(sweep, "_grid", expanded)
    keys = ("seed", "alpha", "head_c", "dropout")
    lines = ["grid:"] + [f"  {key}: [{', '.join(str(i + 1) for i in range(1000))}]"
                         for key in keys]
    path = tmp_path / "huge.yaml"
    path.write_text("\n".join(lines) + "\n")

    line = _refused(["--compile", "--sweep", str(path)], capsys)

    assert "the sweep has 1000000000000 trials (1000 x 1000 x 1000 x 1000); at most 64" in line


# --- 5. every numeric field has a range the stack can hold -----------------------------------


def test_every_numeric_field_has_a_range() -> None:
    numeric = {name for name, kind in PipelineConfig.field_types().items()
               if kind in (int, float)}
    assert numeric == set(RANGES)


@pytest.mark.parametrize(("item", "message"), [
    # issue 18: "> 0" loosened to ">= 0" must be noticed
    ("epochs=0", "epochs must be in [1, 100000], got 0"),
    ("batch_size=0", "batch_size must be in [1, 65536], got 0"),
    ("learning_rate=0", "learning_rate must be in (0.0, 10.0], got 0.0"),
    ("fine_tune_learning_rate=0", "fine_tune_learning_rate must be in (0.0, 10.0], got 0.0"),
    ("download_deadline_s=0", "download_deadline_s must be in (0.0, 10000000.0], got 0.0"),
    # issue 18: the held-out limit 0.9 raised to 1.0 (or made inclusive) must be noticed
    ("val_fraction=0.5 test_fraction=0.45",
     "val_fraction + test_fraction must stay below 0.9 (at least 10% for training), got 0.95"),
    ("val_fraction=0.45 test_fraction=0.45", "val_fraction + test_fraction must stay below 0.9"),
    ("gate_threshold=1.5", "gate_threshold must be in [0.0, 1.0], got 1.5"),
    ("gate_threshold=-0.01", "gate_threshold must be in [0.0, 1.0], got -0.01"),
    # issue 22: numbers TensorFlow or KFP cannot hold, named here instead of inside a step
    ("epochs=99999999999999999999", "epochs must be in [1, 100000], got 99999999999999999999"),
    ("split_seed=99999999999999999999999", "split_seed must be in [0, 4294967295]"),
    ("augment_zoom=1", "augment_zoom must be in [0.0, 1.0), got 1.0"),
    ("max_archive_bytes=18014398509481984", "max_archive_bytes must be in [1, 9007199254740992]"),
])
def test_numbers_out_of_range_exit_2_naming_the_field(
        item: str, message: str, capsys: pytest.CaptureFixture, no_work: None) -> None:
    sets = [arg for pair in item.split(" ") for arg in ("--set", pair)]
    assert message in _refused(["--compile", *sets], capsys)


@pytest.mark.parametrize("item", [
    "epochs=1", "batch_size=1", "gate_threshold=0", "gate_threshold=1",
    "val_fraction=0.4 test_fraction=0.45", "learning_rate=1e-9", "split_seed=4294967295",
    "download_min_bytes_per_s=0", "augment_rotation=1",
])
def test_the_ends_of_each_range_are_accepted(item: str) -> None:
    config = resolve_config(overrides=item.split(" "))
    for pair in item.split(" "):
        key, value = pair.split("=")
        assert getattr(config, key) == type(getattr(config, key))(float(value))


# --- 6. loose YAML in --config -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    (b"epochs: true\n", "config key 'epochs' expects int, got True"),
    (b"learning_rate: false\n", "config key 'learning_rate' expects float, got False"),
    (b"data_source: null\n", "config key 'data_source' expects str, got None"),
    (b"weights: no\n", "config key 'weights' expects str, got False (YAML reads yes/no"),
    (b"epochs: 3\nseed: 1\nepochs: 5\n", "key 'epochs' is given twice (line 3)"),
    (b"epochs: 1.0e+23\n", "epochs must be in [1, 100000]"),
    (b"epochs: [3]\n", "config key 'epochs' expects int, got [3]"),
    (b"# caf\xe9 in Latin-1\nepochs: 3\n", "not UTF-8 text"),
], ids=["bool-int", "bool-float", "null-str", "bool-str", "duplicate", "huge-float", "list",
        "latin-1"])
def test_loose_yaml_is_refused_naming_the_key_or_the_file(
        text: bytes, message: str, tmp_path: Path, capsys: pytest.CaptureFixture,
        no_work: None) -> None:
    path = tmp_path / "my config.yaml"
    path.write_bytes(text)
    line = _refused(["--compile", "--config", str(path)], capsys)
    assert message in line
    if message in ("not UTF-8 text", "key 'epochs' is given twice (line 3)"):
        assert repr(str(path)) in line


# --- 4. output locations are tried before any step starts ------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--local", "--summary", "/proc/nope/s.json"],
     "--summary '/proc/nope/s.json' cannot be written: '/proc' refuses new files"),
    (["--local", "--output-dir", "/proc/nope"],
     "--output-dir '/proc/nope' cannot be written: '/proc' refuses new files"),
    (["--compile", "-o", "/proc/nope/p.yaml"],
     "-o/--output '/proc/nope/p.yaml' cannot be written: '/proc' refuses new files"),
    (["--local", "--tracking-uri", "sqlite:////proc/nope/mlflow.db"],
     "the MLflow store '/proc/nope/mlflow.db' cannot be written"),
])
def test_unwritable_output_locations_exit_2_before_any_step(
        flags: list[str], message: str, capsys: pytest.CaptureFixture, no_work: None) -> None:
    """/proc refuses new files even to root, whom permission bits (os.access) let through."""
    assert message in _refused(flags, capsys)


# --- 3. a download that is no archive never enters a cache -----------------------------------


@pytest.fixture
def web() -> Iterator[dict]:
    """An HTTP server answering 200 with ``web["body"]`` as ``web["type"]``."""
    state: dict = {"body": b"", "type": "text/html; charset=utf-8"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", state["type"])
            self.send_header("Content-Length", str(len(state["body"])))
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/iris-image.zip"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_an_html_page_served_as_the_archive_is_refused_and_not_cached(
        web: dict, tmp_path: Path) -> None:
    web["body"] = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
    out, cache = tmp_path / "out", tmp_path / "cache"
    params = DownloadParams(data_source=web["url"], data_sha256="",
                            download_deadline_s=30.0, download_min_bytes_per_s=0.0)

    with pytest.raises(NotAnArchiveError) as caught:
        download.run_step(params, out)
    assert str(caught.value).startswith(
        f"{web['url']} is an HTML page (served as text/html; charset=utf-8), not a zip or "
        "tar(.gz/.bz2/.xz) archive")
    assert not any(out.rglob("*"))
    # the same URL serving the archive afterwards is fetched, not answered from a cache
    archive = zip_folder(write_class_folders(tmp_path / "data", {"a": 2, "b": 2}),
                         tmp_path / "real.zip")
    web["body"], web["type"] = archive.read_bytes(), "application/zip"
    fetched = fetch_dataset(web["url"], tmp_path / "again", cache_dir=cache)
    assert fetched.read_bytes() == archive.read_bytes()


def _tar(path: Path, mode: str) -> Path:
    with tarfile.open(path, mode) as handle:
        info = tarfile.TarInfo("a/x.jpg")
        data = image_bytes(1)
        info.size = len(data)
        handle.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_archives_of_every_compression_are_accepted(mode: str, tmp_path: Path) -> None:
    archive = _tar(tmp_path / "data.bin", mode)  # told by content, not by name
    assert fetch_dataset(str(archive), tmp_path / "out").read_bytes() == archive.read_bytes()


@pytest.mark.parametrize(("content", "what"), [
    (image_bytes(1), "a JPEG image"),
    (b'{"error": "not found"}', "JSON"),
    (b"", "an empty file"),
    (b"GIF89a" + bytes(20), "a GIF image"),
])
def test_a_local_file_that_is_no_archive_is_refused(
        content: bytes, what: str, tmp_path: Path) -> None:
    source = tmp_path / "iris-image.zip"
    source.write_bytes(content)
    with pytest.raises(NotAnArchiveError, match=f"is {what}, not a zip or tar"):
        fetch_dataset(str(source), tmp_path / "out")
    assert not (tmp_path / "out" / "iris-image.zip").exists()


def test_a_preprocess_failure_on_a_cached_download_names_no_cache(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"

    def fails(*args: object, **kwargs: object) -> None:
        raise StepFailedError("preprocess-dataset", "corrupt zip archive", run_dir)

    def said() -> str:
        text = caplog.text
        caplog.clear()
        return text

    monkeypatch.setattr("pipeline.cli.run_local", fails)
    argv = ["--local", "--output-dir", str(tmp_path / "out"), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}"]
    run_dir.mkdir()  # the download task left no folder in this run: kfp.local's cache served it
    assert main(argv) == 1
    assert "rerun with --no-cache" in said()
    # downloaded in this very run, or --no-cache given already: no such hint
    (run_dir / "download-dataset").mkdir()
    (run_dir / "download-dataset" / EXECUTOR_OUTPUT).write_text("{}")
    assert main(argv) == 1
    assert "pipeline failed" in (text := said()) and "--no-cache" not in text
    (run_dir / "download-dataset" / EXECUTOR_OUTPUT).unlink()
    assert main([*argv, "--no-cache"]) == 1
    assert "pipeline failed" in (text := said()) and "rerun with --no-cache" not in text


# --- 9. what was left out is in the data report and on the console ---------------------------


def _preprocess_params(**changes: object) -> PreprocessParams:
    config = PipelineConfig.from_mapping({"min_images_per_class": 2, **changes})
    return config.params_for(PreprocessParams)


def test_links_and_fifos_of_a_data_folder_are_in_the_data_report(tmp_path: Path) -> None:
    folder = write_class_folders(tmp_path / "flowers", {"a": 3, "b": 3})
    (folder / "a" / "link.jpg").symlink_to(folder / "b" / "img-000.jpg")
    (folder / "a" / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    os.mkfifo(folder / "b" / "pipe.jpg")
    (folder / "b" / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    raw = tmp_path / "raw"
    meta = download.run_step(DownloadParams(str(folder), "", 30.0, 0.0), raw)
    assert len(meta[META_SKIPPED]) == 4

    out = preprocess.run_step(raw, meta, tmp_path / "prepared", tmp_path / "report.md",
                              _preprocess_params())

    report = load_report(tmp_path / "prepared")
    skipped = {s["path"]: (s["reason"], s["detail"]) for s in report["skipped"]}
    assert skipped == {
        "a/link.jpg": ("symbolic link", "link, not followed"),
        "a/dangling.jpg": ("symbolic link", "dangling link"),
        "b/pipe.jpg": ("not a regular file", "a FIFO, socket or device, not a regular file"),
        "b/elsewhere": ("symbolic link", "linked folder, not followed"),
    }
    assert report["files_seen"] == 10 and report["files_used"] == 6
    assert out["files_skipped"] == 4
    assert "`a/dangling.jpg` | symbolic link" in (tmp_path / "report.md").read_text()


def _grey_png(side: int) -> bytes:
    """A valid 1-bit PNG of side x side zeros: a few kB that decode to side² pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0,
                                                              0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_the_console_line_names_an_image_bomb_skipped_from_an_archive(tmp_path: Path) -> None:
    folder = write_class_folders(tmp_path / "flowers", {"a": 3, "b": 3})
    archive = zip_folder(folder, tmp_path / "flowers.zip",
                         extra={"a/bomb.png": _grey_png(15_000)})  # 225 Mpx: Pillow refuses
    raw = tmp_path / "raw"
    meta = download.run_step(DownloadParams(str(archive), "", 30.0, 0.0), raw)

    out = preprocess.run_step(raw, meta, tmp_path / "prepared", tmp_path / "report.md",
                              _preprocess_params())

    line = SPECS_BY_TASK["preprocess-dataset"].show(out)
    assert line.endswith("1 skipped: a/bomb.png (too many pixels)"), line


def test_the_console_line_shows_the_first_skipped_files_and_says_there_are_more() -> None:
    meta = {"split_sizes": {"train": 4, "val": 1, "test": 1}, "duplicates_dropped": 0,
            "files_skipped": 5, "skipped_files": ["a/1.jpg (empty file)", "a/2.jpg (x)",
                                                  "b/3.jpg (y)"]}
    line = SPECS_BY_TASK["preprocess-dataset"].show(meta)
    assert line.endswith("5 skipped: a/1.jpg (empty file), a/2.jpg (x), b/3.jpg (y) ...")


def test_zip_members_are_still_told_by_content(tmp_path: Path) -> None:
    """A zip whose name says tar is a zip: the sniff reads bytes, never the extension."""
    archive = tmp_path / "data.tar.gz"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("a/x.jpg", image_bytes(2))
    with open(archive, "rb") as handle:
        assert archive_kind(handle) == "zip"
