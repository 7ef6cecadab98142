"""The merge component's interface, as the pipeline and the cluster see it."""

from components.interface import interface
from components.merge.component import merge


def test_interface():
    inputs, outputs, image = interface(merge)
    assert inputs == {"shards": "system.Dataset@0.0.1"}
    assert outputs == {
        "dataset": "system.Dataset@0.0.1",
        "metrics": "system.Metrics@0.0.1",
        "Output": "Float",
    }
    assert image.endswith("/runtime-cpu:0.1.0")
