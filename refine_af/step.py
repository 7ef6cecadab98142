"""What a pipeline step's process takes from the library: the run configuration its first
step resolved, checked against that step's hash, where the step's workspace is, and how
it records its metrics.

The components and the containers call these; the CLI has its own defaults (a
``workspace`` folder in the current directory).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from refine_af.config import RunConfig, load_resolved
from refine_af.errors import InputError

WORKSPACE_ENV = "REFINE_AF_WORKSPACE"
# A pod's working directory may be read-only; /tmp is writable in every image.
STEP_WORKSPACE = "/tmp/refine-af"


def workspace() -> Path:
    """The local MLflow store's folder when ``MLFLOW_TRACKING_URI`` is unset."""
    return Path(os.environ.get(WORKSPACE_ENV, STEP_WORKSPACE))


def config(text: str, config_hash: str) -> RunConfig:
    """The resolved configuration; a hash that does not match ends the step with exit 2."""
    try:
        return load_resolved(text, config_hash)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def record_metrics(metrics: Any, values: Mapping[str, float]) -> None:
    """Log ``values`` on a step's Metrics output and write everything it holds to its file.

    kfp.local's cache takes an output artifact with no file for a missing one, so a step
    whose Metrics output held only metadata was never reused by a rerun.
    """
    for name, value in values.items():
        metrics.log_metric(name, value)
    path = Path(metrics.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics.metadata, sort_keys=True) + "\n", encoding="utf-8")
