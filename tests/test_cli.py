"""CLI tests: argument checking, config precedence and errors, --compile, the root script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main, parse_overrides, resolve_config
from pipeline.config import (
    DEFAULT_DATA_SHA256,
    DEFAULT_DATA_SOURCE,
    ENV_OVERRIDES,
    PipelineConfig,
)
from pipeline.steps.download import fetch_dataset, file_sha256

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _defaults(path: Path) -> dict:
    spec = next(yaml.safe_load_all(path.read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    return {name: param.get("defaultValue") for name, param in params.items()}


def test_help_documents_modes_options_keys_and_environment(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--local", "--compile", "--submit", "--output-dir", "--summary", "--data",
                 "--set", "--config", "--host", "--experiment", "--namespace", "--wait",
                 "--tracking-uri", "--mlflow-secret", "-o"):
        assert flag in text, flag
    for key in PipelineConfig.field_names():
        assert key in text, key
    for var in ENV_OVERRIDES:
        assert var in text, var


@pytest.mark.parametrize(("argv", "message"), [
    ([], "one of the arguments --local --compile --submit is required"),
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


def test_unknown_key_lists_the_valid_keys(capsys: pytest.CaptureFixture) -> None:
    assert main(["--compile", "--set", "epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key(s) 'epoch'" in err
    assert all(key in err for key in PipelineConfig.field_names())


@pytest.mark.parametrize(("item", "message"), [
    ("epochs=three", "config key 'epochs' expects int, got 'three'"),
    ("dropout=1.5", "dropout must be in [0, 1)"),
    ("model=resnet", "model='resnet' is not one of"),
    ("epochs", "--set expects KEY=VALUE, got 'epochs'"),
])
def test_bad_values_are_clear_errors(item: str, message: str,
                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["--compile", "--set", item]) == 2
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
