"""Stage 3: instances for stage 1's instructions, written by the stage 2 policy.

Each instruction gets ``samples_per_instruction`` sampled completions of the same prompt
stage 2 trained on, in ``stage3.format``: several instances per completion as Self-Instruct
writes them, or one each (input-first, or output-first for classification tasks;
``refine_af.instances_format``); Self-Instruct's post-processing sorts them into kept,
filtered and quarantined, and stage 2's composite reward scores every kept example. With no
adapter the base model writes them: the paper's baseline.

Sharding: instructions are generated in fixed blocks (as many as fill one generation
batch), each with a seed derived from its first instruction's id, and scored block by
block. A shard is a contiguous range of blocks, so what a block produces does not depend
on the shard that ran it, and ``merge`` (concatenation in shard order) gives the same
bytes whatever the number of shards.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from refine_af import exports, models, postprocess, records, storage, threads, tracking
from refine_af.config import RunConfig
from refine_af.endpoint import judge_endpoint
from refine_af.errors import InputError
from refine_af.feedback import NONFINITE, CompositeReward, RewardBatch, build_scorers
from refine_af.generation import GenerationBackend, SamplingParams, backend_for
from refine_af.instances_format import Parsed, build_prompt, stop_strings
from refine_af.records import ExampleRecord, InstructionRecord

EXAMPLES, FILTERED, QUARANTINE = "examples.jsonl", "filtered.jsonl", "quarantine.jsonl"
SHARD_INFO, SUMMARY, ALPACA, DATASET_DIR = "shard.json", "summary.json", "alpaca.json", "dataset"
SAMPLES_LOGGED = 32
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SHARD_KEYS = frozenset(
    (
        "shard",
        "shards",
        "config",
        "config_hash",
        "instructions_sha256",
        "instructions",
        "generations",
    )
)

Policy = Literal["rl", "base"]


# ---------------------------------------------------------------- inputs


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


def load_instructions(path: str | Path, config: RunConfig) -> list[InstructionRecord]:
    """Stage 1's instructions of the configured sources, in file order."""
    every = records.read_records(path, InstructionRecord, config.limits.by_field())
    duplicates = sorted(k for k, n in Counter(r.id for r in every).items() if n > 1)
    if duplicates:
        raise InputError(f"{path}: instruction ids must be unique; repeated: {duplicates[:5]}")
    sources = config.stage3.sources
    chosen = [r for r in every if r.source in sources]
    if not chosen:
        raise InputError(f"{path}: no instructions from {' or '.join(sources)} (stage3.sources)")
    return chosen


def policy(config: RunConfig) -> Policy:
    return "rl" if config.stage3.adapter else "base"


def policy_reference(config: RunConfig) -> str:
    """What writes the instances: stage 2's adapter (on its base) or the base model."""
    return config.stage3.adapter or config.model.base


def adapter_reference(adapter: str | None, uri: str | None = None) -> dict[str, Any] | None:
    """Durable names of stage 2's adapter for the dataset card: its weights' digest, the MLflow
    run that trained it (from stage 2's summary.json beside it) and its artifact URI (``uri``,
    e.g. the KFP artifact's ``s3://…``; ``adapter`` itself when that is an s3 URI)."""
    if adapter is None:
        return None
    folder = str(adapter).rstrip("/")
    weights = f"{folder}/{ADAPTER_WEIGHTS}"
    stage2_summary = f"{folder.rsplit('/', 1)[0]}/{SUMMARY}" if "/" in folder else SUMMARY
    run_id = None
    if storage.exists(stage2_summary):
        run_id = json.loads(storage.read_text(stage2_summary)).get("run_id")
    remote = uri if uri and "://" in uri else (folder if storage.is_s3(folder) else None)
    return {
        "sha256": file_sha256(weights) if storage.exists(weights) else None,
        "uri": remote,
        "mlflow_run_id": run_id,
    }


def check_adapter(config: RunConfig) -> None:
    """A configured adapter must be a LoRA folder trained on ``model.base``."""
    adapter = config.stage3.adapter
    if adapter is None:
        return
    if models.adapter_base(models.resolve(adapter)) is None:
        raise InputError(
            f"stage3.adapter {adapter!r} is not a LoRA adapter folder (no adapter_config.json); "
            "pass stage 2's out/adapter"
        )
    models.adapter_base_location(adapter, expected_base=config.model.base)


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


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(storage.read_bytes(str(path))).hexdigest()


# ---------------------------------------------------------------- generation


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


# ---------------------------------------------------------------- outputs


