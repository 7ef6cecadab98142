"""The sft component's interface, as the pipeline and the cluster see it."""

from components.interface import interface
from components.sft.component import sft


def test_interface():
    inputs, outputs, image = interface(sft)
    assert inputs == {
        "config": "String",
        "overrides": "List",
        "base_model": "String",
        "parent_run_id": "String",
        "register": "Boolean",
        "processes": "Integer",
        "dataset": "system.Dataset@0.0.1",
    }
    assert outputs == {
        "model": "system.Model@0.0.1",
        "metrics": "system.Metrics@0.0.1",
        "Output": "String",
    }
    assert image.endswith("/runtime-gpu:0.1.0")
