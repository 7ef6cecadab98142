"""The state of one stage-1 bootstrapping run: the instruction pool and what was set aside.

Candidates are judged against the pool (Self-Instruct's rules, then ROUGE-L similarity to
every instruction in it); kept ones join it at once. The state can be rebuilt from the
stage's journal, which is how a killed run continues where it stopped.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from refine_af import records
from refine_af.config import InstructionsSettings
from refine_af.generation import Completion
from refine_af.records import InstructionRecord, SeedTask
from refine_af.self_instruct import encode_prompt, parse_continuation, rule_violation
from refine_af.textsim import RougeLIndex


@dataclass(frozen=True)
class Neighbours:
    """A kept candidate with its similarity to the pool it was judged against."""

    instruction: str
    most_similar: dict[str, float]
    avg_similarity_score: float | None


@dataclass
class Bootstrap:
    """State of one bootstrapping run: the pool, its similarity index and the counts."""

    settings: InstructionsSettings
    seeds: list[SeedTask]
    accepted: list[InstructionRecord] = field(default_factory=list)
    filtered: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    rounds: int = 0
    seconds: float = 0.0  # spent in rounds, over every invocation
    config_hashes: list[str] = field(default_factory=list)  # one per invocation

    def __post_init__(self) -> None:
        self.index = RougeLIndex(seed.instruction for seed in self.seeds)

    @property
    def done(self) -> bool:
        return len(self.accepted) >= self.settings.num_instructions

    def restore(self, events: list[dict[str, Any]]) -> None:
        """Replay a journal: the pool, index and counts as they were when the run stopped."""
        for event in events:
            kind = event["event"]
            if kind == "accepted":
                record = InstructionRecord.model_validate(event["record"])
                self.accepted.append(record)
                self.index.add(record.instruction)
            elif kind == "filtered":
                self.filtered.append(event["entry"])
            elif kind == "quarantined":
                self.quarantined.append(event["entry"])
            elif kind == "round":
                self.rounds = event["round"]
                self.seconds += event.get("seconds", 0.0)
            elif kind in ("start", "resume") and "config_hash" in event:
                self.config_hashes.append(event["config_hash"])

    def prompts(self, rng: random.Random) -> list[str]:
        machine = [r.instruction for r in self.accepted]
        seed_texts = [s.instruction for s in self.seeds]
        prompts = []
        for _ in range(self.settings.prompts_per_round):
            chosen = rng.sample(
                machine, min(self.settings.prompt_machine_instructions, len(machine))
            )
            chosen += rng.sample(seed_texts, self.settings.prompt_instructions - len(chosen))
            rng.shuffle(chosen)
            prompts.append(encode_prompt(chosen))
        return prompts

    def judge(
        self, completions: Sequence[Completion]
    ) -> tuple[list[dict[str, Any]], list[Neighbours]]:
        """Filter one round's candidates; returns journal events and the kept candidates.

        A kept candidate joins the index at once, so later candidates of the same round are
        compared with it too.
        """
        events: list[dict[str, Any]] = []
        kept: list[Neighbours] = []
        for number, completion in enumerate(completions):
            where = {"round": self.rounds, "prompt": number}
            candidates, truncated = parse_continuation(completion, self.settings.on_token_limit)
            if truncated is not None:
                entry = records.quarantine_entry("truncated", text=truncated, **where)
                events.append(self._set_aside("quarantined", entry))
            if not candidates and truncated is None:
                entry = records.quarantine_entry("unparseable", text=completion.text, **where)
                events.append(self._set_aside("quarantined", entry))
            for candidate in candidates:
                reason = self._rejection(candidate, len(self.accepted) + len(kept))
                if reason:
                    entry = records.quarantine_entry(reason, instruction=candidate, **where)
                    events.append(self._set_aside("filtered", entry))
                else:
                    kept.append(self._neighbours(candidate))
                    self.index.add(candidate)
        return events, kept

    def _set_aside(self, kind: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Keep a filtered or quarantined entry in the state; returns its journal event."""
        (self.filtered if kind == "filtered" else self.quarantined).append(entry)
        return {"event": kind, "entry": entry}

    def _rejection(self, candidate: str, accepted_so_far: int) -> str | None:
        if accepted_so_far >= self.settings.num_instructions:
            return "over_target"
        reason = rule_violation(candidate, self.settings)
        if reason is None and self.index.exceeds(candidate, self.settings.similarity_threshold):
            reason = "too_similar"
        return reason

    def _neighbours(self, candidate: str) -> Neighbours:
        """The candidate's nearest instructions in the pool before it joins."""
        average = (
            self.index.mean_similarity(candidate) if self.settings.record_avg_similarity else None
        )
        return Neighbours(
            candidate, dict(self.index.top_k(candidate, self.settings.most_similar)), average
        )

    def record(self, kept: Neighbours, is_classification: bool) -> InstructionRecord:
        record = InstructionRecord(
            id=f"machine_{len(self.accepted):06d}",
            instruction=kept.instruction,
            is_classification=is_classification,
            source="machine",
            most_similar=kept.most_similar,
            avg_similarity_score=kept.avg_similarity_score,
        )
        self.accepted.append(record)
        return record

    def counts(self) -> dict[str, Any]:
        reasons = Counter(entry["reason"] for entry in self.filtered)
        candidates = (
            len(self.accepted)
            + len(self.filtered)
            + sum(1 for entry in self.quarantined if entry["reason"] == "truncated")
        )
        return {
            "rounds": self.rounds,
            "candidates": candidates,
            "accepted": len(self.accepted),
            "filtered": dict(sorted(reasons.items())),
            "quarantined": dict(sorted(Counter(e["reason"] for e in self.quarantined).items())),
            "classification": sum(r.is_classification for r in self.accepted),
        }
