"""Iris image classification on Kubeflow: step logic (``steps``), the DAG, config and runners."""

__version__ = "0.1.0"
