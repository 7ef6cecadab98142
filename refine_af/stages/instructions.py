"""Stage 1: bootstrap new task instructions from the seed tasks (Self-Instruct).

Each round samples in-context instructions (seeds, plus machine-written ones once there
are some), lets the model continue the numbered list, parses the continuation and keeps
the candidates that pass Self-Instruct's rules and are not too similar (ROUGE-L) to any
instruction already in the pool. Every round is appended to a journal, so a killed run
continues where it stopped; the final files are written atomically at the end.
"""

from __future__ import annotations

import json
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from refine_af import records, storage, threads, tracking
from refine_af.config import InstructionsSettings, RunConfig
from refine_af.data import seed_tasks_path
from refine_af.errors import InputError
from refine_af.generation import Completion, GenerationBackend, SamplingParams, backend_for
from refine_af.records import InstructionRecord, SeedTask
from refine_af.textsim import RougeLIndex

JOURNAL = "journal.jsonl"
OUTPUT_FILES = ("instructions.jsonl", "filtered.jsonl", "quarantine.jsonl", "summary.json")
_ITEM_SPLIT = re.compile(r"\n\d+\s?\. ")


# ---------------------------------------------------------------- prompts and parsing


def encode_prompt(instructions: Sequence[str]) -> str:
    """Self-Instruct's numbered-list prompt; the model continues after the last number."""
    lines = ["Come up with a series of tasks:"]
    for number, instruction in enumerate(instructions, start=1):
        text = re.sub(r"\s+", " ", instruction).strip().rstrip(":")
        lines.append(f"{number}. {text}")
    return "\n".join(lines) + f"\n{len(instructions) + 1}."


def parse_continuation(
    completion: Completion, on_token_limit: str = "drop_last"
) -> tuple[list[str], str | None]:
    """Candidate instructions of one continuation, and the text cut off by the token limit.

    When generation hit the token limit the last item is unfinished, so it is set aside
    (to the quarantine) instead of being judged as an instruction; with ``drop_response``
    the whole continuation is, as Self-Instruct's ``post_process_gpt3_response`` does.
    """
    if completion.finish_reason == "length" and on_token_limit == "drop_response":
        return [], completion.text or None
    items = [re.sub(r"\s+", " ", item).strip() for item in _ITEM_SPLIT.split(completion.text)]
    items = [item[0].upper() + item[1:].lower() if item else item for item in items]
    truncated = items.pop() if completion.finish_reason == "length" and items else None
    return [item for item in items if item], truncated or None


def rule_violation(candidate: str, settings: InstructionsSettings) -> str | None:
    """Why Self-Instruct's rules reject a candidate, or None when it passes them."""
    words = len(candidate.split())
    if words <= settings.min_words:
        return "too_short"
    if words > settings.max_words:
        return "too_long"
    for word in settings.blocked_words:
        if re.search(rf"\b{re.escape(word)}\b", candidate, flags=re.IGNORECASE):
            return "blocked_word"
    if candidate.startswith(tuple(settings.blocked_prefixes)):
        return "blocked_prefix"
    if candidate[0] in string.punctuation:
        return "starts_with_punctuation"
    if not candidate[0].isascii():
        return "starts_non_ascii"
    return None


# ---------------------------------------------------------------- classification


class ClassificationDetector:
    """Few-shot Yes/No prompt built from labelled seed tasks; Yes wins above 0.5."""

    QUESTION = (
        "Can the following task be regarded as a classification task with finite output labels?"
    )

    def __init__(self, backend: GenerationBackend, seeds: Sequence[SeedTask], shots: int) -> None:
        rng = random.Random(0)
        positive = [s.instruction for s in seeds if s.is_classification]
        negative = [s.instruction for s in seeds if not s.is_classification]
        half = shots // 2
        examples = [(t, "Yes") for t in rng.sample(positive, min(half, len(positive)))]
        examples += [(t, "No") for t in rng.sample(negative, min(half, len(negative)))]
        rng.shuffle(examples)
        self.backend = backend
        self.prefix = (
            self.QUESTION
            + "\n\n"
            + "".join(
                f"Task: {task}\nIs it classification? {answer}\n\n" for task, answer in examples
            )
        )

    def prompt(self, instruction: str) -> str:
        return f"{self.prefix}Task: {instruction}\nIs it classification?"

    def __call__(self, instructions: Sequence[str]) -> list[bool]:
        if not instructions:
            return []
        probabilities = self.backend.yes_probability([self.prompt(i) for i in instructions])
        return [p > 0.5 for p in probabilities]


