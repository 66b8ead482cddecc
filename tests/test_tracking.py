"""Tracking against a real ``mlflow server`` (and a local sqlite store): runs, params, metrics,
artifacts, dataset inputs, the logged model, fail-fast checks and the KFP plugin's run."""

from __future__ import annotations

import datetime
import http.server
import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import filelock
import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from pipeline import __version__
from pipeline.config import PipelineConfig
from pipeline.lib import images as image_lib
from pipeline.lib import tracking_log, tracking_runs, tracking_store
from pipeline.lib.backbones import model_label
from pipeline.lib.model_logging import MlflowEpochLogger, log_model
from pipeline.lib.params import TrainParams
from pipeline.lib.tracking_log import log_artifacts, log_dataset_input, log_metrics
from pipeline.lib.tracking_runs import step_run
from pipeline.lib.tracking_store import (
    TrackingServerError,
    check_tracking_server,
    resolve_tracking_uri,
)
from tests.support.mlflow_server import MlflowServer, PortForward, images
from tests.support.paths import PROJECT_ROOT

CLASSES = ["iris-setosa", "iris-versicolour", "iris-virginica"]
SHA = "48a5f6b0ad1019f4f7ce2628e08e9f71104ae625db1b7e4c24eaf051133f4589"


def tiny_model(fixed_size: int | None = None, dtype: str = "uint8",
               run_eagerly: bool = False) -> keras.Model:
    """Images in (any size unless ``fixed_size``), resizing and rescaling inside.
    ``run_eagerly``: a fit of a few images skips tracing the training step (a second)."""
    keras.utils.set_random_seed(0)
    side = fixed_size
    inputs = keras.Input(shape=(side, side, 3), dtype=dtype)
    x = keras.layers.Resizing(16, 16)(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], run_eagerly=run_eagerly)
    return model


def save_model_dir(model: keras.Model, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / "model.keras")
    (directory / "classes.json").write_text(json.dumps(CLASSES))
    return directory


def run_kwargs(uri: str, pipeline_run_id: str, **extra: object) -> dict:
    return {"tracking_uri": uri, "experiment_name": extra.pop("experiment", "tracking-tests"),
            "pipeline_run_id": pipeline_run_id, "pipeline_name": "iris-test", **extra}


def find_parent(client: MlflowClient, experiment: str, pipeline_run_id: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`kfp.pipeline_run_id` = '{pipeline_run_id}' "
                      "AND tags.`iris.run_kind` = 'pipeline'")


