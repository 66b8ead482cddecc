"""Fast checks of training's promises on a tiny model and a few generated images: the export
averages the test-time views, class weights reach the loss, early stopping ends a phase and
its best epoch's weights are what is exported, and the checkpoint lock never outlives a
failed training. (The slow tests in ``test_train.py`` check the same on the real data.)"""

from __future__ import annotations

from pathlib import Path

import filelock
import numpy as np
import pytest

from pipeline.lib import inputs, models
from pipeline.lib.contract import CHECKPOINT_ROOT_ENV
from pipeline.lib.feature_cache import CACHE_ROOT_ENV
from pipeline.lib.feature_head import probabilities_from_features
from pipeline.lib.training import split_scores
from pipeline.steps import train
from pipeline.steps.train import TrainResult, train_model
from tests.support.train_helpers import read_history, tiny_prepared_data, tiny_train

#: Overfits noise within a few epochs (high learning rate, almost no L2): early stopping fires.
STOPPING = {"epochs": 40, "learning_rate": 0.5, "head_c": 10_000.0,
            "early_stopping_patience": 2, "tta_views": 8}
#: The tiny trainings' shared feature cache, beside their data.
FEATURES = "features"
#: numpy versions of the 8 dihedral views (``DihedralView`` indices 0..7).
VIEWS = [lambda x, i=i: _view(x, i) for i in range(8)]


def _view(images: np.ndarray, index: int) -> np.ndarray:
    if index & 4:
        images = images.transpose(0, 2, 1, 3)
    if index & 2:
        images = images[:, ::-1]
    if index & 1:
        images = images[:, :, ::-1]
    return np.ascontiguousarray(images)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, TrainResult]:
    """The tiny data set and one early-stopped training on it (8 test-time views)."""
    root = tmp_path_factory.mktemp("tiny")
    data_dir = tiny_prepared_data(root)
    with pytest.MonkeyPatch.context() as patch:  # features a later training here can reuse
        patch.setenv(CACHE_ROOT_ENV, str(root / FEATURES))
        result = train_model(data_dir, root / "model", tiny_train(**STOPPING))
    return data_dir, root / "model", result


def _val_set(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(image.numpy(), int(label))
             for image, label in inputs.load_examples(data_dir, "val", 32, cache=False)]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def test_the_export_averages_the_test_time_views_of_the_trained_model(tiny):
    _, model_dir, _ = tiny
    exported = models.load_model(model_dir)
    core = exported.get_layer("mobilenet_classifier")
    images = np.random.default_rng(3).integers(0, 256, (2, 41, 29, 3)).astype(np.float32)
    expected = np.mean([np.asarray(core(view(images), training=False)) for view in VIEWS],
                       axis=0)
    got = np.asarray(exported(images, training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(got, np.asarray(core(images, training=False)), atol=1e-4)


def test_early_stopping_ends_the_phase_and_the_best_epoch_is_exported(tiny):
    data_dir, model_dir, result = tiny
    history = read_history(model_dir)
    assert len(history) == result.epochs_run < STOPPING["epochs"]
    best = result.best_epoch
    assert best == min(history, key=lambda h: h["val_loss"])["epoch"]
    assert history[-1]["epoch"] - best == STOPPING["early_stopping_patience"]
    assert history[-1]["val_loss"] > 1.05 * history[best - 1]["val_loss"]
    # the exported model (without its views) scores the best epoch's val_loss, not the last's
    images, labels = _val_set(data_dir)
    core = models.load_model(model_dir).get_layer("mobilenet_classifier")
    probabilities = np.asarray(core(images.astype(np.float32), training=False))
    loss = -np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1)))
    assert loss == pytest.approx(history[best - 1]["val_loss"], rel=2e-3)


def test_class_weights_reach_the_loss(tiny, tmp_path, monkeypatch):
    data_dir, model_dir, weighted = tiny
    monkeypatch.setenv(CACHE_ROOT_ENV, str(model_dir.parent / FEATURES))  # same features
    labels = inputs.read_labels(data_dir, "train")
    counts = np.bincount(labels, minlength=3)
    assert len(set(counts.tolist())) > 1  # imbalanced, so weighting changes the loss
    assert weighted.class_weights == pytest.approx(
        {c: len(labels) / (3 * n) for c, n in zip(weighted.classes, counts, strict=True)})
    unweighted = train_model(data_dir, tmp_path / "unweighted",
                             tiny_train(**{**STOPPING, "epochs": 1, "tta_views": 0},
                                        class_weights=False))
    assert unweighted.class_weights == {}
    # same data, seed and batches: only the loss weighting differs
    assert read_history(tmp_path / "unweighted")[0]["loss"] != pytest.approx(
        read_history(model_dir)[0]["loss"], rel=1e-3)


def test_the_checkpoint_lock_is_released_when_training_raises(tmp_path, monkeypatch):
    data_dir = tiny_prepared_data(tmp_path)
    root = tmp_path / "checkpoints"
    monkeypatch.setenv(CHECKPOINT_ROOT_ENV, str(root))

    def broken(run):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train, "_build", broken)
    with pytest.raises(RuntimeError, match="out of memory") as raised:
        train_model(data_dir, tmp_path / "model", tiny_train())
    (lock_file,) = root.glob("*.lock")
    assert raised.traceback  # the failed training's frames are still alive here
    lock = filelock.FileLock(lock_file)
    lock.acquire(timeout=0)  # raises filelock.Timeout while the failed run still holds it
    lock.release()


def test_validation_scores_from_features_are_the_exported_models(tiny):
    """The val scores come from cached features, and they are the exported model's numbers."""
    data_dir, model_dir, result = tiny
    exported = models.load_model(model_dir)
    images, labels = _val_set(data_dir)
    from_model = np.asarray(exported(images.astype(np.float32), training=False))
    core = exported.get_layer("mobilenet_classifier")
    config = tiny_train(**STOPPING)
    from_features, feature_labels, _ = probabilities_from_features(core, data_dir, "val",
                                                                   config, None)
    np.testing.assert_array_equal(feature_labels, labels)
    np.testing.assert_allclose(from_features, from_model, rtol=1e-4, atol=1e-6)
    expected = split_scores(exported, data_dir, "val", config)
    assert {k: getattr(result, f"model_val_{k}") for k in expected} == pytest.approx(expected)
