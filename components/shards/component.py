"""The shard indices stage 3 fans out over (a list output, for ``dsl.ParallelFor``)."""

from kfp import dsl

from components.images import RUNTIME_CPU


@dsl.component(base_image=RUNTIME_CPU, install_kfp_package=False)
def shard_indices(shards: int) -> list:
    """``[0, …, shards-1]``; fewer than one shard is an error."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    return list(range(shards))
