"""The register step's process imports MLflow only: TensorFlow would cost seconds and memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CODE = """
import json, sys
import mlflow
mlflow.set_tracking_uri({uri!r})
mlflow.set_experiment("e")

class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input

with mlflow.start_run():
    uri = mlflow.pyfunc.log_model(name="m", python_model=Echo()).model_uri
assert "tensorflow" not in sys.modules

import numpy as np
from pipeline.lib.params import RegisterParams, TrackingParams
from pipeline.lib.stats import Predictions
from pipeline.steps import register

labels = np.array([0, 1, 1, 0])
Predictions(("a", "b", "c", "d"), labels, labels, np.eye(2)[labels],
            ("x", "y")).write_csv("predictions.csv")
metrics = {{"balanced_accuracy": 0.7, "gate_passed": True, "data_sha256": "d" * 64,
           "split_digest": "s" * 64, "predictions_uri": "runs:/none/predictions.csv"}}
decision = register.run_step(
    {{"mlflow_model_uri": uri}}, metrics, ".",
    RegisterParams(registered_model_name="iris", gate_metric="balanced_accuracy",
                   promotion_margin=0.0),
    TrackingParams(tracking_uri={uri!r}, experiment_name="e", pipeline_run_id="run-1",
                   pipeline_name="iris-image-pipeline"))
print(json.dumps({{"decision": decision["decision"],
                  "tensorflow": "tensorflow" in sys.modules,
                  "keras": "keras" in sys.modules}}))
"""


def test_register_step_registers_without_importing_tensorflow(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-c", CODE.format(uri=uri)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"decision": "champion", "tensorflow": False, "keras": False}
