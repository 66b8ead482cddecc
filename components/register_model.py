"""Component ``register_model``: the registry step, run only when the evaluation gate passed."""

from kfp.dsl import Input, Metrics, Model


def register_model(
    trained_model: Input[Model],
    metrics: Input[Metrics],
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_name: str,
    experiment_name: str,
    registered_model_name: str,
    gate_metric: str,
) -> dict:
    """Record the gate verdict that let this step run and what was (or was not) registered.

    The returned dict is the task's output parameter; the local runner puts it in the summary.
    """
    import logging

    decision = {
        "registered_model_name": registered_model_name,
        "gate_metric": gate_metric,
        "gate_value": float(metrics.metadata[gate_metric]),
        "gate_passed": bool(metrics.metadata["gate_passed"]),
        "registered": False,
        "reason": "model registry not wired yet (MLflow issue)",
    }
    logging.getLogger(__name__).info("register decision: %s", decision)
    return decision
