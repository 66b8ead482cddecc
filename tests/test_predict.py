"""Batch predictions: the compiled second pipeline (offline), submit / schedule with a fake
client, the CLI's one-line errors, the new images' checks, and (slow) labels equal to the
evaluate step's on the test images."""

from __future__ import annotations

import csv
import json
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import PipelineConfig, load_images
from pipeline.dag import DEFAULT_MODEL_URI, PREDICT_FIELDS, PREDICT_PIPELINE_NAME
from pipeline.lib.params import PredictParams
from pipeline.runners.predict import compile_predict, cron_fields, submit_predict
from pipeline.steps import predict
from tests.support.imagegen import image_bytes, zip_entries

SECRET = "mlflow-credentials"


# ---------------------------------------------------------------------------------------
# compile (offline, like tests/test_compile.py)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = compile_predict(tmp_path_factory.mktemp("predict") / "predict.yaml",
                           mlflow_secret=SECRET)
    docs = list(yaml.safe_load_all(path.read_text()))
    return {"pipeline": docs[0], "platform": docs[1] if len(docs) > 1 else {}}


def _container(pipeline: dict[str, Any], task: str) -> dict[str, Any]:
    label = pipeline["components"][f"comp-{task}"]["executorLabel"]
    return pipeline["deploymentSpec"]["executors"][label]["container"]


def test_compiles_download_then_predict(spec: dict[str, Any]) -> None:
    pipeline = spec["pipeline"]
    assert pipeline["pipelineInfo"]["name"] == PREDICT_PIPELINE_NAME
    tasks = pipeline["root"]["dag"]["tasks"]
    assert set(tasks) == {"download-dataset", "predict-images"}
    raw = tasks["predict-images"]["inputs"]["artifacts"]["raw_data"]["taskOutputArtifact"]
    assert raw == {"outputArtifactKey": "raw_data", "producerTask": "download-dataset"}
    assert tasks["predict-images"]["cachingOptions"].get("enableCache", False) is False
    assert tasks["download-dataset"]["retryPolicy"]["maxRetryCount"] > 0
    assert set(pipeline["root"]["outputDefinitions"]["artifacts"]) == {
        "raw_data", "predictions", "drift_report"}
    cpu = load_images()["cpu"]
    assert {_container(pipeline, t)["image"] for t in tasks} == {cpu}


