"""Runners of the one DAG: locally with kfp.local, compiled to IR YAML, or submitted to KFP.

``local`` runs and verifies a local run (``run_files`` reads the status files its steps leave),
``summary`` turns it into the ``--summary`` JSON, ``cluster`` compiles and submits.
"""

from pipeline.runners.cluster import (
    DEFAULT_PACKAGE,
    DEFAULT_WAIT_TIMEOUT_S,
    SubmitResult,
    compile_pipeline,
    submit_pipeline,
)
from pipeline.runners.local import DEFAULT_OUTPUT_DIR, LocalRunResult, StepFailedError, run_local
from pipeline.runners.summary import build_summary, failure_summary

__all__ = [
    "DEFAULT_OUTPUT_DIR",
    "DEFAULT_PACKAGE",
    "DEFAULT_WAIT_TIMEOUT_S",
    "LocalRunResult",
    "StepFailedError",
    "SubmitResult",
    "build_summary",
    "compile_pipeline",
    "failure_summary",
    "run_local",
    "submit_pipeline",
]
