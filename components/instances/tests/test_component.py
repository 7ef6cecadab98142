"""The instances component's interface, as the pipeline and the cluster see it."""

from components.instances.component import instances
from components.interface import interface


def test_interface():
    inputs, outputs, image = interface(instances)
    assert inputs == {
        "config": "String",
        "overrides": "List",
        "base_model": "String",
        "generation_endpoint": "String",
        "pool": "system.Dataset@0.0.1",
        "shard": "Integer",
        "shards": "Integer",
        "policy": "system.Model@0.0.1",
    }
    assert outputs == {"examples": "system.Dataset@0.0.1"}
    assert image.endswith("/runtime-gpu:0.1.0")
