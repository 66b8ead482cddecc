"""Real (small) trainings: outputs and export, same-seed determinism, resume after a kill,
the MirroredStrategy path on two logical CPUs with augmentation inside the model, and the
default head path (Keras epochs on cached features): early stopping, best-weights restore,
class weights, MLflow curves and exact resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from pipeline.lib import inputs, models, records
from pipeline.lib.contract import CHECKPOINT_ROOT_ENV
from pipeline.lib.model_logging import MlflowEpochLogger
from pipeline.lib.training import config_fingerprint, data_identity
from pipeline.steps.train import train_model
from tests.support.train_helpers import (
    REFERENCE_OVERRIDES,
    kill_training_after,
    read_history,
    run_python,
    small_train,
)

pytestmark = pytest.mark.slow

HISTORY_KEYS = {"epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, iris_zip, mobilenet_weights):
    return tmp_path_factory.mktemp("train")


def _odd_uint8(n: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_training_writes_every_output(root, reference_model):
    model_dir, summary = reference_model
    for name in ("model.keras", "classes.json", "history.json", "augmentation_preview.png",
                 "training_summary.json", "saved_model/saved_model.pb", "checkpoints/state.json"):
        assert (model_dir / name).exists(), name
    history = json.loads((model_dir / "history.json").read_text())
    assert len(history) == summary.epochs_run == 5
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["phase_epoch"] for h in history] == [1, 2, 3, 4, 1]
    assert [h["phase"] for h in history] == ["head"] * 4 + ["fine_tune"]
    for entry in history:
        assert set(entry) >= HISTORY_KEYS
        assert 0 <= entry["accuracy"] <= 1 and 0 <= entry["val_accuracy"] <= 1
        assert entry["loss"] > 0
    assert history[-1]["learning_rate"] == pytest.approx(1e-4)
    assert history[0]["learning_rate"] == pytest.approx(1e-3)
    assert summary.devices and summary.fit_seconds > 0
    # one phase of fine-tuning: its only epoch is the best; the head's best is its lowest
    head = [h for h in history if h["phase"] == "head"]
    assert summary.phase_best_epochs == (
        min(head, key=lambda h: h["val_loss"])["epoch"], 5)
    assert summary.best_val_loss == history[-1]["val_loss"]
    assert json.loads((model_dir / "classes.json").read_text()) == list(summary.classes)
    assert not list(model_dir.glob(".tmp*"))


def test_exported_models_take_uint8_of_odd_sizes(root, reference_model):
    model_dir, _ = reference_model
    keras_model = models.load_model(model_dir)
    serving = tf.saved_model.load(str(model_dir / "saved_model")).signatures["serving_default"]
    spec = serving.structured_input_signature[1]["images"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, None, 3]
    for shape in [(2, 57, 91), (1, 200, 33)]:
        images = _odd_uint8(*shape)
        from_keras = np.asarray(keras_model.predict(images, verbose=0))
        from_saved = serving(images=tf.constant(images))["probabilities"].numpy()
        assert from_keras.shape == from_saved.shape == (shape[0], 3)
        np.testing.assert_allclose(from_saved, from_keras, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(from_saved.sum(axis=1), 1.0, rtol=1e-5)


def test_same_seed_gives_same_training(root, iris_data, reference_model):
    reference_dir, _ = reference_model
    train_model(iris_data, root / "again", small_train(**REFERENCE_OVERRIDES))
    for a, b in zip(read_history(reference_dir), read_history(root / "again"), strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    images = _odd_uint8(4, 64, 64)
    np.testing.assert_allclose(
        models.load_model(reference_dir).predict(images, verbose=0),
        models.load_model(root / "again").predict(images, verbose=0), rtol=1e-5, atol=1e-6)


def test_resume_after_kill_continues_from_last_finished_epoch(root, iris_data, reference_model):
    reference_dir, _ = reference_model
    reference = read_history(reference_dir)
    data_dir = iris_data
    model_dir = root / "killed"
    before = kill_training_after(iris_data, model_dir, REFERENCE_OVERRIDES, epoch=2)
    assert len(before) == 2

    summary = train_model(data_dir, model_dir, small_train(**REFERENCE_OVERRIDES))
    assert summary.resumed_from_epoch == len(before)
    assert [h["epoch"] for h in read_history(model_dir)] == [1, 2, 3, 4, 5]
    assert read_history(model_dir)[: len(before)] == before  # finished epochs were not re-run
    # it continued from the checkpoint instead of starting over: its first new epoch is
    # closer to the uninterrupted run's same epoch than to a fresh run's first epoch
    # (not bit-identical: dropout's random state is not part of the checkpoint)
    k = len(before)
    resumed_val = read_history(model_dir)[k]["val_loss"]
    reference_val = reference[k]["val_loss"]
    fresh_val = reference[0]["val_loss"]
    assert abs(resumed_val - reference_val) < abs(fresh_val - reference_val)
    assert (model_dir / "model.keras").is_file()


def test_a_rerun_in_a_new_model_folder_resumes_from_the_shared_checkpoint_root(
        root, iris_data, monkeypatch):
    checkpoint_root = root / "checkpoint-root"
    fingerprint = config_fingerprint(small_train(**REFERENCE_OVERRIDES),
                                     records.load_classes(iris_data), data_identity(iris_data))
    before = kill_training_after(iris_data, root / "crashed", REFERENCE_OVERRIDES, epoch=2,
                                 state_file=checkpoint_root / fingerprint / "state.json",
                                 env={CHECKPOINT_ROOT_ENV: str(checkpoint_root)})
    assert not (root / "crashed" / "checkpoints").exists()

    monkeypatch.setenv(CHECKPOINT_ROOT_ENV, str(checkpoint_root))
    summary = train_model(iris_data, root / "rerun", small_train(**REFERENCE_OVERRIDES))
    assert summary.resumed_from_epoch == len(before)
    assert read_history(root / "rerun")[: len(before)] == before
    assert (root / "rerun" / "model.keras").is_file()
    assert not (checkpoint_root / fingerprint).exists()  # finished: nothing left to resume


def test_checkpoints_of_another_run_are_refused(root, iris_data, reference_model):
    model_dir, _ = reference_model
    with pytest.raises(ValueError, match="different training run"):
        train_model(iris_data, model_dir, small_train(seed=7, **REFERENCE_OVERRIDES))


# --- the default head path: Keras epochs on cached backbone features ------------------------
#: Feature head that overfits within a few epochs (high learning rate, almost no L2), so early
#: stopping fires and the last epoch is clearly worse than the best one.
FEATURE_OVERRIDES: dict[str, object] = {
    "head_feature_views": 2, "fine_tune_epochs": 0, "epochs": 60, "learning_rate": 0.02,
    "head_c": 10_000.0, "early_stopping_patience": 3,
}


@pytest.fixture(scope="module")
def feature_run(root, iris_data) -> tuple[Path, dict, MlflowClient, str]:
    """The feature-head run, its epochs logged to a local MLflow store as the component does."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("train-tests", artifact_location=str(root / "mlruns"))
    run_id = client.create_run(experiment).info.run_id
    model_dir = root / "feature-head"
    summary = train_model(iris_data, model_dir, small_train(**FEATURE_OVERRIDES),
                          callbacks=[MlflowEpochLogger(run_id=run_id, client=client)])
    return model_dir, summary, client, run_id


