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
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from refine_af import journal, records, storage, threads, tracking
from refine_af.bootstrap import Bootstrap
from refine_af.config import RunConfig
from refine_af.data import seed_tasks_path
from refine_af.errors import InputError
from refine_af.generation import GenerationBackend, SamplingParams, backend_for
from refine_af.records import InstructionRecord, SeedTask
from refine_af.results import StageResult
from refine_af.self_instruct import ClassificationDetector

JOURNAL = journal.JOURNAL
OUTPUT_FILES = ("instructions.jsonl", "filtered.jsonl", "quarantine.jsonl", "summary.json")


# ---------------------------------------------------------------- running the stage


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


MAY_CHANGE = "stage1.num_instructions and max_rounds"


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
) -> StageResult:
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
    journal_path, events = journal.open_journal(
        out_dir,
        _resume_key(config),
        config.config_hash(),
        force_resume=force_resume,
        may_change=MAY_CHANGE,
    )
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
            records.append_jsonl(journal_path, round_events)
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
    return StageResult(out_dir, summary)


def execute(
    config: RunConfig,
    out_dir: Path,
    *,
    workspace: Path,
    on_round: Callable[[Bootstrap], None] | None = None,
    force_resume: bool = False,
) -> StageResult:
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
    journal.check(out_dir, _resume_key(config), force_resume=force_resume, may_change=MAY_CHANGE)
    tracking.connect(workspace)
