"""Stage 3's unit of work: fixed blocks of instructions, and shards as ranges of blocks.

A block holds as many instructions as fill one generation batch and is sampled with a seed
derived from its first instruction's id, so what a block produces depends neither on the
shard that runs it nor on whether the run was interrupted before it: shards concatenate,
and a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from refine_af.config import RunConfig
from refine_af.errors import InputError
from refine_af.records import InstructionRecord


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): a contiguous range of generation blocks."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        index, sep, count = text.partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            shard = None
        if not sep or shard is None or not 0 <= shard.index < shard.count:
            raise InputError(f"--shard {text!r}: expected i/n with 0 ≤ i < n, e.g. 0/4")
        return shard

    def blocks(self, total: int) -> range:
        return range(self.index * total // self.count, (self.index + 1) * total // self.count)


def instructions_per_block(config: RunConfig) -> int:
    """Enough instructions that their samples fill one generation batch."""
    return max(1, config.generation.batch_size // config.stage3.samples_per_instruction)


def assigned_blocks(
    instructions: Sequence[InstructionRecord], config: RunConfig, shard: Shard | None
) -> list[list[InstructionRecord]]:
    """The generation blocks of all instructions that ``shard`` (None: all of them) writes."""
    per_block = instructions_per_block(config)
    blocks = [instructions[i : i + per_block] for i in range(0, len(instructions), per_block)]
    return [list(blocks[b]) for b in (shard or Shard(0, 1)).blocks(len(blocks))]


def block_seed(seed: int, instruction_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{instruction_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1