# ---------------------------------------------------------------------------------------
# URI resolution and local sqlite default
# ---------------------------------------------------------------------------------------
def test_resolve_tracking_uri_prefers_explicit_then_env_then_absolute_sqlite(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    expected = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    assert resolve_tracking_uri(None, Path("work")) == expected
    assert resolve_tracking_uri("  ", tmp_path).startswith("sqlite:////")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://env:5000"
    assert resolve_tracking_uri("http://explicit:1", tmp_path) == "http://explicit:1"


def test_sqlite_default_keeps_database_and_artifacts_in_workdir(
        ram_tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In RAM (``ram_tmp_path``): the new store's migrations commit many times."""
    workdir, elsewhere = ram_tmp_path / "work", ram_tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a cwd-relative ./mlruns would land here
    uri = resolve_tracking_uri(None, workdir)
    note = ram_tmp_path / "note.txt"
    note.write_text("hello")
    with step_run("train", **run_kwargs(uri, "local-1", params={"epochs": 2})) as run:
        log_artifacts(note)
        log_metrics({"accuracy": 0.5})
    assert (workdir / "mlflow.db").is_file()
    assert list((workdir / "mlartifacts").rglob("note.txt")), "artifact not under workdir"
    assert not any(elsewhere.iterdir()), f"files leaked into cwd: {list(elsewhere.iterdir())}"
    client = MlflowClient(uri)
    child = client.get_run(run.info.run_id)
    assert child.info.artifact_uri.startswith((workdir / "mlartifacts").as_uri())
    assert child.data.metrics == {"accuracy": 0.5}
    assert os.environ.get("MLFLOW_TRACKING_URI") is None, "step_run leaked its tracking URI"


def test_sqlite_store_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").write_bytes(b"this is not sqlite" * 100)
    uri = resolve_tracking_uri(None, tmp_path)
    with pytest.raises(TrackingServerError, match=re.escape(uri)):
        check_tracking_server(uri)


# ---------------------------------------------------------------------------------------
# Fail fast
# ---------------------------------------------------------------------------------------
def test_unreachable_server_fails_fast_naming_the_uri(closed_port_uri: str) -> None:
    started = time.monotonic()
    with pytest.raises(TrackingServerError, match=re.escape(closed_port_uri)):
        check_tracking_server(closed_port_uri)
    with (pytest.raises(TrackingServerError, match=re.escape(closed_port_uri)),
          step_run("train", **run_kwargs(closed_port_uri, "never"))):
        pytest.fail("the body must not run when the server is unreachable")
    elapsed = time.monotonic() - started
    print(f"fail-fast on a closed port: {elapsed:.2f} s for two checks")
    assert elapsed < 30, f"fail-fast contract: took {elapsed:.1f} s"


def test_server_that_never_answers_fails_within_the_timeout() -> None:
    """A listening socket that never replies (a hung server): bounded by ``timeout_s``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nobody ever answers
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TrackingServerError, match=re.escape(uri)):
            check_tracking_server(uri, timeout_s=1)
        elapsed = time.monotonic() - started
    assert 0.75 < elapsed < 5, f"expected to give up after ~1 s, took {elapsed:.1f} s"


class _Refusing(http.server.BaseHTTPRequestHandler):
    status = 401

    def _answer(self) -> None:
        body = b'{"error_code": "UNAUTHENTICATED", "message": "no credentials"}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status, phrase", [(401, "credentials"), (403, "credentials"),
                                            (503, "unhealthy")])
def test_refusing_server_is_a_clear_error(status: int, phrase: str) -> None:
    handler = type("Handler", (_Refusing,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # shutdown() waits for the loop's next poll: the default 0.5 s was most of the test
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        started = time.monotonic()
        with pytest.raises(TrackingServerError) as info:
            check_tracking_server(uri, timeout_s=10)
        assert time.monotonic() - started < 15  # no MLflow retry/backoff on 503
    finally:
        server.shutdown()
        server.server_close()
    assert uri in str(info.value) and str(status) in str(info.value)
    assert phrase in str(info.value)


def test_password_in_uri_is_not_shown(closed_port_uri: str) -> None:
    uri = closed_port_uri.replace("http://", "http://alice:s3cret@")
    with pytest.raises(TrackingServerError) as info:
        check_tracking_server(uri)
    assert "s3cret" not in str(info.value) and "alice:***@" in str(info.value)


@pytest.mark.mlflow_server
def test_reachable_server_passes_check(mlflow_server: MlflowServer) -> None:
    check_tracking_server(mlflow_server.url)


@pytest.mark.mlflow_server
def test_a_server_lost_mid_step_fails_it_within_the_bound_naming_the_server(
        forwarded_server: PortForward, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own retries would wait minutes; the step gives up within its bound."""
    monkeypatch.setenv(tracking_store.GIVE_UP_ENV, "6")
    with pytest.raises(tracking_store.TrackingServerLostError) as raised, step_run(
            "train", **run_kwargs(forwarded_server.url, f"lost-{uuid.uuid4().hex[:8]}")) as run:
        log_metrics({"loss": 1.0}, step=1)
        forwarded_server.stop()
        started = time.monotonic()
        log_metrics({"loss": 0.5}, step=2)
    elapsed = time.monotonic() - started
    assert elapsed < 6 + 5, f"gave up after {elapsed:.1f} s"  # the bound, and ending the runs
    message = str(raised.value)
    assert f"MLflow tracking server {forwarded_server.url} went away during step 'train'" in (
        message)
    assert f"Run {run.info.run_id} of step 'train'" in message
    assert "not logged" in message and "Rerun the same command" in message
    forwarded_server.start()  # back: what was logged before the loss is there
    history = MlflowClient(forwarded_server.url).get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0)]


