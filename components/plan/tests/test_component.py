"""The plan component's interface, as the pipeline and the cluster see it."""

from components.interface import interface
from components.plan.component import plan


def test_interface():
    inputs, outputs, image = interface(plan)
    assert inputs == {
        "config": "String",
        "overrides": "List",
        "base_model": "String",
        "generation_endpoint": "String",
        "shards": "Integer",
    }
    assert outputs == {"parent_run_id": "String", "config_hash": "String"}
    assert image.endswith("/runtime-cpu:0.1.0")
