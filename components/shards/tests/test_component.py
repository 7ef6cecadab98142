"""shard_indices, called as KFP calls it."""

import pytest

from components.shards.component import shard_indices


def test_one_index_per_shard():
    assert shard_indices.python_func(shards=3) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 1"):
        shard_indices.python_func(shards=0)
