"""The MLflow internals the pipeline needs and MLflow offers no public API for.

Kept here, and only here, so an MLflow upgrade that moves them breaks one import that
``tests/test_tracking.py::test_mlflow_internals_are_where_the_adapter_expects`` checks:

- ``MLFLOW_MODEL_VERSIONS``: the logged-model tag through which MLflow's UI lists the
  registry versions of a logged model. ``mlflow.register_model`` sets it; the registry code
  (``pipeline/lib/registry.py``) creates versions with ``MlflowClient.create_model_version``
  (to roll back cleanly) and sets the tag itself.
- ``INVALID_PARAMETER_VALUE``: the error code that makes MLflow's scoring server answer
  HTTP 400 with the message (a bad request) instead of 500. ``MlflowException`` takes it as
  its ``error_code`` and has no public constant for it.
- :func:`log_python_model`: ``mlflow.pyfunc.log_model`` without loading the model back to
  score its input example: ``Model.log``'s undocumented ``validate_serving_input``
  (``tests/test_tracking.py::test_logging_the_model_does_not_load_it_back_and_logs_what_pyfunc_log_model_does``
  fails when it moves).
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
from mlflow.models import Model
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS


class _PyfuncFlavor:
    """``mlflow.pyfunc`` as ``Model.log``'s flavor, minus the serving check's switch (which
    ``Model.log`` reads from the flavor's arguments and ``pyfunc.save_model`` refuses)."""

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs: Any) -> None:
        mlflow.pyfunc.save_model(**kwargs)


def log_python_model(*, name: str, python_model: PythonModel, **kwargs: Any) -> ModelInfo:
    """``mlflow.pyfunc.log_model(name=..., python_model=..., **kwargs)``, minus one step.

    MLflow's own call loads the just-saved model back and scores the input example with it,
    only to log a warning if that fails: for the train step's Keras model, 3 to 5 s of
    loading and tracing on 2 cores, for a check the tests make instead. Same files and
    logged model otherwise.
    """
    return Model.log(artifact_path=None, name=name, flavor=_PyfuncFlavor,
                     python_model=python_model, validate_serving_input=False, **kwargs)


__all__ = ["INVALID_PARAMETER_VALUE", "MLFLOW_MODEL_VERSIONS", "log_python_model"]