def _val_set(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for image, label in inputs.load_examples(data_dir, "val", 64, cache=False):
        images.append(image.numpy())
        labels.append(int(label))
    return np.stack(images), np.array(labels)


def _cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels],
                                         1e-7, 1))))


def test_feature_head_trains_epochs_and_stops_early(feature_run):
    model_dir, summary, *_ = feature_run
    history = read_history(model_dir)
    assert summary.head_training == "features"
    assert summary.head_feature_rows == 3 * summary.train_examples  # images + 2 views
    assert {h["phase"] for h in history} == {"head"}
    for entry in history:
        assert set(entry) >= HISTORY_KEYS
        assert entry["learning_rate"] == pytest.approx(0.02)
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    # stopped by early stopping: exactly `patience` epochs after the best, none of them better
    assert 5 <= len(history) < 60
    best = summary.best_epoch
    assert best == min(history, key=lambda h: h["val_loss"])["epoch"]
    assert history[-1]["epoch"] - best == 3
    assert summary.best_val_loss == history[best - 1]["val_loss"]


def test_feature_head_epochs_are_mlflow_curves_with_1_based_steps(feature_run):
    model_dir, _, client, run_id = feature_run
    history = read_history(model_dir)
    # the Keras names grouped in MLflow: train/loss, train/accuracy, val/loss, val/accuracy
    for key, name in (("loss", "train/loss"), ("accuracy", "train/accuracy"),
                      ("val_loss", "val/loss"), ("val_accuracy", "val/accuracy")):
        points = sorted(client.get_metric_history(run_id, name), key=lambda p: p.step)
        assert [p.step for p in points] == [h["epoch"] for h in history], key
        assert [p.value for p in points] == pytest.approx([h[key] for h in history]), key
    # a constant learning rate is the param only: as a metric it would plot at zero
    assert client.get_metric_history(run_id, "train/learning_rate") == []