# ---------------------------------------------------------------- the bootstrap loop


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


# ---------------------------------------------------------------- running the stage


@dataclass(frozen=True)
class InstructionsResult:
    out_dir: Path
    summary: dict[str, Any]


def load_seeds(config: RunConfig) -> tuple[list[SeedTask], str]:
    """The seed tasks, checked against the settings that use them before any model loads."""
    settings = config.stage1
    path = settings.seed_tasks or str(seed_tasks_path())
    seeds = records.read_records(path, SeedTask, config.limits.by_field())
    if not seeds:
        raise InputError(f"{path}: no seed tasks in the file")
    if len(seeds) < settings.prompt_instructions:
        raise InputError(
            f"{path}: {len(seeds)} seed tasks, but every prompt shows "
            f"stage1.prompt_instructions={settings.prompt_instructions} of them before the "
            f"pool has machine instructions; add seeds or --set "
            f"stage1.prompt_instructions={max(len(seeds), 2)} (and prompt_machine_instructions "
            "below it)"
        )
    return seeds, path


def _resume_key(config: RunConfig) -> dict[str, Any]:
    """What shapes the pool, so must match to continue a journal: the model, sampling and
    stage 1 settings, but not the target and round limit."""
    stage1 = config.stage1.model_dump(mode="json", exclude={"num_instructions", "max_rounds"})
    return {
        "model": config.model.model_dump(mode="json"),
        "generation": config.generation.model_dump(mode="json"),
        "stage1": stage1,
        "limits": config.limits.model_dump(mode="json"),
    }


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resume keys."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _check_resume(
    journal: Path, events: list[dict[str, Any]], config: RunConfig, *, force_resume: bool
) -> list[str]:
    """The settings a resume would change; refused (InputError) unless ``force_resume``."""
    differing = _differences(events[0].get("resume_key"), _resume_key(config))
    if differing and not force_resume:
        raise InputError(
            f"{journal}: this output folder holds a run with different settings: "
            f"{', '.join(differing)}; use a new --out folder, the earlier settings, or "
            "--force-resume to mix them (only stage1.num_instructions and max_rounds may change)"
        )
    return differing


def _open_journal(
    out_dir: Path, config: RunConfig, *, force_resume: bool = False
) -> tuple[Path, list[dict[str, Any]]]:
    """The journal and its events; a resume records itself (config hash, forced keys)."""
    journal = out_dir / JOURNAL
    events = records.read_journal(journal)
    if not events:
        start = {
            "event": "start",
            "resume_key": _resume_key(config),
            "config_hash": config.config_hash(),
        }
        records.append_jsonl(journal, [start])
        return journal, [start]
    differing = _check_resume(journal, events, config, force_resume=force_resume)
    resume = {"event": "resume", "config_hash": config.config_hash(), "forced": differing}
    records.append_jsonl(journal, [resume])
    return journal, [*events, resume]


def _write_outputs(out_dir: Path, state: Bootstrap, summary: dict[str, Any]) -> None:
    seed_records = [
        InstructionRecord(
            id=s.id, instruction=s.instruction, is_classification=s.is_classification, source="seed"
        )
        for s in state.seeds
    ]
    records.write_jsonl(out_dir / "instructions.jsonl", [*seed_records, *state.accepted])
    records.write_jsonl(out_dir / "filtered.jsonl", state.filtered)
    records.write_jsonl(out_dir / "quarantine.jsonl", state.quarantined)
    storage.write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def _log_round(stage_run: tracking.StageRun, state: Bootstrap) -> None:
    counts = state.counts()
    stage_run.log_metrics(
        {
            "progress.accepted": counts["accepted"],
            "progress.candidates": counts["candidates"],
            "progress.acceptance_rate": counts["accepted"] / max(counts["candidates"], 1),
        },
        step=state.rounds,
    )


def _final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    metrics = {k: float(summary[k]) for k in ("rounds", "candidates", "accepted", "classification")}
    for group in ("filtered", "quarantined"):
        metrics.update({f"{group}.{reason}": float(n) for reason, n in summary[group].items()})
    return metrics


