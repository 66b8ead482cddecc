"""Helpers for the training/evaluation tests: small configs and a training killed mid-way.

The shared prepared data set and reference model are session fixtures (``conftest.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.lib.params import EvaluateParams, TrainParams
from tests.support.paths import IRIS_ZIP, MOBILENET_WEIGHTS, PROJECT_ROOT


def small_config(**overrides: object) -> PipelineConfig:
    """A fast but real training config: MobileNet-0.25 with the shared ImageNet weights, 64 px."""
    base = PipelineConfig(
        data_source=str(IRIS_ZIP),
        backbone="mobilenet",
        alpha=0.25,
        tta_views=0,
        weights=str(MOBILENET_WEIGHTS),
        image_size=64,
        batch_size=32,
        epochs=2,
        fine_tune_epochs=1,
        fine_tune_learning_rate=1e-4,
        early_stopping_patience=0,
        head_feature_views=0,  # epoch-by-epoch head (history, resume); feature head: own test
    )
    return dataclasses.replace(base, **overrides)


def small_train(**overrides: object) -> TrainParams:
    """:func:`small_config`'s training params (what the train step and its libraries take)."""
    return small_config(**overrides).params_for(TrainParams)


def small_eval(**overrides: object) -> EvaluateParams:
    """:func:`small_config`'s evaluation params."""
    return small_config(**overrides).params_for(EvaluateParams)


def tiny_prepared_data(root: Path, counts: dict[str, int] | None = None) -> Path:
    """A prepared data set of a few generated noise images per class (fast trainings)."""
    from pipeline.lib.params import PreprocessParams
    from pipeline.steps.preprocess import prepare_dataset
    from tests.support.imagegen import write_class_folders

    folder = write_class_folders(root / "raw", counts or {"a": 12, "b": 6, "c": 6})
    params = PipelineConfig(min_image_side=16, min_images_per_class=3,
                            val_fraction=0.25, test_fraction=0.15).params_for(PreprocessParams)
    prepare_dataset(folder, root / "prepared", params)
    return root / "prepared"


def tiny_train(**overrides: object) -> TrainParams:
    """A tiny transfer model (MobileNet-0.25 with the shared weights, 32 px) on the feature
    head (random weights would give every image the same features)."""
    return small_train(**{"image_size": 32, "batch_size": 8,
                          "head_feature_views": 1, "fine_tune_epochs": 0, "epochs": 3,
                          **overrides})


def read_history(model_dir: Path) -> list[dict]:
    """The per-epoch history a training wrote to its model folder."""
    return json.loads((Path(model_dir) / "history.json").read_text())


def run_python(code: str, *, timeout: float = 300, env: dict[str, str] | None = None,
               wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run ``code`` in a fresh interpreter from the project root (own TF runtime and devices)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(PROJECT_ROOT),
                **(env or {})}
    command = [sys.executable, "-c", code]
    if not wait:
        return subprocess.Popen(command, cwd=PROJECT_ROOT, env=full_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(command, cwd=PROJECT_ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def kill_training_after(data_dir: Path, model_dir: Path, overrides: dict[str, object], *,
                        epoch: int, state_file: Path | None = None,
                        env: dict[str, str] | None = None) -> list[dict]:
    """Train in a fresh process that is SIGKILLed right after epoch ``epoch`` is checkpointed.

    The kill comes from a callback that runs after the step's own checkpoint callback, so it
    lands at a known epoch; returns the checkpointed history (what a restart resumes from).
    ``state_file``: where the checkpoints are (default: in the model folder); ``env`` for the
    training process.
    """
    state_file = state_file or model_dir / "checkpoints" / "state.json"
    config = json.dumps(small_train(**overrides).to_dict())
    code = f"""
import json, os, signal
import keras
from pipeline.lib.params import TrainParams
from pipeline.steps.train import train_model

class Kill(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        with open({str(state_file)!r}) as f:
            if len(json.load(f)["history"]) >= {epoch}:
                os.kill(os.getpid(), signal.SIGKILL)

train_model({str(data_dir)!r}, {str(model_dir)!r},
            TrainParams.from_mapping(json.loads({config!r})), callbacks=[Kill()])
"""
    result = run_python(code, timeout=300, env=env)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert not (model_dir / "model.keras").exists()
    return json.loads(state_file.read_text())["history"]


#: The config of the shared reference run (5 epochs: 4 head + 1 fine-tune, no early stop).
REFERENCE_OVERRIDES: dict[str, object] = {"epochs": 4, "fine_tune_epochs": 1}
