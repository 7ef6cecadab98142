"""The rlaf component's interface, as the pipeline and the cluster see it."""

from components.interface import interface
from components.rlaf.component import rlaf


def test_interface():
    inputs, outputs, image = interface(rlaf)
    assert inputs == {
        "config": "String",
        "overrides": "List",
        "base_model": "String",
        "processes": "Integer",
        "pool": "system.Dataset@0.0.1",
    }
    assert outputs == {"policy": "system.Model@0.0.1", "metrics": "system.Metrics@0.0.1"}
    assert image.endswith("/runtime-gpu:0.1.0")