def test_feature_head_exports_the_best_epoch_not_the_last(root, feature_run, iris_data):
    """The exported model scores the best epoch's validation loss (standardization folded in)."""
    model_dir, summary, *_ = feature_run
    best = read_history(model_dir)[summary.best_epoch - 1]
    last = read_history(model_dir)[-1]
    assert last["val_loss"] > 1.1 * best["val_loss"]  # restoring makes a visible difference
    images, labels = _val_set(iris_data)
    probabilities = np.asarray(models.load_model(model_dir).predict(images, verbose=0))
    # val_loss includes the (here negligible) L2 penalty
    assert _cross_entropy(probabilities, labels) == pytest.approx(best["val_loss"], rel=2e-3)
    assert np.mean(probabilities.argmax(axis=1) == labels) == pytest.approx(best["val_accuracy"])
    saved = tf.saved_model.load(str(model_dir / "saved_model")).signatures["serving_default"]
    served = saved(images=tf.constant(images.astype(np.uint8)))["probabilities"].numpy()
    np.testing.assert_allclose(served, probabilities, rtol=1e-4, atol=1e-5)


def test_class_weights_are_inverse_frequency_and_change_training(root, feature_run, iris_data):
    _, weighted, *_ = feature_run
    data_dir = iris_data
    labels = inputs.read_labels(data_dir, "train")
    counts = {c: int((labels == i).sum()) for i, c in enumerate(weighted.classes)}
    assert len(set(counts.values())) > 1  # the iris split is imbalanced
    expected = {c: len(labels) / (3 * n) for c, n in counts.items()}
    assert weighted.class_weights == pytest.approx(expected)
    unweighted = train_model(data_dir, root / "unweighted",
                             small_train(**{**FEATURE_OVERRIDES, "epochs": 1},
                                          class_weights=False))
    assert unweighted.class_weights == {}
    # same data, seed and batches: only the loss weighting differs
    assert read_history(root / "unweighted")[0]["loss"] != pytest.approx(
        read_history(feature_run[0])[0]["loss"], rel=1e-3)


def test_feature_head_resumes_after_kill_exactly(root, feature_run, iris_data):
    """Killed after epoch 3, it continues with the same batches, optimizer state and early
    stopping counters, so it ends exactly as the uninterrupted run."""
    reference = read_history(feature_run[0])
    model_dir = root / "feature-killed"
    before = kill_training_after(iris_data, model_dir, FEATURE_OVERRIDES, epoch=3)
    assert [h["epoch"] for h in before] == [1, 2, 3]
    summary = train_model(iris_data, model_dir, small_train(**FEATURE_OVERRIDES))
    assert summary.resumed_from_epoch == 3
    assert read_history(model_dir)[:3] == before
    assert len(read_history(model_dir)) == len(reference)
    for a, b in zip(read_history(model_dir), reference, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["epoch"], key)
    assert summary.best_epoch == feature_run[1].best_epoch