@pytest.mark.mlflow_server
def test_a_server_back_within_the_bound_loses_nothing(forwarded_server: PortForward,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Back after 2 s: later than retries without backoff reach (the first at once, then four
    waits of at most the 0.5 s jitter), in time for the first retry after a backoff (2 s plus
    jitter); should it just miss that one, the next, at 6 s, finds the server back."""
    monkeypatch.setenv(tracking_store.GIVE_UP_ENV, "60")  # retries at 0, 0, 2, 6, 14, 30 s
    with step_run("train", **run_kwargs(forwarded_server.url,
                                        f"back-{uuid.uuid4().hex[:8]}")) as run:
        forwarded_server.stop()
        threading.Timer(2.0, forwarded_server.start).start()  # longer than retries w/o backoff
        log_metrics({"loss": 0.5})
    client = MlflowClient(forwarded_server.url)
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.5}
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_request_bounds_keep_every_call_within_the_bound() -> None:
    """Retries and backoff fill half the bound, attempts that never answer the other half."""
    for bound in (6.0, 60.0, 120.0, 300.0):
        settings = tracking_store.request_bounds(bound)
        retries = int(settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
        factor = int(settings["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
        jitter = float(settings["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"])
        timeout = int(settings["MLFLOW_HTTP_REQUEST_TIMEOUT"])
        # urllib3 waits 0 before the first retry, then factor * 2**(n - 1)
        waits = sum(factor * 2 ** (n - 1) + jitter for n in range(2, retries + 1)) + jitter
        assert waits + (retries + 1) * timeout <= bound * 1.05, (bound, settings)
        assert waits >= bound / 2 - 1 or bound < 60, (bound, settings)
    assert tracking_store.request_bounds(120.0)["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "2"


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "inf"])
def test_a_bad_give_up_setting_is_named(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracking_store.GIVE_UP_ENV, value)
    with pytest.raises(ValueError, match=f"{tracking_store.GIVE_UP_ENV} must be a number"):
        tracking_store.give_up_s()


def test_the_first_use_lock_of_a_local_store_is_mlflow_db_init_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README names it; the store check takes it; a second holder has to wait."""
    uri = resolve_tracking_uri(None, tmp_path)
    lock = tmp_path / "mlflow.db.init.lock"
    taken: list[Path] = []

    class Recording(filelock.FileLock):
        def __init__(self, path: Path, *args: object, **kwargs: object) -> None:
            taken.append(Path(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(tracking_store, "FileLock", Recording)
    (tmp_path / "mlflow.db").write_bytes(b"not a database" * 100)  # fails fast, in the lock
    with pytest.raises(TrackingServerError):
        check_tracking_server(uri)
    assert taken == [lock]
    with tracking_store.local_store_lock(uri, "init"), pytest.raises(filelock.Timeout):
        filelock.FileLock(lock, timeout=0).acquire()
    assert tracking_store.lock_path("http://server:5000", "init") is None


def test_mlflow_internals_are_where_the_adapter_expects() -> None:
    """Fails on the MLflow upgrade that moves them: then update ``mlflow_compat`` only."""
    from mlflow.exceptions import MlflowException

    from pipeline.lib import mlflow_compat

    assert mlflow_compat.MLFLOW_MODEL_VERSIONS == "mlflow.modelVersions"
    error = MlflowException("bad image", error_code=mlflow_compat.INVALID_PARAMETER_VALUE)
    assert error.get_http_status_code() == 400
    assert error.error_code == "INVALID_PARAMETER_VALUE"


# ---------------------------------------------------------------------------------------
# Parent and child runs against the real server
# ---------------------------------------------------------------------------------------
@pytest.mark.mlflow_server
def test_parent_and_nested_step_runs_with_params_and_tags(mlflow_server: MlflowServer) -> None:
    config = PipelineConfig(epochs=3, image_size=64)
    run_id = f"kfp-{uuid.uuid4()}"
    children = {}
    for step in ("train", "evaluate"):
        with step_run(step, **run_kwargs(mlflow_server.url, run_id,
                                         params=config.to_dict())) as run:
            assert mlflow.active_run().info.run_id == run.info.run_id
            mlflow.log_metric(f"{step}_done", 1)
            children[step] = run.info.run_id

    client = MlflowClient(mlflow_server.url)
    parents = find_parent(client, "tracking-tests", run_id)
    assert len(parents) == 1, "exactly one parent per pipeline run"
    parent = parents[0]
    assert parent.data.params == {k: str(v) for k, v in config.to_dict().items()}
    assert parent.data.tags["kfp.pipeline_run_id"] == run_id
    assert parent.data.tags["kfp.pipeline_name"] == "iris-test"
    assert parent.data.tags["iris.package_version"] == __version__
    head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    if head:
        assert parent.data.tags["mlflow.source.git.commit"] == head
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.source.type"] == "JOB"
    assert parent.data.tags["mlflow.source.name"] == f"iris-test (KFP run {run_id})"
    assert re.fullmatch(r"mobilenet a0\.25 64px avg · iris-image\.zip · "
                        r"\d\d-\d\d \d\d:\d\d", parent.info.run_name), parent.info.run_name

    for step, child_id in children.items():
        child = client.get_run(child_id)
        assert child.info.run_name == step
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["kfp.step"] == step
        assert child.info.status == "FINISHED"
        assert child.data.metrics == {f"{step}_done": 1.0}
        assert child.data.params == parent.data.params, "a step run shows its params"



@pytest.mark.parametrize(("params", "expected"), [
    ({"model": "mobilenet", "alpha": 0.5, "image_size": 96, "pooling": "avg",
      "fine_tune_epochs": 3, "data_source": "https://host/x/my%20flowers.zip?sig=1"},
     "mobilenet a0.5 96px avg fine-tune 3 · my flowers.zip · 11-27 09:05"),
    ({"model": "mobilenet", "backbone": "efficientnet_v2_b0", "alpha": 0.5, "image_size": 224,
      "pooling": "avg_max", "tta_views": 8, "data_source": "iris-image.zip"},
     "efficientnet_v2_b0 224px avg_max tta8 · iris-image.zip · 11-27 09:05"),
    ({"model": "seed_cnn", "alpha": 0.25, "image_size": 64, "data_source": "/data/iris/"},
     "seed_cnn 64px · iris · 11-27 09:05"),
    ({}, "iris-test · 11-27 09:05"),
])
def test_parent_run_name_says_what_differs(params: dict, expected: str) -> None:
    started = datetime.datetime(2026, 11, 27, 9, 5)
    assert tracking_runs.parent_run_name(params, "iris-test", started) == expected


@pytest.mark.mlflow_server
def test_experiment_opens_on_training_runs_and_has_a_description(
        mlflow_server: MlflowServer) -> None:
    client = MlflowClient(mlflow_server.url)
    created = f"kind-{uuid.uuid4()}"
    older = f"kind-{uuid.uuid4()}"  # made by an earlier version: no tags
    older_id = client.create_experiment(older)
    edited = f"kind-{uuid.uuid4()}"  # a user's own description and kind are kept
    edited_id = client.create_experiment(edited, tags={"mlflow.note.content": "mine",
                                                       "mlflow.experimentKind": "other"})
    for name in (created, older, edited):
        with step_run("train", **run_kwargs(mlflow_server.url, f"kfp-{uuid.uuid4()}",
                                            experiment=name)):
            pass
    for name in (created, older):
        tags = client.get_experiment_by_name(name).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        assert tags["mlflow.note.content"] == tracking_store.EXPERIMENT_DESCRIPTION
    assert client.get_experiment(older_id).tags["mlflow.experimentKind"] == (
        "custom_model_development")
    tags = client.get_experiment(edited_id).tags
    assert (tags["mlflow.note.content"], tags["mlflow.experimentKind"]) == ("mine", "other")


@pytest.mark.mlflow_server
def test_relogging_params_is_idempotent_and_conflicts_go_to_the_step(
        mlflow_server: MlflowServer) -> None:
    run_id = f"kfp-{uuid.uuid4()}"
    with step_run("train", **run_kwargs(mlflow_server.url, run_id, params={"epochs": 3})):
        pass
    with step_run("evaluate", **run_kwargs(mlflow_server.url, run_id,
                                           params={"epochs": 3, "seed": 1})):
        pass
    with step_run("register", **run_kwargs(mlflow_server.url, run_id,
                                           params={"epochs": 5})) as run:
        pass
    client = MlflowClient(mlflow_server.url)
    parent = find_parent(client, "tracking-tests", run_id)[0]
    assert parent.data.params == {"epochs": "3", "seed": "1"}
    assert client.get_run(run.info.run_id).data.params == {"epochs": "5"}, (
        "the value the parent could not take stays visible on the step")


@pytest.mark.mlflow_server
def test_failing_step_marks_step_and_parent_failed(mlflow_server: MlflowServer) -> None:
    run_id = f"kfp-{uuid.uuid4()}"
    with (pytest.raises(ValueError, match="boom"),
          step_run("train", **run_kwargs(mlflow_server.url, run_id)) as run):
        raise ValueError("boom")
    client = MlflowClient(mlflow_server.url)
    child = client.get_run(run.info.run_id)
    assert child.info.status == "FAILED"
    assert child.data.tags["error"] == "ValueError: boom"
    parent = find_parent(client, "tracking-tests", run_id)[0]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["error"] == "step train: ValueError: boom"  # not a bare FAILED
    assert mlflow.active_run() is None


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_epoch_logger_history_matches_epochs_run(mlflow_server: MlflowServer) -> None:
    model = tiny_model()
    x, y = images(12, 20, 20), np.arange(12) % 3
    with step_run("train", **run_kwargs(mlflow_server.url, f"kfp-{uuid.uuid4()}")) as run:
        logger = MlflowEpochLogger()
        history = model.fit(x, y, validation_data=(x, y), epochs=3, verbose=0,
                            callbacks=[logger])
        # a second fit (fine-tuning) restarts Keras' epoch count; steps must continue
        model.optimizer.learning_rate.assign(0.001)
        model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0, callbacks=[logger])
    client = MlflowClient(mlflow_server.url)
    for key in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        points = client.get_metric_history(run.info.run_id, key)
        assert [p.step for p in sorted(points, key=lambda p: p.step)] == [1, 2, 3, 4, 5], key
    losses = sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                    key=lambda p: p.step)
    assert [p.value for p in losses[:3]] == pytest.approx(history.history["loss"])
    # the learning rate where it changes only: the first epoch and the second fit's first
    rates = sorted(client.get_metric_history(run.info.run_id, "train/learning_rate"),
                   key=lambda p: p.step)
    assert [(p.step, p.value) for p in rates] == [(1, pytest.approx(0.01)),
                                                  (4, pytest.approx(0.001))]


def test_a_learning_rate_is_a_metric_only_once_it_changes(
        new_sqlite_store: Callable[[str], str]) -> None:
    """Constant, it is the param (MLflow drew its one point at zero on a -0.5..0.5 axis);
    changed by a second fit, both values are logged at the steps they began."""
    model = tiny_model(run_eagerly=True)
    x, y = images(6, 20, 20), np.arange(6) % 3
    uri = new_sqlite_store("learning-rate")
    with step_run("train", **run_kwargs(uri, f"kfp-{uuid.uuid4()}")) as run:
        logger = MlflowEpochLogger()
        model.fit(x, y, epochs=2, verbose=0, callbacks=[logger])
        client = MlflowClient(uri)
        assert client.get_metric_history(run.info.run_id, "train/learning_rate") == []
        model.optimizer.learning_rate.assign(0.001)
        model.fit(x, y, epochs=1, verbose=0, callbacks=[logger])
    rates = sorted(client.get_metric_history(run.info.run_id, "train/learning_rate"),
                   key=lambda p: p.step)
    assert [(p.step, p.value) for p in rates] == [(1, pytest.approx(0.01)),
                                                  (3, pytest.approx(0.001))]


@pytest.mark.mlflow_server
def test_artifacts_metrics_and_dataset_input(mlflow_server: MlflowServer,
                                             tmp_path: Path) -> None:
    outputs = tmp_path / "eval"
    outputs.mkdir()
    for name in ("confusion_matrix.png", "training_curves.png", "report.html"):
        (outputs / name).write_bytes(b"x" * 10)
    report = {"counts": {"iris-setosa": 59, "iris-versicolour": 253, "iris-virginica": 77},
              "duplicates_dropped": 32}
    metrics = {"accuracy": 0.9, "balanced_accuracy": 0.85, "macro_f1": 0.8,
               "majority_baseline_accuracy": 0.65, "gate_passed": True,
               "gate_metric": "balanced_accuracy", "per_class": {"iris-setosa": {"f1": 1.0}},
               "nan_metric": float("nan")}
    with step_run("evaluate", **run_kwargs(mlflow_server.url, f"kfp-{uuid.uuid4()}")) as run:
        log_artifacts(outputs)
        log_artifacts(outputs / "report.html", "reports")
        digest = log_dataset_input("/data/iris-image.zip", SHA, report)
        logged = log_metrics(metrics, on_parent=True)
        with pytest.raises(FileNotFoundError, match=r"missing\.png"):
            log_artifacts(tmp_path / "missing.png")

    assert digest == SHA[:32]
    assert logged == {"accuracy": 0.9, "balanced_accuracy": 0.85, "macro_f1": 0.8,
                      "majority_baseline_accuracy": 0.65, "gate_passed": 1.0,
                      "per_class.iris-setosa.f1": 1.0}
    client = MlflowClient(mlflow_server.url)
    child = client.get_run(run.info.run_id)
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert child.data.metrics == logged and parent.data.metrics == logged

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "training_curves.png", "report.html", "reports",
            "data_report.json"} <= names
    stored = list(mlflow_server.artifacts_dir.rglob("confusion_matrix.png"))
    assert stored, "artifact did not reach the server's artifact store"
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="data_report.json", tracking_uri=mlflow_server.url,
        dst_path=str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == report

    for run_data in (child, parent):
        inputs = run_data.inputs.dataset_inputs
        assert len(inputs) == 1
        dataset = inputs[0].dataset
        assert dataset.digest == SHA[:32] and dataset.name == "iris-image"
        assert "/data/iris-image.zip" in dataset.source
        assert json.loads(dataset.profile)["sha256"] == SHA
        tags = {t.key: t.value for t in inputs[0].tags}
        assert tags == {"mlflow.data.context": "training", "sha256": SHA}


