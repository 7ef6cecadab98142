"""`make experiment`'s driver and results page, on a hand-made experiment folder (no model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import paper_claim
import results_page

from refine_af import records
from refine_af.records import InstructionRecord


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _example(arm: str, instruction_id: str, n: int, reward: float) -> dict:
    return {
        "id": f"{arm}-{instruction_id}-{n}", "instruction_id": instruction_id,
        "instruction": f"do {instruction_id}", "input": "", "output": f"{arm} {n}",
        "reward": reward, "policy": arm,
    }  # fmt: skip


def _comparison(deltas: dict[str, float]) -> dict:
    per_task = [
        {"task": t, "category": None, "candidate": 10 + d, "baseline": 10.0, "delta": d,
         "outcome": "improved" if d > 0 else "worse" if d < 0 else "tie"}
        for t, d in deltas.items()
    ]  # fmt: skip
    improved = sum(d > 0 for d in deltas.values())
    return {
        "tasks": len(deltas), "improved": improved, "ties": sum(d == 0 for d in deltas.values()),
        "worse": sum(d < 0 for d in deltas.values()),
        "pct_improved": 100 * improved / len(deltas), "mean_delta": 1.0, "ci_low": 0.5,
        "ci_high": 1.5, "candidate_rougeL": 11.0, "baseline_rougeL": 10.0, "categories": {},
        "per_task": per_task,
    }  # fmt: skip


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The outputs every stage of an experiment leaves, with made-up figures."""
    instructions = [("s1", "seed"), *((f"m{i}", "machine") for i in range(3))]
    _write_jsonl(
        tmp_path / "stage1" / "instructions.jsonl",
        [{"id": i, "instruction": f"do {i}", "source": source, "is_classification": False}
         for i, source in instructions],
    )  # fmt: skip
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "summary.json").write_text(json.dumps({"steps": 20}))
    _write_jsonl(tmp_path / "stage2" / "metrics.jsonl",
                 [{"step": s, "reward": s / 10} for s in range(1, 21)])  # fmt: skip
    for arm in ("base", "rl"):
        _write_jsonl(tmp_path / f"stage3-{arm}" / "examples.jsonl",
                     [_example(arm, "m0", 0, 1.0), _example(arm, "m0", 1, 2.0),
                      _example(arm, "m1" if arm == "rl" else "m2", 0, 1.5)])  # fmt: skip
        (tmp_path / f"stage3-{arm}" / "summary.json").write_text(
            json.dumps({"instructions": 3, "kept": 3, "mean_reward": 1.5})
        )
        (tmp_path / f"stage4-{arm}-lr0.001").mkdir()
        (tmp_path / f"stage4-{arm}-lr0.001" / "summary.json").write_text(
            json.dumps({"eval_loss_before": 2.0, "eval_loss": 1.5})
        )
    (tmp_path / "stage5").mkdir()
    comparison = _comparison({"task1385_anli_r1_entailment": 2.0, "task_unknown": -1.0})
    (tmp_path / "stage5" / "comparison.json").write_text(json.dumps(comparison))
    return tmp_path


def _curve(points: list[tuple[int, float]]) -> list[dict]:
    return [{"step": s, "reward": r} for s, r in points]


def test_the_curve_flattens_at_the_first_point_no_later_one_beats() -> None:
    curve = _curve([(0, 0.1), (10, 0.5), (20, 0.8), (30, 0.84)])
    assert results_page.flattening_step(curve) == 20
    assert "flattens from step 20" in results_page.curve_sentence(curve, 30)
    rising = _curve([(0, 0.1), (10, 0.5), (20, 0.9)])
    assert "still rising at the last checkpoint" in results_page.curve_sentence(rising, 20)


def test_the_best_checkpoint_is_the_policy_or_the_last_when_none_beats_the_base() -> None:
    assert (
        paper_claim.pick_policy(_curve([(0, 0.1), (10, 0.5), (20, 0.5), (30, 0.3)]))["step"] == 10
    )
    worse = _curve([(0, 0.9), (10, 0.5), (20, 0.6)])
    assert paper_claim.pick_policy(worse)["step"] == 20
    assert "no checkpoint beat the base policy" in results_page.curve_sentence(worse, 20)


def test_the_command_shown_is_the_one_that_reruns_it() -> None:
    assert paper_claim.command_line(["--work", "experiment"]) == "make experiment"
    assert paper_claim.command_line(["--work", "/tmp/x", "--heldout", "8"]) == (
        ".venv/bin/python benchmarks/paper_claim.py --work /tmp/x --heldout 8"
    )


def test_the_committed_results_page_has_its_generated_block() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    assert text.count(results_page.BEGIN) == 1 and text.count(results_page.END) == 1