def test_finished_run_killed_before_export_exports_trained_weights(root, feature_run, iris_data):
    """A run killed after its last epoch but before the export exports the trained model."""
    model_dir, summary, *_ = feature_run
    history = read_history(model_dir)
    images, _ = _val_set(iris_data)
    expected = models.load_model(model_dir).predict(images, verbose=0)
    (model_dir / "model.keras").unlink()
    again = train_model(iris_data, model_dir, small_train(**FEATURE_OVERRIDES))
    assert again.epochs_run == summary.epochs_run and read_history(model_dir) == history
    np.testing.assert_allclose(models.load_model(model_dir).predict(images, verbose=0),
                               expected, rtol=1e-5, atol=1e-6)


def test_other_backbone_trains_and_exports_test_time_views(root, mobilenet_v2_weights,
                                                          iris_data):
    """MobileNetV2 (shared file) through the feature head and fine-tuning; the export, and only
    the export, averages the flips (the head's val_accuracy is that of the plain model)."""
    data_dir = iris_data
    model_dir = root / "mobilenet-v2-tta"
    config = small_train(backbone="mobilenet_v2", alpha=0.5, weights=str(mobilenet_v2_weights),
                          head_feature_views=1, fine_tune_epochs=1, tta_views=4)
    summary = train_model(data_dir, model_dir, config)
    assert summary.head_training == "features"
    phases = [h["phase"] for h in read_history(model_dir)]
    assert phases[-1] == "fine_tune" and set(phases) == {"head", "fine_tune"}
    exported = models.load_model(model_dir)
    assert [layer.views for layer in exported.layers
            if isinstance(layer, models.ViewStack)] == [4]
    core = exported.get_layer("mobilenet_v2_classifier")
    images = _odd_uint8(2, 57, 91)
    flips = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    expected = np.mean([np.asarray(core(np.ascontiguousarray(f), training=False))
                        for f in flips], axis=0)
    np.testing.assert_allclose(np.asarray(exported.predict(images, verbose=0)), expected,
                               rtol=1e-4, atol=1e-5)


def test_missing_data_set_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared data set"):
        train_model(tmp_path / "nothing", tmp_path / "model", small_train())


def test_mirrored_strategy_on_two_logical_cpus_with_augmentation_in_model(root, iris_data):
    data_dir = iris_data
    config = json.dumps(small_train(epochs=1, fine_tune_epochs=0, batch_size=16,
                                     augment_placement="model").to_dict())
    code = f"""
import json, logging
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
logging.basicConfig(level=logging.INFO)
from pipeline.lib.params import TrainParams
from pipeline.steps.train import train_model
summary = train_model({str(data_dir)!r}, {str(root / "mirrored")!r},
                      TrainParams.from_mapping(json.loads({config!r})))
print("SUMMARY " + json.dumps({{k: getattr(summary, k) for k in
      ("replicas", "strategy", "devices", "augmentation_in", "epochs_run")}}))
"""
    result = run_python(code, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("SUMMARY "))
    summary = json.loads(line[len("SUMMARY "):])
    assert summary["replicas"] == 2 and summary["strategy"] == "MirroredStrategy"
    assert len(summary["devices"]) == 2 and summary["augmentation_in"] == "model"
    assert summary["epochs_run"] == 1
    assert "training mobilenet-a0_25-64px on /device:CPU:0, /device:CPU:1" in result.stderr
    assert (root / "mirrored" / "saved_model" / "saved_model.pb").is_file()


def test_settings_outside_training_do_not_block_resuming_but_the_data_does() -> None:
    """The fingerprint keys on what is trained and on which data (split digests), nothing else."""
    classes = ["a", "b"]
    data = {"sha256": "f" * 64, "splits": {"train": "1", "val": "2", "test": "3"}}
    params = small_train()
    base = config_fingerprint(params, classes, data)
    assert config_fingerprint(dataclasses.replace(params, xla=True, weights="none"), classes,
                              data) == base
    assert config_fingerprint(dataclasses.replace(params, epochs=9), classes, data) != base
    other_split = {**data, "splits": {**data["splits"], "test": "4"}}
    assert config_fingerprint(params, classes, other_split) != base