def test_helpers_need_an_active_run() -> None:
    with pytest.raises(RuntimeError, match="step_run"):
        log_metrics({"a": 1})
    with pytest.raises(RuntimeError, match="step_run"):
        log_dataset_input("x.zip", SHA, {})


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------
def example_jpeg() -> bytes:
    return tf.io.encode_jpeg(images(1, 40, 30)[0]).numpy()


def fitted(raw: np.ndarray, size: int) -> np.ndarray:
    """``raw`` as the served model (and the data pipeline) hands it to Keras."""
    resizer = image_lib.make_resizer(size)
    return np.stack([image_lib.fit_image(image, resizer).numpy() for image in raw])


@pytest.mark.mlflow_server
@pytest.mark.parametrize("fixed_size, dtype", [(None, "uint8"), (16, "uint8"), (None, "float32")],
                         ids=["any-size-model", "fixed-size-model", "float-input-model"])
def test_logged_model_labels_raw_uint8_images_of_odd_size(
        mlflow_server: MlflowServer, tmp_path: Path, fixed_size: int | None, dtype: str) -> None:
    model = tiny_model(fixed_size, dtype)
    model_dir = save_model_dir(model, tmp_path / "model")
    with step_run("train", **run_kwargs(mlflow_server.url, f"kfp-{uuid.uuid4()}")) as run:
        info = log_model(model_dir, image_size=16, example_image=example_jpeg(), name="tiny")
    assert info.model_uri.startswith("models:/")

    mlflow.set_tracking_uri(mlflow_server.url)  # step_run restored the previous (unset) URI
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    assert loaded.metadata.metadata["classes"] == CLASSES
    assert loaded.metadata.get_output_schema().input_names() == ["label", *CLASSES]
    assert loaded.metadata.saved_input_example_info is not None
    odd = images(3, 37, 53, seed=1)
    predicted = loaded.predict(odd)
    assert predicted.shape == (3, 1 + len(CLASSES))
    probabilities = predicted[CLASSES].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    expected = model.predict(fitted(odd, 16).astype(dtype), verbose=0)
    assert np.allclose(probabilities, expected, atol=1e-5)
    assert list(predicted["label"]) == [CLASSES[k] for k in expected.argmax(axis=1)]

    logged = MlflowClient(mlflow_server.url).get_logged_model(info.model_id)
    assert logged.source_run_id == run.info.run_id
    assert logged.name == "tiny"


