"""The shard_indices component's interface, as the pipeline and the cluster see it."""

from components.interface import interface
from components.shards.component import shard_indices


def test_interface():
    inputs, outputs, image = interface(shard_indices)
    assert inputs == {"shards": "Integer"}
    assert outputs == {"Output": "List"}
    assert image.endswith("/runtime-cpu:0.1.0")
