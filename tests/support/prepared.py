"""Reading a prepared data set in tests (the pipeline's own readers are the TFRecord ones)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.lib.contract import DATA_REPORT_JSON


def load_report(data_dir: str | Path) -> dict[str, Any]:
    """The data report (JSON) the preprocess step wrote into ``data_dir``."""
    return json.loads((Path(data_dir) / DATA_REPORT_JSON).read_text())
