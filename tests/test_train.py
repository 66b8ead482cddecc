"""Real (small) trainings: outputs and export, same-seed determinism, resume after a kill,
the MirroredStrategy path on two logical CPUs with augmentation inside the model."""

from __future__ import annotations

import dataclasses
import json
import signal
import time

import numpy as np
import pytest
import tensorflow as tf
from train_helpers import (
    REFERENCE_OVERRIDES,
    prepared_iris,
    run_python,
    small_train,
    trained_reference,
)

from pipeline.lib import inputs, models, records
from pipeline.lib.contract import CHECKPOINT_ROOT_ENV
from pipeline.steps.train import config_fingerprint, data_identity, train_model

pytestmark = pytest.mark.slow

HISTORY_KEYS = {"epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, iris_zip, mobilenet_weights):
    return tmp_path_factory.mktemp("train")


def _odd_uint8(n: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_training_writes_every_output(root):
    model_dir, summary = trained_reference(root)
    for name in ("model.keras", "classes.json", "history.json", "augmentation_preview.png",
                 "training_summary.json", "saved_model/saved_model.pb", "checkpoints/state.json"):
        assert (model_dir / name).exists(), name
    history = json.loads((model_dir / "history.json").read_text())
    assert len(history) == summary["epochs_run"] == 5
    assert [h["phase"] for h in history] == ["head"] * 4 + ["fine_tune"]
    for entry in history:
        assert set(entry) >= HISTORY_KEYS
        assert 0 <= entry["accuracy"] <= 1 and 0 <= entry["val_accuracy"] <= 1
        assert entry["loss"] > 0
    assert history[-1]["learning_rate"] == pytest.approx(1e-4)
    assert history[0]["learning_rate"] == pytest.approx(1e-3)
    assert summary["devices"] and summary["train_seconds"] > 0
    assert 1 <= summary["best_epoch"] <= 5
    assert json.loads((model_dir / "classes.json").read_text()) == summary["classes"]
    assert not list(model_dir.glob(".tmp*"))


def test_exported_models_take_uint8_of_odd_sizes(root):
    model_dir, _ = trained_reference(root)
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


def test_same_seed_gives_same_training(root):
    reference_dir, reference = trained_reference(root)
    again = train_model(prepared_iris(root), root / "again", small_train(**REFERENCE_OVERRIDES))
    for a, b in zip(reference["history"], again["history"], strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    images = _odd_uint8(4, 64, 64)
    np.testing.assert_allclose(
        models.load_model(reference_dir).predict(images, verbose=0),
        models.load_model(root / "again").predict(images, verbose=0), rtol=1e-5, atol=1e-6)


def _train_and_kill(data_dir, model_dir, state_file, env=None) -> list[dict]:
    """Start the reference training in a subprocess, SIGKILL it after two finished epochs;
    returns the checkpointed history."""
    config = json.dumps(small_train(**REFERENCE_OVERRIDES).to_dict())
    code = (
        "import json; from pipeline.lib.params import TrainParams; "
        "from pipeline.steps.train import train_model; "
        f"train_model({str(data_dir)!r}, {str(model_dir)!r}, "
        f"TrainParams.from_mapping(json.loads({config!r})))"
    )
    process = run_python(code, wait=False, env=env)
    finished = 0
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if state_file.is_file():
                try:
                    finished = len(json.loads(state_file.read_text())["history"])
                except ValueError:
                    finished = 0
                if finished >= 2:
                    process.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    before = json.loads(state_file.read_text())["history"]
    assert 2 <= len(before) < 5
    assert not (model_dir / "model.keras").exists()
    return before


def test_resume_after_kill_continues_from_last_finished_epoch(root):
    _, reference = trained_reference(root)
    data_dir = prepared_iris(root)
    model_dir = root / "killed"
    before = _train_and_kill(data_dir, model_dir, model_dir / "checkpoints" / "state.json")

    summary = train_model(data_dir, model_dir, small_train(**REFERENCE_OVERRIDES))
    assert summary["resumed_from_epoch"] == len(before)
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4, 5]
    assert summary["history"][: len(before)] == before  # finished epochs were not re-run
    # it continued from the checkpoint instead of starting over: its first new epoch is
    # closer to the uninterrupted run's same epoch than to a fresh run's first epoch
    # (not bit-identical: dropout's random state is not part of the checkpoint)
    k = len(before)
    resumed_val = summary["history"][k]["val_loss"]
    reference_val = reference["history"][k]["val_loss"]
    fresh_val = reference["history"][0]["val_loss"]
    assert abs(resumed_val - reference_val) < abs(fresh_val - reference_val)
    assert (model_dir / "model.keras").is_file()


def test_a_rerun_in_a_new_model_folder_resumes_from_the_shared_checkpoint_root(
        root, monkeypatch):
    data_dir = prepared_iris(root)
    checkpoint_root = root / "checkpoint-root"
    fingerprint = config_fingerprint(small_train(**REFERENCE_OVERRIDES),
                                     records.load_classes(data_dir), data_identity(data_dir))
    before = _train_and_kill(data_dir, root / "crashed", checkpoint_root / fingerprint
                             / "state.json", env={CHECKPOINT_ROOT_ENV: str(checkpoint_root)})
    assert not (root / "crashed" / "checkpoints").exists()

    monkeypatch.setenv(CHECKPOINT_ROOT_ENV, str(checkpoint_root))
    summary = train_model(data_dir, root / "rerun", small_train(**REFERENCE_OVERRIDES))
    assert summary["resumed_from_epoch"] == len(before)
    assert summary["history"][: len(before)] == before
    assert (root / "rerun" / "model.keras").is_file()
    assert not (checkpoint_root / fingerprint).exists()  # finished: nothing left to resume


def test_checkpoints_of_another_run_are_refused(root):
    model_dir, _ = trained_reference(root)
    with pytest.raises(ValueError, match="different training run"):
        train_model(prepared_iris(root), model_dir, small_train(seed=7, **REFERENCE_OVERRIDES))


def test_head_on_cached_features_is_exported_exactly(root):
    """The logistic head (standardization folded into Dense) scores the same in the export."""
    data_dir = prepared_iris(root)
    model_dir = root / "feature-head"
    summary = train_model(data_dir, model_dir,
                          small_train(head_feature_views=2, fine_tune_epochs=0, head_c=0.01))
    assert summary["head_training"] == "features"
    assert [h["phase"] for h in summary["history"]] == ["head"]
    head = summary["history"][0]
    assert set(head) >= HISTORY_KEYS and head["loss"] > 0
    images, labels = [], []
    for image, label in inputs.load_examples(data_dir, "val", 64, cache=False):
        images.append(image.numpy())
        labels.append(int(label))
    probabilities = np.asarray(models.load_model(model_dir).predict(np.stack(images), verbose=0))
    labels = np.array(labels)
    assert np.mean(probabilities.argmax(axis=1) == labels) == pytest.approx(head["val_accuracy"])
    val_loss = -np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1)))
    assert val_loss == pytest.approx(head["val_loss"], rel=1e-3)
    assert (model_dir / "saved_model" / "saved_model.pb").is_file()