@pytest.mark.mlflow_server
def test_the_pipelines_own_model_logs_and_predicts(mlflow_server: MlflowServer,
                                                  tmp_path: Path) -> None:
    """Integration with pipeline.lib.models: the architecture training exports."""
    from pipeline.lib import models

    params = PipelineConfig(model="seed_cnn", image_size=96, weights="none")
    model = models.build_model(params.params_for(TrainParams), len(CLASSES))
    model_dir = save_model_dir(model, tmp_path / "model")
    with step_run("train", **run_kwargs(mlflow_server.url, f"kfp-{uuid.uuid4()}")):
        info = log_model(model_dir, image_size=96, example_image=example_jpeg(), name="cnn")
    mlflow.set_tracking_uri(mlflow_server.url)
    odd = images(2, 45, 61, seed=3)
    predicted = mlflow.pyfunc.load_model(info.model_uri).predict(odd)[CLASSES].to_numpy()
    assert np.allclose(predicted, model.predict(fitted(odd, 96), verbose=0), atol=1e-5)


@pytest.mark.mlflow_server
def test_the_train_steps_model_names_are_logged(mlflow_server: MlflowServer,
                                                tmp_path: Path) -> None:
    """The train step names a model by its backbone and width (``...-a0.5-...``); MLflow
    refuses "." (and "/", ":", "%", quotes) in a logged model's name."""
    model_dir = save_model_dir(tiny_model(None, "uint8"), tmp_path / "model")
    label = model_label("transfer", "mobilenet_v2", 0.5, 320)
    with step_run("train", **run_kwargs(mlflow_server.url, f"kfp-{uuid.uuid4()}")):
        info = log_model(model_dir, image_size=16, example_image=example_jpeg(),
                         name=f"iris-{label}-seed42")
    logged = MlflowClient(mlflow_server.url).get_logged_model(info.model_id)
    assert logged.name == "iris-mobilenet_v2-a0_5-320px-seed42"