def run(
    config: RunConfig,
    out_dir: Path,
    backend: GenerationBackend,
    *,
    workspace: Path,
    on_round: Callable[[Bootstrap], None] | None = None,
    force_resume: bool = False,
) -> InstructionsResult:
    """Bootstrap until ``stage1.num_instructions`` machine instructions are accepted.

    Continues a journal already in ``out_dir`` (refusing one written with other settings
    unless ``force_resume``); writes the outputs atomically at the end and logs params,
    per-round and final metrics and the summary to MLflow (the store of ``workspace``
    unless ``MLFLOW_TRACKING_URI`` is set). ``on_round`` sees the state after every round
    (progress display).
    """
    settings = config.stage1
    seeds, seed_path = load_seeds(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    journal, events = _open_journal(out_dir, config, force_resume=force_resume)
    state = Bootstrap(settings, seeds)
    state.restore(events)
    detector = ClassificationDetector(backend, seeds, settings.classification_shots)
    params = SamplingParams(
        max_new_tokens=settings.max_new_tokens,
        temperature=config.generation.temperature,
        top_p=config.generation.top_p,
        repetition_penalty=config.generation.repetition_penalty,
        stop=tuple(settings.stop),
    )
    started = time.monotonic()
    tags = {"refine_af.config_hash": config.config_hash()}
    with tracking.stage_run(
        "instructions", workspace, config.to_dict(), tags=tags, out_dir=out_dir
    ) as stage_run:
        while not state.done and state.rounds < settings.max_rounds:
            round_started = time.monotonic()
            round_seed = config.generation.seed * 1_000_003 + state.rounds
            prompts = state.prompts(random.Random(round_seed))
            completions = backend.generate(prompts, replace(params, seed=round_seed))
            round_events, kept = state.judge(completions)
            labels = (
                detector([k.instruction for k in kept])
                if settings.detect_classification
                else [False] * len(kept)
            )
            for neighbours, label in zip(kept, labels, strict=True):
                record = state.record(neighbours, label)
                round_events.append({"event": "accepted", "record": record.model_dump(mode="json")})
            state.rounds += 1
            round_seconds = time.monotonic() - round_started
            state.seconds += round_seconds
            round_events.append(
                {"event": "round", "round": state.rounds, "seconds": round(round_seconds, 3)}
            )
            records.append_jsonl(journal, round_events)
            _log_round(stage_run, state)
            if on_round is not None:
                on_round(state)
        summary = {
            "stage": "instructions",
            "config_hash": config.config_hash(),
            "config_hashes": list(dict.fromkeys(state.config_hashes)),
            "seed_tasks": seed_path,
            "seeds": len(seeds),
            "target": settings.num_instructions,
            "reached_target": state.done,
            "seconds": round(state.seconds, 1),
            "seconds_this_run": round(time.monotonic() - started, 1),
            **state.counts(),
        }
        _write_outputs(out_dir, state, summary)
        stage_run.log_metrics(_final_metrics(summary))
        stage_run.log_artifact(out_dir / "summary.json")
        sample = "\n".join(r.instruction for r in state.accepted[:50])
        stage_run.log_text(sample, "sample_instructions.txt")
    return InstructionsResult(out_dir, summary)


def execute(
    config: RunConfig,
    out_dir: Path,
    *,
    workspace: Path,
    on_round: Callable[[Bootstrap], None] | None = None,
    force_resume: bool = False,
) -> InstructionsResult:
    """Check the seed input and the tracking store, then load the configured model and run."""
    check(config, out_dir, workspace, force_resume=force_resume)
    threads.use_share_of_cores()
    backend = backend_for(config)
    return run(
        config,
        out_dir,
        backend,
        workspace=workspace,
        on_round=on_round,
        force_resume=force_resume,
    )


def check(config: RunConfig, out_dir: Path, workspace: Path, *, force_resume: bool = False) -> None:
    """Everything that can fail without a model: the seeds, a resume's settings, MLflow."""
    load_seeds(config)
    journal = out_dir / JOURNAL
    if journal.is_file() and (events := records.read_journal(journal)):
        _check_resume(journal, events, config, force_resume=force_resume)
    tracking.connect(workspace)
