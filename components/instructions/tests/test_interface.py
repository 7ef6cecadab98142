"""The instructions component's interface, as the pipeline and the cluster see it."""

from components.instructions.component import instructions
from components.interface import interface


def test_interface():
    inputs, outputs, image = interface(instructions)
    assert inputs == {
        "config": "String",
        "overrides": "List",
        "base_model": "String",
        "generation_endpoint": "String",
    }  # no parent_run_id: it would change the cache key every run
    assert outputs == {
        "pool": "system.Dataset@0.0.1",
        "metrics": "system.Metrics@0.0.1",
        "Output": "Integer",
    }
    assert image.endswith("/runtime-gpu:0.1.0")