@pytest.mark.mlflow_server
def test_logging_the_model_does_not_load_it_back_and_logs_what_pyfunc_log_model_does(
        mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's ``pyfunc.log_model`` loads a model back to score its input example (seconds
    for the train step's model). ``mlflow_compat.log_python_model`` skips that through an
    undocumented argument: this fails on the MLflow upgrade that drops it, or that makes the
    logged model differ from ``pyfunc.log_model``'s (flavors, signature, example, tags)."""
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import PythonModel
    from mlflow.types import ColSpec, Schema

    from pipeline.lib import mlflow_compat

    class Example(PythonModel):
        loads = 0

        def load_context(self, context: object) -> None:
            type(self).loads += 1

        def predict(self, context: object, model_input: object) -> object:
            return model_input

    example = pd.DataFrame({"image": ["aGVsbG8="]})
    client = MlflowClient(mlflow_server.url)
    # as the train step logs: a signature and pinned requirements (inferring either loads too)
    settings = {"input_example": example, "pip_requirements": ["mlflow"],
                "signature": ModelSignature(outputs=Schema([ColSpec("string", "image")]))}
    with step_run("train", **run_kwargs(mlflow_server.url, f"kfp-{uuid.uuid4()}")):
        ours = mlflow_compat.log_python_model(name="ours", python_model=Example(), **settings)
        assert Example.loads == 0
        theirs = mlflow.pyfunc.log_model(name="theirs", python_model=Example(), **settings)
        assert Example.loads == 1  # MLflow's own call does load it back
    assert ours.flavors == theirs.flavors
    assert ours.saved_input_example_info == theirs.saved_input_example_info
    assert ours.signature == theirs.signature
    assert client.get_logged_model(ours.model_id).tags == \
        client.get_logged_model(theirs.model_id).tags
    mlflow.set_tracking_uri(mlflow_server.url)  # step_run restored the previous (unset) URI
    root = Path(mlflow.artifacts.download_artifacts(ours.model_uri, dst_path=str(tmp_path)))
    assert (root / "input_example.json").is_file()
    assert (root / "serving_input_example.json").is_file()


@pytest.mark.mlflow_server
def test_log_model_rejects_bad_input(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    model_dir = save_model_dir(tiny_model(), tmp_path / "model")
    with step_run("train", **run_kwargs(mlflow_server.url, f"kfp-{uuid.uuid4()}")):
        with pytest.raises(FileNotFoundError, match=r"model\.keras"):
            log_model(tmp_path / "nowhere", image_size=16, example_image=example_jpeg(),
                      name="x")
        (model_dir / "classes.json").unlink()
        with pytest.raises(FileNotFoundError, match=r"classes\.json"):
            log_model(model_dir, image_size=16, example_image=example_jpeg(), name="x")
        save_model_dir(tiny_model(), model_dir)
        with pytest.raises(ValueError, match="JPEG or PNG"):
            log_model(model_dir, image_size=16, example_image=b"", name="x")
    with pytest.raises(RuntimeError, match="step_run"):
        log_model(model_dir, image_size=16, example_image=example_jpeg(), name="x")


@pytest.mark.mlflow_server
def test_metrics_link_to_the_logged_model_and_its_dataset(mlflow_server: MlflowServer,
                                                         tmp_path: Path) -> None:
    """What the logged model's page shows: the evaluate metrics, each with its data set."""
    model_dir = save_model_dir(tiny_model(), tmp_path / "model")
    client = MlflowClient(mlflow_server.url)
    kfp_id = f"kfp-{uuid.uuid4()}"
    with step_run("train", **run_kwargs(mlflow_server.url, kfp_id)):
        digest = log_dataset_input("/data/iris-image.zip", SHA, {"counts": {"train": 3}})
        info = log_model(model_dir, image_size=16, example_image=example_jpeg(), name="tiny")
    with step_run("evaluate", **run_kwargs(mlflow_server.url, kfp_id)) as run:
        log_metrics({"accuracy": 0.75, "balanced_accuracy": 0.5}, on_parent=True,
                    model_id=info.model_id, dataset=(tracking_log.DATASET_NAME, digest))
    model = client.get_logged_model(info.model_id)
    linked = {m.key: m for m in model.metrics}
    assert {k: m.value for k, m in linked.items()} == {"accuracy": 0.75, "balanced_accuracy": 0.5}
    for metric in linked.values():
        assert (metric.dataset_name, metric.dataset_digest) == ("iris-image", SHA[:32])
        assert metric.run_id == run.info.run_id  # the parent's copies are not linked
    evaluate = client.get_run(run.info.run_id)
    assert [m.model_id for m in evaluate.inputs.model_inputs] == [info.model_id]
    assert evaluate.data.metrics["accuracy"] == 0.75


# ---------------------------------------------------------------------------------------
# The KFP MLflow plugin's environment
# ---------------------------------------------------------------------------------------
@pytest.mark.mlflow_server
def test_under_plugin_env_steps_nest_under_the_given_run(
        mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"plugin-{uuid.uuid4()}")
    given = client.create_run(experiment_id, run_name="kfp-task").info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", given)

    uri = resolve_tracking_uri(None, tmp_path)
    assert uri == mlflow_server.url
    child_ids = []
    for step in ("train", "evaluate"):
        with step_run(step, tracking_uri=uri, experiment_name="ignored-under-plugin",
                      pipeline_run_id="kfp-plugin-run", pipeline_name="iris-test",
                      params={"epochs": 2}) as run:
            mlflow.log_metric("inside", 1.0)
            child_ids.append(run.info.run_id)
    assert os.environ.get("MLFLOW_RUN_ID") == given, "MLFLOW_RUN_ID must not be consumed"

    runs = client.search_runs([experiment_id])
    assert {r.info.run_id for r in runs} == {given, *child_ids}, "no extra parent created"
    for child_id in child_ids:
        child = client.get_run(child_id)
        assert child.data.tags["mlflow.parentRunId"] == given
        assert child.data.metrics == {"inside": 1.0}
    parent = client.get_run(given)
    assert parent.data.params == {"epochs": "2"}
    assert parent.data.tags["kfp.pipeline_run_id"] == "kfp-plugin-run"
    assert parent.info.status == "RUNNING", "the plugin owns the given run's status"
    assert client.get_experiment_by_name("ignored-under-plugin") is None
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"), "the plugin's experiment opens on training runs too"


@pytest.mark.mlflow_server
def test_plugin_run_id_that_does_not_exist_is_a_clear_error(
        mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    uri = mlflow_server.url
    with (pytest.raises(TrackingServerError, match="MLFLOW_RUN_ID=0123456789abcdef"),
          step_run("train", **run_kwargs(uri, "x"))):
        pass


def test_unresolved_pipeline_run_id_is_rejected(tmp_path: Path) -> None:
    uri = resolve_tracking_uri(None, tmp_path)
    with (pytest.raises(ValueError, match="placeholder"),
          step_run("train", **run_kwargs(uri, "{{$.pipeline_job_uuid}}"))):
        pass


def test_numeric_metrics_keeps_finite_numbers_and_flattens() -> None:
    values = {"a": "text", "b": 2, "ok": True, "nan": float("nan"), "n": {"x": np.float32(0.5)},
              "f1 (iris-setosa)": 1, "matrix": [[1, 2]]}
    assert tracking_log.numeric_metrics(values) == {"b": 2.0, "ok": 1.0, "n.x": 0.5,
                                                "f1 _iris-setosa_": 1.0}


def test_a_train_runs_figures_sort_after_the_sweeps_choice_score() -> None:
    """MLflow's Compare view plots a run's alphabetically first metric: on a trial's run that
    must be ``choice/...`` (logged by the select step), not training ``accuracy``."""
    import dataclasses

    from pipeline.steps.train import TrainResult

    result = TrainResult(**{field.name: 1 for field in dataclasses.fields(TrainResult)})
    names = [*result.metrics(), *(tracking_log.training_metric_name(key) for key in
                                  (*tracking_log.EPOCH_KEYS, "learning_rate"))]
    assert {"train/loss", "val/accuracy", "train/learning_rate", "val/best_loss",
            "train/fit_seconds", "train/backbone_images", "model_val_balanced_accuracy",
            "model_val_accuracy"} <= set(names)
    for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
        for score in (f"model_val_{metric}", f"cv_{metric}"):
            choice = tracking_log.CHOICE_PREFIX + score
            assert min([*names, f"cv_{metric}_ci_low", "serving_ms_per_image", choice]) == choice