def test_a_page_without_its_markers_is_refused_not_overwritten(work: Path, tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    page.write_text(f"# Results\n\n{results_page.BEGIN}\nno end marker: the discussion follows\n")
    curve = [{"step": 0, "reward": 0.2, "floored": 1, "completions": 8}]
    stage4 = {arm: work / f"stage4-{arm}-lr0.001" for arm in ("base", "rl")}
    outcome = results_page.collect(work, curve, 0, {}, stage4, {0.001: 1.5})
    with pytest.raises(SystemExit, match="needs one"):
        results_page.write(
            page, outcome, {"heldout_reward_rl": 0.2, "heldout_reward_base": 0.2}, "x"
        )
    assert "the discussion follows" in page.read_text()


def test_tasks_get_their_superni_category_and_unknown_ones_are_not_guessed() -> None:
    comparison = _comparison({"task1385_anli_r1_entailment": 2.0, "task_unknown": -1.0})
    filled = results_page.with_categories(
        comparison, json.loads(results_page.CATEGORIES.read_text())
    )
    categories = {r["task"]: r["category"] for r in filled["per_task"]}
    assert categories == {"task1385_anli_r1_entailment": "Textual Entailment", "task_unknown": None}
    assert filled["categories"]["Textual Entailment"]["delta"] == 2.0
    assert filled["categories"]["(none)"]["delta"] == -1.0


def test_every_bundled_superni_task_has_a_category() -> None:
    import gzip

    from refine_af.data import superni_test_path

    with gzip.open(superni_test_path(), "rt") as data:
        tasks = {json.loads(line)["task"] for line in data}
    assert tasks == set(json.loads(results_page.CATEGORIES.read_text()))


def test_examples_side_by_side_come_from_instructions_both_policies_wrote_for(work: Path) -> None:
    pairs = results_page.side_by_side(work)
    assert [(i, b["output"], r["output"]) for i, b, r in pairs] == [("do m0", "base 0", "rl 0")]


def test_a_rerun_rewrites_only_the_generated_block(work: Path, tmp_path: Path) -> None:
    curve = [{"step": 0, "reward": 0.2, "floored": 1, "completions": 8},
             {"step": 10, "reward": 0.4, "floored": 0, "completions": 8}]  # fmt: skip
    stage4 = {arm: work / f"stage4-{arm}-lr0.001" for arm in ("base", "rl")}
    outcome = results_page.collect(work, curve, 10, {"stage 1": 12.5}, stage4, {0.001: 1.5})
    assert outcome.instructions == 3  # machine instructions, not the seeds stage 1 also lists
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text(f"# Results\n\nintro\n\n{results_page.BEGIN}\nold\n{results_page.END}\n\n"
                    "## Discussion\n\nkept by hand\n")  # fmt: skip
    line = {"bench": "paper_claim", "heldout_reward_rl": 0.4, "heldout_reward_base": 0.2}
    results_page.write(page, outcome, line, "make experiment")
    text = page.read_text()
    assert text.startswith("# Results\n\nintro\n\n") and text.endswith("kept by hand\n")
    assert "old" not in text and json.dumps(line) in text
    assert "| Textual Entailment | 1 | 12.00 | 10.00 | +2.00 |" in text
    assert "does not meet the paper's result" in text  # 50% improved is below 63%
    assert "| 0.001 | 1.5 |" in text
    assert (page.parent / "results" / "deltas_by_category.png").stat().st_size > 0
    assert (page.parent / "results" / "reward_curve.png").stat().st_size > 0


def test_rl_trains_on_stage_1_instructions_minus_the_held_out_ones(work: Path) -> None:
    exp = paper_claim.Experiment(work, paper_claim.HERE / "paper_claim.yaml", [])
    path = exp.rl_prompts({"s1", "m1"})
    kept = records.read_records(path, InstructionRecord)
    assert [r.id for r in kept] == ["m0", "m2"]


def test_a_step_whose_output_exists_is_not_run_again(work: Path, monkeypatch) -> None:
    exp = paper_claim.Experiment(work, paper_claim.HERE / "paper_claim.yaml", [])
    monkeypatch.setattr(paper_claim.subprocess, "run", lambda *a, **k: pytest.fail("ran"))
    exp.refine_af("stage 1", exp.instructions, "instructions", "--out", str(work / "stage1"))
    assert "stage 1" not in exp.seconds  # no summary: nothing to count
    (work / "stage1" / "summary.json").write_text(json.dumps({"seconds": 81.5}))
    exp.refine_af("stage 1", exp.instructions, "instructions", "--out", str(work / "stage1"))
    assert exp.seconds["stage 1"] == 81.5  # a stopped driver's step counts its own time


def test_a_checkpoint_becomes_an_adapter_naming_its_base_by_reference(work: Path) -> None:
    adapter = work / "stage2" / "adapter"
    adapter.mkdir()
    (adapter / "tokenizer.json").write_text("{}")
    checkpoint = work / "stage2" / "checkpoints" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
    (checkpoint / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/home/someone/.cache/model", "r": 8})
    )
    exp = paper_claim.Experiment(work, paper_claim.HERE / "paper_claim.yaml", [])
    folder = exp.policy_at(10, checkpoint)
    settings = json.loads((folder / "adapter_config.json").read_text())
    assert settings == {"base_model_name_or_path": "smollm2-135m-instruct", "r": 8}
    assert (folder / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (folder / "tokenizer.json").is_file()
