"""Stage 3's work on one block: generate, screen (Self-Instruct's rules) and score.

What a block produces is a ``Part``; parts concatenate in instruction order, so the stage,
its resume journal and ``merge`` all build the dataset by extending one part with the next.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from refine_af import postprocess
from refine_af.config import RunConfig
from refine_af.feedback import NONFINITE, CompositeReward, RewardBatch
from refine_af.generation import GenerationBackend, SamplingParams
from refine_af.instances_format import Parsed, build_prompt, stop_strings
from refine_af.records import ExampleRecord, InstructionRecord
from refine_af.sharding import block_seed

Policy = Literal["rl", "base"]


def policy(config: RunConfig) -> Policy:
    """Who writes the instances: stage 2's adapter ("rl") or the base model (the baseline)."""
    return "rl" if config.stage3.adapter else "base"


@dataclass
class Part:
    """What a range of instructions produced; parts concatenate in instruction order."""

    instructions: int = 0
    generations: int = 0
    examples: list[ExampleRecord] = field(default_factory=list)
    filtered: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)

    def extend(self, other: Part) -> None:
        self.instructions += other.instructions
        self.generations += other.generations
        self.examples += other.examples
        self.filtered += other.filtered
        self.quarantined += other.quarantined

    def counts(self) -> dict[str, Any]:
        rewards = [e.reward for e in self.examples if e.reward is not None]
        return {
            "instructions": self.instructions,
            "generations": self.generations,
            "kept": len(self.examples),
            "filtered": dict(sorted(Counter(e["reason"] for e in self.filtered).items())),
            "quarantined": dict(sorted(Counter(e["reason"] for e in self.quarantined).items())),
            "instructions_with_examples": len({e.instruction_id for e in self.examples}),
            "mean_reward": round(sum(rewards) / len(rewards), 6) if rewards else None,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "instructions": self.instructions,
            "generations": self.generations,
            "examples": [e.model_dump(mode="json") for e in self.examples],
            "filtered": self.filtered,
            "quarantined": self.quarantined,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Part:
        return cls(
            instructions=data["instructions"],
            generations=data["generations"],
            examples=[ExampleRecord.model_validate(e) for e in data["examples"]],
            filtered=data["filtered"],
            quarantined=data["quarantined"],
        )


class InstanceWriter:
    """Generates, screens and scores one block of instructions at a time."""

    def __init__(
        self, config: RunConfig, backend: GenerationBackend, reward: CompositeReward
    ) -> None:
        self.settings, self.backend, self.reward = config.stage3, backend, reward
        self.policy = policy(config)
        self.seed = config.generation.seed
        self.params = SamplingParams(
            max_new_tokens=config.stage3.max_new_tokens,
            temperature=config.generation.temperature,
            top_p=config.generation.top_p,
            repetition_penalty=config.generation.repetition_penalty,
            stop=stop_strings(config.stage3.format, config.stage3.max_per_instruction),
        )

    def block(self, block: Sequence[InstructionRecord]) -> Part:
        k, fmt = self.settings.samples_per_instruction, self.settings.format
        prompts = [
            build_prompt(r.instruction, r.is_classification, fmt) for r in block for _ in range(k)
        ]
        params = replace(self.params, seed=block_seed(self.seed, block[0].id))
        completions = self.backend.generate(prompts, params)
        part = Part(instructions=len(block), generations=len(prompts))
        cap = self.settings.max_per_instruction
        screened = [
            postprocess.screen(r, completions[i * k : (i + 1) * k], fmt, cap)
            for i, r in enumerate(block)
        ]
        flat = [c for s in screened for c in s.candidates]
        scored = self.reward([Parsed(c.instance) for c in flat])
        position = 0
        for record, outcome in zip(block, screened, strict=True):
            span = range(position, position + len(outcome.candidates))
            position = span.stop
            part.filtered += outcome.filtered
            part.quarantined += outcome.quarantined
            self._keep(record, outcome.candidates, [scored_item(scored, i) for i in span], part)
        return part

    def _keep(
        self,
        record: InstructionRecord,
        candidates: Sequence[postprocess.Candidate],
        scores: Sequence[tuple[dict[str, float], float] | None],
        part: Part,
    ) -> None:
        finite = []
        for c, item in zip(candidates, scores, strict=True):
            if item is None:
                entry = postprocess.filtered_entry(NONFINITE, record, c.sample, c.instance)
                part.quarantined.append(entry)
            else:
                finite.append((c, item))
        kept, filtered = postprocess.select(
            record,
            [c for c, _ in finite],
            [reward for _, (_, reward) in finite],
            min_reward=self.settings.min_reward,
            cap=self.settings.max_per_instruction,
        )
        part.filtered += filtered
        for position in kept:
            c, (scores_of, reward) = finite[position]
            part.examples.append(
                ExampleRecord(
                    id=postprocess.example_id(record.id, c.sample),
                    instruction_id=record.id,
                    instruction=c.instance.instruction,
                    input=c.instance.input,
                    output=c.instance.output,
                    scores=scores_of,
                    reward=reward,
                    policy=self.policy,
                )
            )


def scored_item(batch: RewardBatch, index: int) -> tuple[dict[str, float], float] | None:
    """(each scorer's score, composite reward) of one item, or None for a non-finite one."""
    if batch.failures[index] is not None:
        return None
    return {name: values[index] for name, values in batch.scores.items()}, batch.rewards[index]