def test_parameters_and_their_defaults(spec: dict[str, Any]) -> None:
    params = spec["pipeline"]["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {*PREDICT_FIELDS, "model_uri", "tracking_uri"}
    assert params["model_uri"]["defaultValue"] == DEFAULT_MODEL_URI
    assert DEFAULT_MODEL_URI == "models:/iris-image-classifier@champion"
    defaults = PipelineConfig()
    for name in ("batch_size", "max_image_bytes", "min_image_side"):
        assert params[name]["defaultValue"] == getattr(defaults, name)
    wired = spec["pipeline"]["root"]["dag"]["tasks"]["predict-images"]["inputs"]["parameters"]
    assert set(PredictParams.field_names()) <= set(wired)


def test_predict_reads_mlflow_settings_from_the_secret_and_config_map(
        spec: dict[str, Any]) -> None:
    executors = spec["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    predict_env = executors["exec-predict-images"]
    assert predict_env["secretAsEnv"][0]["secretName"] == SECRET
    assert predict_env["configMapAsEnv"][0]["keyToEnv"][0]["envVar"] == "MLFLOW_TRACKING_URI"
    assert "secretAsEnv" not in executors.get("exec-download-dataset", {})


def test_cli_compile_predict_writes_the_second_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "predict.yaml"
    code = main(["--compile", "--predict", "s3://bucket/new/", "-o", str(out),
                 "--model-uri", "models:/iris-image-classifier/3",
                 "--allow-placeholder-images"])
    assert code == 0
    pipeline = next(yaml.safe_load_all(out.read_text()))
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert params["data_source"]["defaultValue"] == "s3://bucket/new/"
    assert params["model_uri"]["defaultValue"] == "models:/iris-image-classifier/3"


# ---------------------------------------------------------------------------------------
# submit and schedule, with a fake kfp.Client
# ---------------------------------------------------------------------------------------
class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _record(self, call: str, **kwargs: Any) -> None:
        self.calls.append((call, kwargs))

    def get_pipeline_id(self, name: str) -> None:
        self._record("get_pipeline_id", name=name)

    def upload_pipeline(self, path: str, **kwargs: Any) -> Any:
        spec = next(yaml.safe_load_all(Path(path).read_text()))
        self._record("upload_pipeline", spec=spec, **kwargs)
        return types.SimpleNamespace(pipeline_id="pipe-1")

    def list_pipeline_versions(self, pipeline_id: str, **kwargs: Any) -> Any:
        version = types.SimpleNamespace(pipeline_version_id="ver-1")
        return types.SimpleNamespace(pipeline_versions=[version])

    def create_experiment(self, name: str, namespace: str | None = None) -> Any:
        self._record("create_experiment", name=name)
        return types.SimpleNamespace(experiment_id="exp-1")

    def run_pipeline(self, **kwargs: Any) -> Any:
        self._record("run_pipeline", **kwargs)
        return types.SimpleNamespace(run_id="run-1")

    def create_recurring_run(self, **kwargs: Any) -> Any:
        self._record("create_recurring_run", **kwargs)
        return types.SimpleNamespace(recurring_run_id="rec-1")

    def named(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for call, kwargs in self.calls if call == name]


def test_schedule_creates_a_recurring_run_of_the_predict_pipeline() -> None:
    client = FakeClient()
    config = PipelineConfig(data_source="gs://bucket/new/")
    result = submit_predict(config, host="http://kfp", schedule="0 2 * * *",
                            model_uri="models:/iris-image-classifier@challenger", client=client)
    assert result.run_id == "rec-1"
    assert not client.named("run_pipeline")
    [recurring] = client.named("create_recurring_run")
    assert recurring["cron_expression"] == "0 0 2 * * *"
    assert recurring["params"]["data_source"] == "gs://bucket/new/"
    assert recurring["params"]["model_uri"] == "models:/iris-image-classifier@challenger"
    assert (recurring["pipeline_id"], recurring["version_id"]) == ("pipe-1", "ver-1")
    [upload] = client.named("upload_pipeline")
    assert upload["pipeline_name"] == PREDICT_PIPELINE_NAME
    assert upload["spec"]["pipelineInfo"]["name"] == PREDICT_PIPELINE_NAME


def test_without_a_schedule_submit_starts_one_run() -> None:
    client = FakeClient()
    result = submit_predict(PipelineConfig(data_source="gs://b/x/"), host="http://kfp",
                            client=client)
    assert result.run_id == "run-1"
    assert not client.named("create_recurring_run")
    assert client.named("run_pipeline")[0]["params"]["model_uri"] == DEFAULT_MODEL_URI


@pytest.mark.parametrize("schedule", ["nightly", "0 2 * *", "1 2 3 4 5 6 7"])
def test_a_schedule_that_is_no_cron_expression_is_refused(schedule: str) -> None:
    with pytest.raises(ValueError, match="not a cron expression"):
        cron_fields(schedule)


# ---------------------------------------------------------------------------------------
# CLI: usage errors and a missing model, one line each, before any work
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "message"), [
    (["--local", "--schedule", "0 2 * * *"], "--schedule only applies to --predict"),
    (["--predict", "x/", "--schedule", "0 2 * * *"], "--schedule only applies to --submit"),
    (["--predict", "x/", "--data", "y/"], "--data does not apply to --predict"),
    (["--compile", "--predict", "x/", "--model-uri", "runs:/abc/model"],
     "must be models:/NAME@ALIAS or models:/NAME/VERSION"),
])
def test_usage_errors_exit_2_with_one_line(argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


@pytest.mark.slow  # creating the sqlite tracking store takes seconds
def test_a_model_uri_that_does_not_exist_exits_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["--predict", str(tmp_path), "--tracking-uri", uri,
                 "--model-uri", "models:/no-such-model@champion",
                 "--output-dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pipeline.py: error: model models:/no-such-model@champion does "
                              "not exist")
    assert not (tmp_path / "out").exists()  # no work started


# ---------------------------------------------------------------------------------------
# new images: preprocess's checks without labels
# ---------------------------------------------------------------------------------------
def _params(**overrides: Any) -> PredictParams:
    values = {**PipelineConfig().to_dict(), "model_uri": DEFAULT_MODEL_URI, **overrides}
    return PredictParams.from_mapping(values)


def test_every_file_is_a_new_image_and_bad_ones_are_skipped_with_a_reason(
        tmp_path: Path) -> None:
    source = tmp_path / "new"
    (source / "a" / "b").mkdir(parents=True)
    (source / "top.jpg").write_bytes(image_bytes(1, size=64))
    (source / "a" / "b" / "deep.png").write_bytes(image_bytes(2, size=64, fmt="PNG"))
    (source / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    (source / "a" / "notes.txt").write_text("hello")
    (source / ".DS_Store").write_bytes(b"junk")
    found = predict.scan_new_images(source, tmp_path / "work", _params())
    assert sorted(i.path for i in found.images) == ["a/b/deep.png", "top.jpg"]
    assert {s["path"]: s["reason"] for s in found.skipped} == {
        "a/broken.jpg": "not an image", "a/notes.txt": "unsupported file type"}
    assert found.seen == 4


def test_an_archive_of_new_images_is_extracted_within_the_limits(tmp_path: Path) -> None:
    archive = zip_entries(tmp_path / "new.zip", {"x/1.jpg": image_bytes(1, size=64),
                                                 "x/2.jpg": image_bytes(2, size=64)})
    found = predict.scan_new_images(archive, tmp_path / "work", _params())
    assert len(found.images) == 2
    with pytest.raises(ValueError, match="max_archive_entries"):
        predict.scan_new_images(archive, tmp_path / "work2", _params(max_archive_entries=1))


@pytest.mark.parametrize(("files", "message"), [
    ({}, "no files in the source"),
    ({"bad.jpg": b"garbage", "tiny.png": image_bytes(3, size=8, fmt="PNG")},
     "no usable image in the source new: all 2 files skipped (1 not an image, 1 too small)"),
])
def test_empty_or_all_bad_sources_are_one_line_errors(tmp_path: Path, files: dict[str, bytes],
                                                      message: str) -> None:
    source = tmp_path / "new"
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        predict.predict_images(source, tmp_path / "out", model=None, params=_params(),  # type: ignore[arg-type]
                               source="new")
    assert not (tmp_path / "out" / "predictions.csv").exists()


# ---------------------------------------------------------------------------------------
# slow: a registered model (the shared reference model with its drift reference)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, iris_data: Path,
               reference_model: tuple[Path, Any]) -> dict[str, Any]:
    """The reference model logged and registered @champion in a sqlite store of its own."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.lib import embeddings, model_logging, records

    model_dir, summary = reference_model
    embeddings.write_reference(model_dir, iris_data, summary.image_size)
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("registry")
        tests = records.read_split(iris_data, "test")
        with mlflow.start_run():
            info = model_logging.log_model(model_dir, image_size=summary.image_size,
                                           example_image=tests[0].image, name="m")
        version = mlflow.register_model(info.model_uri, "iris-image-classifier").version
        MlflowClient().set_registered_model_alias("iris-image-classifier", "champion", version)
    finally:
        mlflow.set_tracking_uri(previous)
    return {"uri": uri, "version": str(version), "tests": tests, "model_dir": model_dir}


def _write_tests(folder: Path, tests: list[Any]) -> Path:
    folder.mkdir()
    for example in tests:
        (folder / Path(example.path).name).write_bytes(example.image)
    return folder


@pytest.mark.slow
def test_batch_labels_equal_the_evaluate_steps_on_the_test_images(
        tmp_path: Path, iris_data: Path, registered: dict[str, Any]) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.steps.evaluate import evaluate_model
    from tests.support.train_helpers import small_eval

    mlflow.set_tracking_uri(registered["uri"])
    tests = registered["tests"]
    version = predict.resolve_model_version(DEFAULT_MODEL_URI, MlflowClient())
    model = predict.LoadedModel.download(version, tmp_path / "download")
    assert model.reference is not None  # the drift reference travels with the model
    result = predict.predict_images(_write_tests(tmp_path / "new", tests), tmp_path / "out",
                                    model, _params(batch_size=16))

    evaluated = evaluate_model(registered["model_dir"], iris_data, tmp_path / "eval",
                               small_eval())
    with (tmp_path / "eval" / "predictions.csv").open() as handle:
        expected = {row["image_id"]: row["predicted_label"] for row in csv.DictReader(handle)}
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(expected) == evaluated["test_examples"] == len(tests)
    assert {row["sha256"]: row["label"] for row in rows} == expected
    assert {row["model_version"] for row in rows} == {registered["version"]}
    assert result["drift"]["overall"]["images"] == len(tests)


@pytest.mark.slow
def test_cli_predict_runs_locally_and_logs_under_the_model_version(
        tmp_path: Path, registered: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.INFO, logger="pipeline")
    source = _write_tests(tmp_path / "new", registered["tests"][:25])
    (source / "broken.jpg").write_bytes(b"not a jpeg")
    common = ["--tracking-uri", registered["uri"], "--output-dir", str(tmp_path / "out")]
    assert main(["--predict", str(source), *common, "--summary", str(tmp_path / "s.json")]) == 0
    err = caplog.text
    assert "predicted 25 images with iris-image-classifier v" in err
    assert "skipped 1 file: 1 not an image" in err
    assert "drift: " in err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert Path(summary["predictions"]).is_file()
    client = MlflowClient(registered["uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["model.version"] == registered["version"]
    assert run.data.metrics["images_scored"] == 25
    version = client.get_model_version("iris-image-classifier", registered["version"])
    assert version.tags["batch_predictions.last_run"] == run.info.run_id

    empty = tmp_path / "empty"
    empty.mkdir()
    caplog.clear()
    assert main(["--predict", str(empty), *common]) == 1
    errors = [r.getMessage() for r in caplog.records
              if r.name == "pipeline" and r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("batch predictions failed: step 'predict-images' failed: ")
    assert "no files in the source" in errors[0]


def test_features_are_the_heads_input_under_test_time_views() -> None:
    """The drift features of an exported model with views are its classifier's pooled
    features on the identity view, and the head's probabilities on them."""
    import numpy as np

    from pipeline.lib import embeddings, models
    from tests.support.train_helpers import tiny_train

    core = models.build_model(tiny_train(), 3)
    exported = models.with_test_time_views(core, 4, tiny_train().image_size)
    features, probabilities = embeddings.feature_extractor(exported)(
        np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3)).astype("float32"))
    pooled = core.get_layer(models.POOL).output.shape[-1]
    assert features.shape == (2, pooled)
    head = core.get_layer(models.HEAD)
    np.testing.assert_allclose(np.asarray(probabilities), np.asarray(head(features)), rtol=1e-5)
