"""The registry decision told on the pipeline's parent run, where a user looks for it.

The register step decides in its own nested run; a user comparing pipeline runs opens the
parent. This module puts the decision there: ``registry.*`` tags (the run list can show them
as columns), a *Registry decision* section in the run's description (its Overview page
renders it as Markdown, with a link to the version), and the logged model as an output of
the parent run, so its Overview lists the model and the registered version under
*Logged models* / *Registered models* instead of "None".
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"
TAG_DECISION = "registry.decision"  # champion, challenger or not_registered
TAG_VERSION = "registry.version"  # "<name> v<version>"
TAG_REASON = "registry.reason"
#: The description's section this module owns (replaced, never appended twice).
SECTION = "### Registry decision"
_MAX_TAG = 5000  # MLflow's tag value limit on most stores


def model_name(label: str, seed: int, settings: Mapping[str, Any]) -> str:
    """The logged model's name: ``iris-<label>-seed<seed>-<digest>`` (label: what the model
    is, e.g. ``mobilenet_v2-a0_5-320px``; ``model_logging.log_model`` also turns any "." MLflow
    refuses into "_").

    The digest (6 hex digits) covers every train setting but the weights file's path (it
    differs per machine), so a sweep's trials, which share model, size and seed when they
    differ in pooling, head or views, get models with distinct names.
    """
    kept = {k: v for k, v in settings.items() if k != "weights"}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
    return f"iris-{label}-seed{seed}-{digest[:6]}"


def decision_markdown(decision: Mapping[str, Any]) -> str:
    """The description section: version and alias, with the comparison that decided it."""
    if not decision.get("registered"):
        return f"{SECTION}\n\nNot registered: {decision.get('reason') or 'no reason given'}.\n"
    name, version = decision["name"], decision["version"]
    lines = [SECTION, "",
             f"**[{name} v{version}](#/models/{name}/versions/{version})** got alias "
             f"**@{decision['alias']}**: {decision.get('reason', '')}"]
    comparison = decision.get("comparison") or {}
    if comparison.get("difference") is not None:
        low, high = comparison.get("difference_ci_low"), comparison.get("difference_ci_high")
        interval = (f" (95% interval [{low:+.3f}, {high:+.3f}] over "
                    f"{comparison.get('images')} paired test images)"
                    if low is not None and high is not None else "")
        lines.append(f"\nCompared with champion v{comparison.get('champion_version')} by "
                     f"{comparison.get('method', 'comparison').replace('_', ' ')}: "
                     f"{decision.get('metric_name')} difference "
                     f"{comparison['difference']:+.3f}{interval}, margin "
                     f"{comparison.get('margin', 0):.3f}.")
    return "\n".join(lines) + "\n"


def with_section(description: str, section: str) -> str:
    """``description`` with this module's section replaced by (or followed by) ``section``."""
    kept = description.split(SECTION, 1)[0].rstrip()
    return f"{kept}\n\n{section}" if kept else section


def tell_parent(step_run_id: str, decision: Mapping[str, Any], model_id: str | None,
                client: MlflowClient | None = None) -> None:
    """Tag, describe and link the registry decision on the parent of ``step_run_id``.

    Best effort: the registry already holds the decision, so a failure here is logged, not
    raised (the parent run's story is a view of it, not the record).
    """
    client = client or MlflowClient()
    try:
        parent_id = client.get_run(step_run_id).data.tags.get(TAG_PARENT)
        if not parent_id:
            return
        parent = client.get_run(parent_id)
        version = (f"{decision['name']} v{decision['version']}" if decision.get("registered")
                   else "")
        client.set_tag(parent_id, TAG_DECISION, str(decision.get("decision", "")))
        client.set_tag(parent_id, TAG_VERSION, version)
        client.set_tag(parent_id, TAG_REASON, str(decision.get("reason", ""))[:_MAX_TAG])
        client.set_tag(parent_id, TAG_NOTE, with_section(
            parent.data.tags.get(TAG_NOTE, ""), decision_markdown(decision)))
        if model_id and decision.get("registered"):
            client.log_outputs(parent_id, [LoggedModelOutput(model_id, 0)])
    except MlflowException as exc:
        logger.warning("could not put the registry decision on the pipeline run: %s", exc)


__all__ = ["decision_markdown", "model_name", "tell_parent", "with_section"]
