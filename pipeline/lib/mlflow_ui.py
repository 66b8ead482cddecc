"""``mlflow ui --app-name iris``: MLflow's own server plus one page that opens an experiment
on MLflow's model-training pages, in any browser, for every click that follows.

Why: MLflow 3.17's UI chooses between its GenAI and model-training pages from a setting the
browser keeps (``localStorage["mlflow.workflowType_v1"]``, GenAI when unset) unless the
address carries ``?workflowType=machine_learning``. The experiment page adds that parameter
from the experiment's kind tag, but the run list's links drop it, so in a fresh browser
every run, and the registry behind it, opens on GenAI pages; picking *Model training* in
the sidebar does not store the choice while the address already says so (reported as
MLflow issue #24498). MLflow offers no server setting for this, so this page, served
from the UI's own origin, stores *Model training* as the browser's choice and forwards to
the experiment. The plugin is registered under MLflow's ``mlflow.app`` entry points (the
extension point its ``basic-auth`` app uses); everything else is MLflow's app unchanged.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

#: ``mlflow ui --app-name APP_NAME`` (pyproject's ``mlflow.app`` entry point).
APP_NAME = "iris"
#: The page: ``/iris/experiments/<experiment id>``.
ROUTE_PREFIX = "/iris/experiments/"
#: What MLflow's UI keeps the GenAI / Model training choice under, and the value it stores.
WORKFLOW_STORAGE_KEY = "mlflow.workflowType_v1"
MODEL_TRAINING = "machine_learning"
_EXPERIMENT_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>MLflow: model training</title></head>
<body><script>
localStorage.setItem({key}, {value});
location.replace({target});
</script><noscript>MLflow's UI needs JavaScript.</noscript></body></html>
"""


def ui_path(experiment_id: str) -> str:
    """The address path (after host and port) of :func:`model_training_page` for an experiment."""
    return f"{ROUTE_PREFIX}{experiment_id}"


def model_training_page(experiment_id: str) -> tuple[str, int, dict[str, str]]:
    """Store *Model training* as this browser's MLflow workflow, then open the experiment."""
    if not _EXPERIMENT_ID.fullmatch(experiment_id):
        return "not an experiment id\n", 404, {"Content-Type": "text/plain"}
    target = f"../../#/experiments/{experiment_id}?workflowType={MODEL_TRAINING}"
    html = _PAGE.format(key=json.dumps(WORKFLOW_STORAGE_KEY),
                        value=json.dumps(json.dumps(MODEL_TRAINING)), target=json.dumps(target))
    return html, 200, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}


def create_app() -> Any:
    """MLflow's server app with the page added (uvicorn, ``mlflow ui``'s default, gets
    MLflow's FastAPI wrapper around it, as for its ``basic-auth`` app)."""
    from mlflow.server import app as flask_app

    flask_app.add_url_rule(f"{ROUTE_PREFIX}<experiment_id>", "iris_model_training_page",
                           model_training_page)
    if os.environ.get("_MLFLOW_SGI_NAME", "uvicorn") == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(flask_app)
    return flask_app


__all__ = ["APP_NAME", "create_app", "model_training_page", "ui_path"]
