"""What a pipeline step's process takes from the library: the run configuration its first
step resolved, checked against that step's hash, and where the step's workspace is.

The components and the containers call these; the CLI has its own defaults (a
``workspace`` folder in the current directory).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