def _read_entries(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    entries = []
    for lineno, line in enumerate(records.jsonl_lines(path.read_text(encoding="utf-8")), start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
    return entries


def _write_records(out_dir: Path, part: Part) -> None:
    records.write_jsonl(out_dir / EXAMPLES, part.examples)
    records.write_jsonl(out_dir / FILTERED, part.filtered)
    records.write_jsonl(out_dir / QUARANTINE, part.quarantined)


def summary_of(
    config: RunConfig,
    part: Part,
    *,
    adapter: dict[str, Any] | None,
    instructions_sha256: str,
    shards: int,
    seconds: float,
) -> dict[str, Any]:
    settings = config.stage3
    return {
        "stage": "instances",
        "config_hash": config.config_hash(),
        "policy": policy(config),
        "model": config.model.base,
        "adapter": adapter,
        "instructions_sha256": instructions_sha256,
        "samples_per_instruction": settings.samples_per_instruction,
        "max_per_instruction": settings.max_per_instruction,
        "min_reward": settings.min_reward,
        "reward": {
            "components": [c.model_dump() for c in config.stage2.reward.components],
            "bias": config.stage2.reward.bias,
        },
        "shards": shards,
        **part.counts(),
        "seconds": round(seconds, 1),
    }


def finalize(out_dir: Path, config: RunConfig, part: Part, summary: dict[str, Any]) -> None:
    """The dataset: records, filtered and quarantined entries, exports, card, summary."""
    _write_records(out_dir, part)
    summary["dataset_sha256"] = file_sha256(out_dir / EXAMPLES)
    score_names = [c.scorer for c in config.stage2.reward.components]
    parquet = exports.write_parquet(out_dir / DATASET_DIR, part.examples, score_names)
    card = exports.dataset_card(summary, config.stage1.seed_tasks, parquet)
    storage.write_text(out_dir / DATASET_DIR / "README.md", card)
    exports.write_alpaca(out_dir / ALPACA, part.examples)
    storage.write_text(out_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")


def _log(stage_run: tracking.StageRun, out_dir: Path, summary: dict[str, Any]) -> None:
    metrics = {k: float(summary[k]) for k in ("instructions", "generations", "kept")}
    for group in ("filtered", "quarantined"):
        metrics.update({f"{group}.{reason}": float(n) for reason, n in summary[group].items()})
    if summary["mean_reward"] is not None:
        metrics["mean_reward"] = summary["mean_reward"]
    stage_run.log_metrics(metrics)
    stage_run.log_dict(summary, SUMMARY)
    lines = records.jsonl_lines((out_dir / EXAMPLES).read_text(encoding="utf-8"))[:SAMPLES_LOGGED]
    stage_run.log_text("".join(line + "\n" for line in lines), "samples.jsonl")


# ---------------------------------------------------------------- running the stage


@dataclass(frozen=True)
class InstancesResult:
    out_dir: Path
    summary: dict[str, Any]


def run(
    config: RunConfig,
    instructions_path: str | Path,
    out_dir: Path,
    backend: GenerationBackend,
    reward: CompositeReward,
    *,
    workspace: Path,
    shard: Shard | None = None,
    adapter_uri: str | None = None,
    on_block: Callable[[int, int, Part], None] | None = None,
) -> InstancesResult:
    """Write instances for the instructions (of one shard, with ``shard``).

    Without ``shard`` the folder gets the whole dataset (records, exports, card). With it,
    the shard's records and ``shard.json`` for ``merge``. Outputs are written at the end;
    ``on_block(instructions done, instructions in total, part so far)`` shows progress.
    """
    mine = assigned_blocks(load_instructions(instructions_path, config), config, shard)
    total = sum(len(b) for b in mine)
    writer = InstanceWriter(config, backend, reward)
    started = time.monotonic()
    tags = {"refine_af.config_hash": config.config_hash(), "refine_af.policy": writer.policy}
    if shard is not None:
        tags["refine_af.shard"] = f"{shard.index}/{shard.count}"
    with tracking.stage_run(
        "instances", workspace, config.to_dict(), tags=tags, out_dir=out_dir
    ) as stage_run:
        part = Part()
        for block in mine:
            part.extend(writer.block(block))
            if on_block is not None:
                on_block(part.instructions, total, part)
        summary = summary_of(
            config,
            part,
            adapter=adapter_reference(config.stage3.adapter, adapter_uri),
            instructions_sha256=file_sha256(instructions_path),
            shards=shard.count if shard else 1,
            seconds=time.monotonic() - started,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        if shard is None:
            finalize(out_dir, config, part, summary)
        else:
            _write_records(out_dir, part)
            info = {**summary, "shard": shard.index, "config": config.to_dict()}
            storage.write_text(out_dir / SHARD_INFO, json.dumps(info, indent=2) + "\n")
        _log(stage_run, out_dir, summary)
    return InstancesResult(out_dir, summary)


def execute(
    config: RunConfig,
    instructions_path: str | Path,
    out_dir: Path,
    *,
    workspace: Path,
    shard: Shard | None = None,
    adapter_uri: str | None = None,
    on_block: Callable[[int, int, Part], None] | None = None,
) -> InstancesResult:
    """Check the inputs, then load the scorers and the policy and run the stage.

    ``adapter_uri`` is where the adapter is kept for good (a KFP artifact's URI) when
    ``stage3.adapter`` is a local copy; the dataset card names it.
    """
    threads.use_share_of_cores(threads.parallel_shards() if shard is not None else 1)
    load_instructions(instructions_path, config)
    check_adapter(config)
    names = [c.scorer for c in config.stage2.reward.components]
    judge = judge_endpoint(config) if any(n.startswith("llm_judge.") for n in names) else None
    scorers = build_scorers(config.stage2.scorers, names, judge_backend=judge)
    reward = CompositeReward.from_settings(config.stage2.reward, scorers)
    backend = backend_for(config, policy_reference(config))
    return run(
        config,
        instructions_path,
        out_dir,
        backend,
        reward,
        workspace=workspace,
        shard=shard,
        adapter_uri=adapter_uri,
        on_block=on_block,
    )


def _read_shard(shard_dir: Path) -> tuple[dict[str, Any], Part]:
    info_path = shard_dir / SHARD_INFO
    if not info_path.is_file():
        raise InputError(f"{shard_dir}: not a stage 3 shard folder (no {SHARD_INFO})")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{info_path}: not valid JSON ({err.msg})") from err
    missing = sorted(SHARD_KEYS - set(info))
    if missing:
        raise InputError(f"{info_path}: missing {', '.join(missing)}")
    part = Part(
        instructions=info["instructions"],
        generations=info["generations"],
        examples=records.read_records(shard_dir / EXAMPLES, ExampleRecord),
        filtered=_read_entries(shard_dir / FILTERED),
        quarantined=_read_entries(shard_dir / QUARANTINE),
    )
    return info, part


def _check_shards(infos: Sequence[dict[str, Any]], shard_dirs: Sequence[Path]) -> None:
    """Every shard of one run, each exactly once."""
    first = infos[0]
    for info, where in zip(infos, shard_dirs, strict=True):
        for key in ("config_hash", "instructions_sha256", "shards"):
            if info[key] != first[key]:
                raise InputError(
                    f"{where}: {key} {info[key]!r} differs from {shard_dirs[0]}'s "
                    f"{first[key]!r}; merge shards of one run only"
                )
    found = sorted(info["shard"] for info in infos)
    if found != list(range(first["shards"])):
        raise InputError(f"merge needs shards 0..{first['shards'] - 1} once each; got {found}")


def merge(shard_dirs: Sequence[Path], out_dir: Path, *, workspace: Path) -> InstancesResult:
    """Join shard folders into the dataset, in shard order (the order of the instructions)."""
    if not shard_dirs:
        raise InputError("merge needs at least one shard folder")
    started = time.monotonic()
    read = [_read_shard(Path(d)) for d in shard_dirs]
    infos = [info for info, _ in read]
    _check_shards(infos, shard_dirs)
    try:
        config = RunConfig.model_validate(infos[0]["config"])
    except ValidationError as err:
        raise InputError(f"{shard_dirs[0]}/{SHARD_INFO}: its config is not valid: {err}") from err
    part = Part()
    for _, shard_part in sorted(read, key=lambda item: item[0]["shard"]):
        part.extend(shard_part)
    summary = summary_of(
        config,
        part,
        adapter=infos[0]["adapter"],
        instructions_sha256=infos[0]["instructions_sha256"],
        shards=infos[0]["shards"],
        seconds=time.monotonic() - started,
    )
    tags = {"refine_af.config_hash": config.config_hash(), "refine_af.policy": policy(config)}
    with tracking.stage_run(
        "instances-merge", workspace, config.to_dict(), tags=tags, out_dir=out_dir
    ) as run_:
        out_dir.mkdir(parents=True, exist_ok=True)
        finalize(out_dir, config, part, summary)
        _log(run_, out_dir, summary)
    return InstancesResult(out_dir, summary)
