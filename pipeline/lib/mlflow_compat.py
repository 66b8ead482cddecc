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
"""

from __future__ import annotations

from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

__all__ = ["INVALID_PARAMETER_VALUE", "MLFLOW_MODEL_VERSIONS"]
