"""Iris image classification on Kubeflow: step logic (``steps``), the DAG, config and runners."""

from pathlib import Path

__version__ = "0.1.0"

#: The folder holding ``pipeline/``, ``components/`` and ``containers/``: the code that runs.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
