"""CLI tests: argument checking, config precedence and errors, --compile, the root script."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.cli_args import parse_overrides, resolve_config
from pipeline.cli_closing import closing_block
from pipeline.config import (
    DEFAULT_DATA_SHA256,
    DEFAULT_DATA_SOURCE,
    ENV_OVERRIDES,
    PipelineConfig,
)
from pipeline.lib.fetch import fetch_dataset
from pipeline.lib.files import file_sha256
from tests.support.paths import PROJECT_ROOT


def _defaults(path: Path) -> dict:
    spec = next(yaml.safe_load_all(path.read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    return {name: param.get("defaultValue") for name, param in params.items()}


def test_help_documents_modes_options_keys_and_environment(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--local", "--compile", "--submit", "--output-dir", "--summary", "--data",
                 "--set", "--config", "--host", "--experiment", "--namespace", "--wait",
                 "--tracking-uri", "--mlflow-secret", "--data-secret",
                 "--allow-placeholder-images", "IRIS_DATA_USERNAME", "IRIS_DATA_PASSWORD", "-o",
                 "--restore-champion", "--verbose"):
        assert flag in text, flag
    for key in PipelineConfig.field_names():
        assert key in text, key
    for var in ENV_OVERRIDES:
        assert var in text, var


@pytest.mark.parametrize(("argv", "message"), [
    ([], "one of the arguments --local --compile --submit --restore-champion is required"),
    (["--local", "--restore-champion", "1"], "not allowed with argument"),
    (["--local", "--compile"], "not allowed with argument"),
    (["--compile", "--summary", "s.json"], "--summary only applies to --local"),
    (["--local", "-o", "x.yaml"], "-o/--output only applies to --compile"),
    (["--compile", "--wait"], "--wait only applies to --submit"),
    (["--submit"], "--submit needs --host"),
    (["--compile", "--output-dir", "elsewhere"], "--output-dir only applies to --local"),
    (["--local", "--mlflow-secret", "s"], "--mlflow-secret only applies to --compile"),
])
def test_usage_errors_exit_2_with_a_message(argv: list[str], message: str,
                                            capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _summary(passed: bool, registration: dict | None) -> dict:
    return {
        "test_metrics": {"accuracy": 0.6441, "accuracy_ci_low": 0.529, "accuracy_ci_high": 0.762,
                         "balanced_accuracy": 0.44888, "test_examples": 59.0},
        "majority_baseline": {"accuracy": 0.6440677966101694, "balanced_accuracy": 1 / 3},
        "interval_method": "stratified bootstrap",
        "gate": {"metric": "balanced_accuracy", "value": 0.44888, "threshold": 0.5,
                 "passed": passed},
        "registration": registration,
        "mlflow": {"run_id": "abc123", "experiment_name": "iris", "experiment_id": "3",
                   "tracking_uri": "sqlite:////w/mlflow.db"},
        "data": {"sha256": "ab" * 32, "sha256_checked": True},
        "run_dir": "/w/local_outputs/run-1", "elapsed_s": 96.44, "cached_steps": [],
    }


def test_closing_block_rounds_shows_intervals_and_the_right_comparison() -> None:
    lines = closing_block(_summary(False, None))
    assert lines[0] == ("test (59 images):     accuracy 0.644 [0.529, 0.762]  "
                        "balanced_accuracy 0.449")
    assert lines[1] == "majority baseline:    accuracy 0.644  balanced_accuracy 0.333"
    assert "gate: balanced_accuracy 0.449 < 0.500 -> failed" in lines
    assert "not registered: the gate failed, so the register step did not run" in lines
    assert '  mlflow ui --backend-store-uri "sqlite:////w/mlflow.db" --app-name iris' in lines
    assert "  then http://127.0.0.1:5000/iris/experiments/3" in lines
    assert lines[-1] == "total: 96.4 s"
    registered = {"registered": True, "name": "iris", "version": "2", "alias": "challenger",
                  "reason": "within noise"}
    assert ("registered: iris version 2 @challenger (within noise)"
            in closing_block(_summary(True, registered)))


def test_unknown_key_lists_the_valid_keys(capsys: pytest.CaptureFixture) -> None:
    assert main(["--compile", "--set", "epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key(s) 'epoch'" in err
    assert all(key in err for key in PipelineConfig.field_names())


@pytest.mark.parametrize(("item", "message"), [
    ("epochs=three", "config key 'epochs' expects int, got 'three'"),
    ("dropout=1.5", "dropout must be in [0, 1)"),
    ("model=resnet", "model='resnet' is not one of"),
    ("gate_on=lower", "gate_on='lower' is not one of ['point', 'ci_low']"),
    ("promotion_margin=-0.1", "promotion_margin must be in [0, 1)"),
    ("epochs", "--set expects KEY=VALUE, got 'epochs'"),
    ("learning_rate=nan", "learning_rate must be a finite number, got nan"),
    ("learning_rate=inf", "learning_rate must be a finite number, got inf"),
    ("gate_threshold=-inf", "gate_threshold must be a finite number, got -inf"),
    ("seed=-1", "seed must be in [0, 4294967295], got -1"),
    ("seed=4294967296", "seed must be in [0, 4294967295], got 4294967296"),
    ("image_size=100000", "image_size must be in [32, 1024], got 100000"),
    ("model=seed_cnn image_size=93", "model=seed_cnn needs image_size in [94, 1024], got 93"),
    ("max_entry_compression_ratio=0.5", "max_entry_compression_ratio must be in [1.0,"),
    ("weights_sha256=abc", "weights_sha256 must be 64 hex digits"),
    ("weights=imagenet weights_sha256=" + "0" * 64,
     "weights_sha256 checks a weights file or URL"),
])
def test_bad_values_are_clear_errors(item: str, message: str,
                                     capsys: pytest.CaptureFixture) -> None:
    sets = [arg for pair in item.split(" ") for arg in ("--set", pair)]
    assert main(["--compile", *sets]) == 2
    assert message in capsys.readouterr().err


def test_unreadable_config_file_is_a_usage_error(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert main(["--compile", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_precedence_defaults_file_environment_data_set(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("epochs: 7\nbatch_size: 8\ndata_source: from-file\nseed: 1\n")
    env = {"IRIS_DATA_SOURCE": "from-env", "IRIS_MODEL_WEIGHTS": "w.h5"}
    config = resolve_config(config_file, None, ["epochs=9"], environ=env)
    assert (config.epochs, config.batch_size, config.seed) == (9, 8, 1)
    assert (config.data_source, config.weights) == ("from-env", "w.h5")
    assert resolve_config(config_file, "from-flag", [], environ=env).data_source == "from-flag"
    from_set = resolve_config(None, "x", ["data_source=from-set"], environ=env)
    assert from_set.data_source == "from-set"
    assert resolve_config(environ={}) == PipelineConfig()


def test_default_digest_applies_to_the_default_source_only(tmp_path: Path) -> None:
    mine = tmp_path / "my.zip"
    with zipfile.ZipFile(mine, "w") as archive:
        archive.writestr("a/x.txt", "not the default archive")
    config = resolve_config(None, str(mine), [], environ={})
    assert config.data_sha256 == "", "a user's source is not held to the default digest"
    fetched = fetch_dataset(config.data_source, tmp_path / "raw", config.data_sha256 or None)
    assert file_sha256(fetched) == file_sha256(mine)
    assert resolve_config(environ={"IRIS_DATA_SOURCE": str(mine)}).data_sha256 == ""
    assert resolve_config(None, DEFAULT_DATA_SOURCE, [], environ={}).data_sha256 == (
        DEFAULT_DATA_SHA256)
    assert resolve_config(environ={}).data_sha256 == DEFAULT_DATA_SHA256

    given = "ab" * 32  # a digest given in any layer is kept, and enforced by the download
    assert resolve_config(None, str(mine), [f"data_sha256={given}"], environ={}).data_sha256 \
        == given
    env = {"IRIS_DATA_SOURCE": str(mine), "IRIS_DATA_SHA256": given}
    assert resolve_config(environ=env).data_sha256 == given
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"data_sha256: {DEFAULT_DATA_SHA256}\n")
    pinned = resolve_config(config_file, str(mine), [], environ={})
    assert pinned.data_sha256 == DEFAULT_DATA_SHA256
    with pytest.raises(ValueError, match="sha256 mismatch"):
        fetch_dataset(pinned.data_source, tmp_path / "raw2", pinned.data_sha256)


def test_parse_overrides_keeps_everything_after_the_first_equals() -> None:
    assert parse_overrides(["data_source=s3://b/k?x=1", "epochs=2"]) == {
        "data_source": "s3://b/k?x=1", "epochs": "2"}


def test_compile_writes_yaml_with_overrides_as_defaults(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "p.yaml"
    argv = ["--compile", "-o", str(out), "--data", "gs://bucket/iris.zip", "--set", "epochs=4",
            "--set", "augment_flip=false", "--tracking-uri", "http://mlflow:5000"]
    assert main(argv) == 0
    defaults = _defaults(out)
    assert defaults["data_source"] == "gs://bucket/iris.zip"
    assert defaults["epochs"] == 4 and defaults["augment_flip"] is False
    assert defaults["tracking_uri"] == "http://mlflow:5000"
    assert not list(out.parent.glob(".*tmp*")), "temporary file left behind"


def test_compile_rejects_a_non_yaml_package(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--compile", "-o", str(tmp_path / "p.json")]) == 2
    assert ".yaml or .yml" in capsys.readouterr().err


def test_root_script_is_the_cli(tmp_path: Path) -> None:
    """``python pipeline.py`` must import the ``pipeline`` package, not itself."""
    out = tmp_path / "pipeline.yaml"
    done = subprocess.run([sys.executable, "pipeline.py", "--compile", "-o", str(out)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _defaults(out)["epochs"] == PipelineConfig().epochs
    bad = subprocess.run([sys.executable, "pipeline.py", "--local", "--set", "nope=1"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown config key(s) 'nope'" in bad.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (["--local", "--summary", "{folder}"], "--summary '{folder}' is a folder; give a file path"),
    (["--local", "--output-dir", "{file}"], "--output-dir '{file}' is a file, not a folder"),
    (["--local", "--summary", "{file}/s.json"],
     "--summary '{file}/s.json' cannot be created: '{file}' is a file"),
    (["--compile", "-o", "{folder}"], "-o/--output '{folder}' is a folder; give a file path"),
])
def test_unusable_output_paths_exit_2_before_any_work(
        flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started despite an unusable output path")

    monkeypatch.setattr("pipeline.cli.run_local", no_work)
    monkeypatch.setattr("pipeline.cli.compile_pipeline", no_work)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("user data")
    paths = {"folder": str(tmp_path / "folder"), "file": str(tmp_path / "file")}
    before = sorted(tmp_path.rglob("*"))

    assert main([flag.format(**paths) for flag in flags]) == 2

    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"pipeline.py: error: {message.format(**paths)}"]
    assert sorted(tmp_path.rglob("*")) == before
    assert (tmp_path / "file").read_text() == "user data"


@pytest.mark.parametrize("flags", [["--local", "--summary", "{file}"],
                                   ["--compile", "-o", "{file}"]])
def test_an_existing_output_file_is_replaced_not_refused(
        flags: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-running with the same --summary or -o path is the common case: it must not exit 2."""
    started: list[str] = []

    def work(*args: object, **kwargs: object) -> None:
        started.append("work")
        raise ValueError("stop here")

    monkeypatch.setattr("pipeline.cli.run_local", work)
    monkeypatch.setattr("pipeline.cli.compile_pipeline", work)
    existing = tmp_path / "out.yaml"
    existing.write_text("from an earlier run")

    with contextlib.suppress(ValueError):
        main([flag.format(file=existing) for flag in flags])

    assert started == ["work"]