def test_missing_data_set_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared data set"):
        train_model(tmp_path / "nothing", tmp_path / "model", small_train())


def test_mirrored_strategy_on_two_logical_cpus_with_augmentation_in_model(root):
    data_dir = prepared_iris(root)
    config = json.dumps(small_train(epochs=1, fine_tune_epochs=0, batch_size=16,
                                     augment_placement="model").to_dict())
    code = f"""
import json, logging
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
logging.basicConfig(level=logging.INFO)
from pipeline.lib.params import TrainParams
from pipeline.steps.train import config_fingerprint, train_model
summary = train_model({str(data_dir)!r}, {str(root / "mirrored")!r},
                      TrainParams.from_mapping(json.loads({config!r})))
print("SUMMARY " + json.dumps({{k: summary[k] for k in
      ("replicas", "strategy", "devices", "augmentation_in", "epochs_run")}}))
"""
    result = run_python(code, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("SUMMARY "))
    summary = json.loads(line[len("SUMMARY "):])
    assert summary["replicas"] == 2 and summary["strategy"] == "MirroredStrategy"
    assert len(summary["devices"]) == 2 and summary["augmentation_in"] == "model"
    assert summary["epochs_run"] == 1
    assert "training mobilenet on /device:CPU:0, /device:CPU:1" in result.stderr
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
