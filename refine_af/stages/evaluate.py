"""Stage 5: zero-shot SuperNI evaluation of a model, and its comparison with a baseline.

A subject is a model reference (anything ``models.resolve`` takes, LoRA adapters included)
or an earlier ``evaluation.json``, so a baseline scored once can be compared with many
candidates. Prompts hold only the task definition and the input; decoding is greedy. A stage
4 adapter is asked in the template it was fine-tuned in (the definition as the instruction,
the instance input as the input); any other model gets ``stage5.prompt_template``, in its
chat template when ``stage5.chat``. All input is checked before the first model loads; every
output is written atomically, and the scores, report and chart are logged to the stage's
MLflow run.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refine_af import (
    comparison,
    eval_metrics,
    models,
    records,
    report,
    storage,
    superni,
    templates,
    threads,
    tracking,
)
from refine_af.comparison import Comparison
from refine_af.config import RunConfig
from refine_af.errors import InputError
from refine_af.generation import (
    Completion,
    GenerationBackend,
    SamplingParams,
    backend_for,
    length_batches,
)
from refine_af.superni import EvaluationResult, SuperNIInstance

CANDIDATE, BASELINE = "candidate", "baseline"
EVALUATION_FILE, PREDICTIONS_FILE = "evaluation.json", "predictions.jsonl"
COMPARISON_FILE, REPORT_FILE, CHART_FILE = "comparison.json", "report.md", "deltas.png"

ProgressFn = Callable[[str, int, int], None]
"""(subject, instances done, instances total)"""


@dataclass(frozen=True)
class EvaluateOutcome:
    out_dir: Path
    results: dict[str, EvaluationResult]
    comparison: Comparison | None
    run_id: str
    seconds: float


def is_result_file(subject: str) -> bool:
    """An earlier evaluation (``….json``) rather than a model reference."""
    return subject.endswith(".json")


def scored_settings(config: RunConfig) -> dict[str, Any]:
    """Settings that change the scores; a comparison reports any that differ."""
    s = config.stage5
    return {
        "prompt_template": s.prompt_template,
        "chat": s.chat,
        "max_new_tokens": s.max_new_tokens,
        "stop": list(s.stop),
        "dtype": config.model.dtype,
        "data": s.data or "bundled",
        "tasks": s.tasks,
        "per_task": s.per_task,
        "seed": s.seed,
    }


def prompts_for(
    instances: Sequence[SuperNIInstance],
    config: RunConfig,
    template: templates.Template | None,
    tokenizer,
) -> tuple[list[str], bool]:
    """(prompts, wrap in the chat template?): the SFT template when the model has one."""
    if template is None:
        s = config.stage5
        return [superni.encode_prompt(s.prompt_template, i) for i in instances], s.chat
    return [
        templates.render_prompt(template, i.definition.strip(), i.input.strip(), tokenizer)
        for i in instances
    ], False


def generate(
    backend: GenerationBackend,
    prompts: Sequence[str],
    config: RunConfig,
    chat: bool,
    on_batch: Callable[[int], None],
) -> list[Completion]:
    """Greedy completions in prompt order, longest prompts first (less padding)."""
    s = config.stage5
    params = SamplingParams(
        max_new_tokens=s.max_new_tokens, temperature=0.0, stop=tuple(s.stop), seed=s.seed
    )
    completions: list[Completion | None] = [None] * len(prompts)
    for batch in length_batches(prompts, s.batch_size):
        outputs = backend.generate([prompts[i] for i in batch], params, chat=chat)
        for index, completion in zip(batch, outputs, strict=True):
            completions[index] = completion
        on_batch(len(batch))
    return [c for c in completions if c is not None]


def evaluate_model(
    reference: str,
    instances: Sequence[SuperNIInstance],
    config: RunConfig,
    data_uri: str,
    on_batch: Callable[[int], None],
) -> tuple[EvaluationResult, list[dict[str, Any]]]:
    """Score one model on the instances; returns its result and one row per prediction."""
    tokenizer = models.load_tokenizer(reference)
    template = templates.recorded_template(models.resolve(reference))
    prompts, chat = prompts_for(instances, config, template, tokenizer)
    backend = backend_for(
        config,
        reference,
        batch_size=config.stage5.batch_size,
        add_special_tokens=template is not None and templates.adds_special_tokens(template),
    )
    completions = generate(backend, prompts, config, chat, on_batch)
    predictions = [completion.text.strip() for completion in completions]
    scores = [
        superni.rouge_l(prediction, instance.references)
        for prediction, instance in zip(predictions, instances, strict=True)
    ]
    rows = [
        {
            "task": instance.task,
            "id": instance.id,
            "prediction": prediction,
            "rougeL": score,
            "finish_reason": completion.finish_reason,
        }
        for instance, prediction, score, completion in zip(
            instances, predictions, scores, completions, strict=True
        )
    ]
    result = superni.aggregate(
        instances,
        scores,
        model=reference,
        data=data_uri,
        settings={**scored_settings(config), "sft_template": template or "none"},
        truncated=sum(c.finish_reason == "length" for c in completions),
    )
    return result, rows


def _require_subset(result: EvaluationResult, fingerprints: dict[str, str], origin: str) -> None:
    """An earlier result is usable only if it scored exactly the instances selected now."""
    scored = {task: t.ids_sha256 for task, t in result.tasks.items()}
    if scored != fingerprints:
        raise InputError(
            f"{origin}: it was scored on other tasks or instances than stage5 selects now "
            f"({len(scored)} vs {len(fingerprints)} tasks); use the stage5 data, tasks, "
            "per_task and seed it was made with"
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    storage.write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def run(
    config: RunConfig,
    out_dir: Path,
    *,
    candidate: str,
    baseline: str | None = None,
    workspace: Path,
    parent_run_id: str | None = None,
    on_start: Callable[[str, int], None] | None = None,
    on_progress: ProgressFn | None = None,
) -> EvaluateOutcome:
    """Evaluate ``candidate`` (and ``baseline``) on the stage5 subset; compare the two.

    Writes ``<subject>/evaluation.json`` and ``<subject>/predictions.jsonl`` for every
    model evaluated here, ``report.md``, and with a baseline ``comparison.json`` and
    ``deltas.png``; logs all of them with the scores to MLflow. ``on_start`` and
    ``on_progress`` see each model's instance count and progress (progress display).
    """
    threads.use_share_of_cores()
    settings = config.stage5
    subjects = {CANDIDATE: candidate} | ({BASELINE: baseline} if baseline else {})
    results = {
        name: superni.read_result(subject)
        for name, subject in subjects.items()
        if is_result_file(subject)
    }
    to_score = [name for name in subjects if name not in results]
    instances: list[SuperNIInstance] = []
    data_uri = ""
    if to_score:
        everything, data_uri = superni.read_instances(settings.data)
        instances = superni.select(
            everything, settings.tasks, settings.per_task, settings.seed, data_uri
        )
        fingerprints = superni.task_fingerprints(instances)
        for name, result in results.items():
            _require_subset(result, fingerprints, subjects[name])
        for name in to_score:  # an unknown model or a mismatched adapter stops here
            models.adapter_base_location(subjects[name], config.model.base)
    elif baseline:
        comparison.check_comparable(results[CANDIDATE], results[BASELINE])

    started = time.monotonic()
    tags = {
        "refine_af.config_hash": config.config_hash(),
        **{f"refine_af.{name}": subject for name, subject in subjects.items()},
    }
    params = {**config.to_dict(), **{f"subject.{k}": v for k, v in subjects.items()}}
    done = dict.fromkeys(to_score, 0)

    def advance(name: str, count: int) -> None:
        done[name] += count
        if on_progress is not None:
            on_progress(name, done[name], len(instances))

    with tracking.stage_run(
        "evaluate", workspace, params, parent_run_id=parent_run_id, tags=tags, out_dir=out_dir
    ) as stage_run:
        for name in to_score:
            if on_start is not None:
                on_start(name, len(instances))
            result, rows = evaluate_model(
                subjects[name], instances, config, data_uri, functools.partial(advance, name)
            )
            artifact = f"{name}/{EVALUATION_FILE}"
            result = result.model_copy(
                update={"mlflow_run_id": stage_run.run_id, "mlflow_artifact": artifact}
            )
            records.write_jsonl(out_dir / name / PREDICTIONS_FILE, rows)
            _write_json(out_dir / name / EVALUATION_FILE, result.model_dump(mode="json"))
            stage_run.log_artifact(out_dir / name / EVALUATION_FILE, artifact_path=name)
            stage_run.log_artifact(out_dir / name / PREDICTIONS_FILE, artifact_path=name)
            results[name] = result
        for name, result in results.items():
            stage_run.log_metrics(eval_metrics.of_result(result, name))

        compared = None
        if baseline:
            compared = comparison.compare(
                results[CANDIDATE],
                results[BASELINE],
                tie_tolerance=settings.tie_tolerance,
                bootstrap_samples=settings.bootstrap_samples,
                seed=settings.seed,
            )
            _write_json(out_dir / COMPARISON_FILE, compared.model_dump(mode="json"))
            report.plot_deltas(compared, out_dir / CHART_FILE)
            storage.write_text(out_dir / REPORT_FILE, report.comparison_markdown(compared))
            stage_run.log_metrics(eval_metrics.of_comparison(compared))
            stage_run.log_artifact(out_dir / COMPARISON_FILE)
            stage_run.log_artifact(out_dir / CHART_FILE)
        else:
            storage.write_text(
                out_dir / REPORT_FILE, report.evaluation_markdown(results[CANDIDATE])
            )
        stage_run.log_artifact(out_dir / REPORT_FILE)
    return EvaluateOutcome(
        out_dir, results, compared, stage_run.run_id, round(time.monotonic() - started, 1)
    )
