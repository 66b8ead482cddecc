"""Shared fixtures: the real data set and ImageNet weights in ../shared/data (never downloaded)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.diskfull import full_disk  # noqa: F401 (fixture)
from tests.support.kfp_stack import cheap_kfp_stack  # noqa: F401 (autouse fixture)
from tests.support.mlflow_server import (  # noqa: F401 (fixtures)
    clean_mlflow_state,
    closed_port_uri,
    forwarded_server,
    isolated_mlflow_globals,
    mlflow_server,
    new_sqlite_store,
    ram_tmp_path,
    ram_tmp_root,
)
from tests.support.paths import IRIS_ZIP, MOBILENET_V2_WEIGHTS, MOBILENET_WEIGHTS

# TensorFlow is chatty and slow to pick threads; keep test logs readable.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def iris_zip() -> Path:
    if not IRIS_ZIP.is_file():
        pytest.fail(f"shared data set missing: {IRIS_ZIP} (see ../shared/data/README.md)")
    return IRIS_ZIP


@pytest.fixture(scope="session")
def iris_data(tmp_path_factory: pytest.TempPathFactory, iris_zip: Path) -> Path:
    """The shared archive prepared with the default split, built once per test session."""
    from pipeline.config import PipelineConfig
    from pipeline.lib.params import PreprocessParams
    from pipeline.steps.preprocess import prepare_dataset

    out = tmp_path_factory.mktemp("iris") / "prepared"
    prepare_dataset(iris_zip, out, PipelineConfig().params_for(PreprocessParams))
    return out


@pytest.fixture(scope="session")
def reference_model(tmp_path_factory: pytest.TempPathFactory, iris_data: Path,
                    mobilenet_weights: Path) -> tuple[Path, dict]:
    """One real short training on the prepared iris set, shared by the test modules."""
    from pipeline.steps.train import train_model
    from tests.support.train_helpers import REFERENCE_OVERRIDES, small_train

    model_dir = tmp_path_factory.mktemp("reference") / "model"
    return model_dir, train_model(iris_data, model_dir, small_train(**REFERENCE_OVERRIDES))


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    if not MOBILENET_WEIGHTS.is_file():
        pytest.fail(f"shared MobileNet weights missing: {MOBILENET_WEIGHTS}")
    return MOBILENET_WEIGHTS


@pytest.fixture(scope="session")
def mobilenet_v2_weights() -> Path:
    if not MOBILENET_V2_WEIGHTS.is_file():
        pytest.fail(f"shared MobileNetV2 weights missing: {MOBILENET_V2_WEIGHTS}")
    return MOBILENET_V2_WEIGHTS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from tests.support.scheduling import check_server_modules, order_by_unit

    check_server_modules(items)
    if hasattr(config, "workerinput"):  # an xdist worker: the order the controller queues
        order_by_unit(items)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[object]:
    """Collect with the garbage collector off, then freeze what collection imported.

    Collection imports TensorFlow, Keras and MLflow in every xdist worker; the collector
    walked those millions of objects again and again while they were being created, and
    later for every full collection while the tests ran. Off and frozen, the fast tier took
    about 11 s less CPU (172 and 173 s of user time against 182 and 185 s, alternating).
    """
    gc.disable()
    try:
        return (yield)
    finally:
        gc.enable()
        gc.freeze()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Freeze the heap once the session is over, as the step processes do
    (``pipeline/lib/progress.py``): the interpreter's last garbage collections then skip the
    TensorFlow and MLflow objects a test process piled up. They took about 10 s of a core per
    xdist worker at exit; the fast tier ended 16 s sooner on 2 cores."""
    gc.freeze()


@pytest.hookimpl(optionalhook=True)  # the xdist hooks: absent under -p no:xdist
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: one worker more than the cores (``tests/support/scheduling.py``);
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides when set (xdist's own hook reads it)."""
    from tests.support.scheduling import worker_count

    return None if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") else worker_count()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from tests.support.scheduling import make_scheduler

    return make_scheduler(config, log)
