"""Self-Instruct's post-processing of generated instances, one task at a time.

Self-Instruct (``prepare_for_finetuning.py``) keeps an instance only if it was not cut off
by the token limit, its output is not empty and differs from its input, and neither field
ends with ":" (a sign of an unfinished generation). A task whose instances give different
outputs for the same non-empty input is ambiguous, so all its instances go; exact
duplicates are dropped and at most a few instances per task are kept. Here every decision
is kept with its reason, so the counts of a run reconcile: every parsed item (an
instance, or a completion holding none) ends up kept, filtered (a rule rejected the
instance) or quarantined (no instance in it, or one cut off by the token limit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from refine_af.generation import Completion
from refine_af.instances_format import Format, Instance, parse_instances
from refine_af.records import InstructionRecord, quarantine_entry

# parse failures: the completion holds no instance (quarantine) or an empty output (a rule)
UNPARSEABLE = ("missing_output", "truncated")


def example_id(instruction_id: str, sample: int) -> str:
    """Stable across runs and shards: the instruction and the sample's position."""
    return f"{instruction_id}-{sample:03d}"


def rule_violation(instance: Instance) -> str | None:
    """Why Self-Instruct's per-instance rules reject an instance, or None."""
    if instance.input == instance.output:
        return "input_equals_output"
    if not instance.output:
        return "empty_output"
    if instance.input.endswith(":") or instance.output.endswith(":"):
        return "ends_with_colon"
    return None


@dataclass(frozen=True)
class Candidate:
    """A parsed instance that passed the rules, with the sample it came from."""

    sample: int
    instance: Instance


@dataclass
class Screened:
    """One task's completions sorted into candidates, filtered and quarantined entries."""

    candidates: list[Candidate] = field(default_factory=list)
    filtered: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)


def _where(record: InstructionRecord, sample: int) -> dict[str, Any]:
    return {"id": example_id(record.id, sample), "instruction_id": record.id, "sample": sample}


def filtered_entry(
    reason: str, record: InstructionRecord, sample: int, instance: Instance, **extra: Any
) -> dict[str, Any]:
    where = _where(record, sample)
    return quarantine_entry(reason, **where, input=instance.input, output=instance.output, **extra)


def screen(
    record: InstructionRecord,
    completions: Sequence[Completion],
    format: Format = "one_per_prompt",
    max_instances: int = 5,
) -> Screened:
    """Parse one task's completions and apply the per-instance and per-task rules.

    Samples are numbered over the task's instances in order (with one instance per
    completion, completion ``k`` is sample ``k``). What survives is in sample order, so a
    later cap keeps the earliest samples, which are as good a sample as any.
    """
    result = Screened()
    passed: list[Candidate] = []
    sample = 0
    for completion in completions:
        items = parse_instances(
            record.instruction,
            record.is_classification,
            completion.text,
            finished=completion.finish_reason == "stop",
            format=format,
            max_instances=max_instances,
        )
        for parsed in items:
            if parsed.instance is None:
                bucket = result.quarantined if parsed.failure in UNPARSEABLE else result.filtered
                where = _where(record, sample)
                bucket.append(quarantine_entry(parsed.failure, **where, text=completion.text))
            elif (reason := rule_violation(parsed.instance)) is not None:
                result.filtered.append(filtered_entry(reason, record, sample, parsed.instance))
            else:
                passed.append(Candidate(sample, parsed.instance))
            sample += 1
    if _conflicting(passed):
        for c in passed:
            result.filtered.append(
                filtered_entry("conflicting_outputs", record, c.sample, c.instance)
            )
        return result
    seen: set[tuple[str, str]] = set()
    for c in passed:
        key = (c.instance.input, c.instance.output)
        if key in seen:
            result.filtered.append(filtered_entry("duplicate", record, c.sample, c.instance))
        else:
            seen.add(key)
            result.candidates.append(c)
    return result


def _conflicting(candidates: Sequence[Candidate]) -> bool:
    """Two instances share a non-empty input but give different outputs."""
    outputs: dict[str, str] = {}
    for c in candidates:
        if not c.instance.input:
            continue
        if outputs.setdefault(c.instance.input, c.instance.output) != c.instance.output:
            return True
    return False


def select(
    record: InstructionRecord,
    candidates: Sequence[Candidate],
    rewards: Sequence[float],
    *,
    min_reward: float | None,
    cap: int,
) -> tuple[list[int], list[dict[str, Any]]]:
    """Positions of the scored candidates kept, and the entries of those that are not.

    The reward threshold applies first, so the cap keeps up to ``cap`` instances that pass it.
    """
    kept: list[int] = []
    filtered: list[dict[str, Any]] = []
    for position, (c, reward) in enumerate(zip(candidates, rewards, strict=True)):
        if min_reward is not None and reward < min_reward:
            reason = "below_min_reward"
        elif len(kept) >= cap:
            reason = "over_cap"
        else:
            kept.append(position)
            continue
        filtered.append(filtered_entry(reason, record, c.sample, c.instance, reward=reward))
    return kept, filtered
