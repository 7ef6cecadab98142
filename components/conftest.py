"""Component tests share the suite's fixtures (models, servers, KFP's local runner)."""

from tests.conftest import (  # noqa: F401 - fixtures are found by name
    bundled_model_dir,
    local_runner,
    tiny_causal_lm_dir,
)
