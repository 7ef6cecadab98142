"""The evaluate component's interface, as the pipeline and the cluster see it."""

from components.evaluate.component import evaluate
from components.interface import interface


def test_interface():
    inputs, outputs, image = interface(evaluate)
    assert inputs == {
        "config": "String",
        "overrides": "List",
        "base_model": "String",
        "generation_endpoint": "String",
        "parent_run_id": "String",
        "candidate": "system.Model@0.0.1",
        "version": "String",
        "baseline": "system.Model@0.0.1",
        "baseline_version": "String",
    }
    assert outputs == {
        "results": "system.Dataset@0.0.1",
        "report": "system.Markdown@0.0.1",
        "metrics": "system.Metrics@0.0.1",
        "Output": "Float",
    }
    assert image.endswith("/runtime-gpu:0.1.0")
