"""Stage 3: Self-Instruct's post-processing rules, scoring, sharding and merge, exports, CLI."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from cli_runner import cli_output
from local_paths import ABSOLUTE_PATH

from refine_af import postprocess
from refine_af.config import load_config
from refine_af.errors import InputError
from refine_af.feedback import CompositeReward
from refine_af.generation import Completion, SamplingParams, TransformersBackend
from refine_af.instances_format import Instance
from refine_af.records import ExampleRecord, InstructionRecord, read_records
from refine_af.stages import instances

RECORD = InstructionRecord(
    id="machine_000007", instruction="Name a fruit.", is_classification=False, source="machine"
)
LABELS = InstructionRecord(
    id="machine_000008", instruction="Is it positive?", is_classification=True, source="machine"
)
JUDGE_SCORERS = {
    "llm_judge.helpfulness",
    "llm_judge.naturalness",
    "llm_judge.coherence",
    "llm_judge.understandability",
}
DATASET_FILES = [
    "examples.jsonl",
    "filtered.jsonl",
    "quarantine.jsonl",
    "alpaca.json",
    "dataset/README.md",
]
STAGE2_RUN_ID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
ADAPTER_URI = "s3://refine-af/pipeline/run-7/rlaf/policy/adapter"


def parquet_files(out_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(out_dir)) for p in (out_dir / "dataset").rglob("*.parquet"))


def done(text: str) -> Completion:
    return Completion(text, "stop", 10)


def cut(text: str) -> Completion:
    return Completion(text, "length", 64)


def reasons(entries: Sequence[dict]) -> list[str]:
    return [entry["reason"] for entry in entries]


# ---------------------------------------------------------------- post-processing rules


def test_an_instance_cut_by_the_token_limit_is_quarantined_but_a_finished_one_is_kept():
    screened = postprocess.screen(
        RECORD, [cut(" apple\nOutput: red fru"), cut(" apple\nOutput: red\nInput: pe")]
    )
    assert reasons(screened.quarantined) == ["truncated"]
    assert screened.quarantined[0]["id"] == "machine_000007-000"
    assert [c.instance for c in screened.candidates] == [Instance("Name a fruit.", "apple", "red")]
    assert screened.candidates[0].sample == 1


def test_a_completion_without_an_output_is_quarantined_with_its_text():
    screened = postprocess.screen(RECORD, [done(" just some words")])
    assert reasons(screened.quarantined) == ["missing_output"]
    assert screened.quarantined[0]["text"] == " just some words"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (" pear\nOutput: pear", "input_equals_output"),
        (" pear\nOutput:   ", "empty_output"),
        (" Fruit:\nOutput: pear", "ends_with_colon"),
        (" pear\nOutput: Answer:", "ends_with_colon"),
    ],
)
def test_self_instruct_instance_rules(text, reason):
    screened = postprocess.screen(RECORD, [done(text)])
    assert reasons(screened.filtered) == [reason]
    assert not screened.candidates and not screened.quarantined


def test_self_instruct_completions_number_samples_over_their_instances():
    text = (
        "Example 1\nInput: a\nOutput: b\nExample 2\nInput: c\nOutput: c\n"
        "Example 3\nInput: d\nOutput: e"
    )
    result = postprocess.screen(RECORD, [done(text), cut(text)], "self_instruct", 5)
    assert [c.sample for c in result.candidates] == [0, 2]  # sample 3 repeats sample 0
    assert [c.instance.output for c in result.candidates] == ["b", "e"]
    assert reasons(result.filtered) == ["input_equals_output", "input_equals_output", "duplicate"]
    assert reasons(result.quarantined) == ["truncated"]  # the cut completion's last example
    assert result.quarantined[0]["id"] == "machine_000007-005"
    total = len(result.candidates) + len(result.filtered) + len(result.quarantined)
    assert total == 6  # 3 instances in each completion


def test_rules_return_none_for_a_good_instance():
    assert postprocess.rule_violation(Instance("Name a fruit.", "", "Apple")) is None


def test_same_input_different_outputs_drops_every_instance_of_the_task():
    texts = [" 2+2\nOutput: 4", " 3+3\nOutput: 6", " 2+2\nOutput: 5"]
    screened = postprocess.screen(RECORD, [done(t) for t in texts])
    assert not screened.candidates
    assert reasons(screened.filtered) == ["conflicting_outputs"] * 3


def test_different_outputs_without_input_are_not_a_conflict():
    texts = ["\nOutput: Apple", "\nOutput: Kiwi"]
    screened = postprocess.screen(RECORD, [done(t) for t in texts])
    assert [c.instance.output for c in screened.candidates] == ["Apple", "Kiwi"]


def test_exact_duplicates_are_dropped_keeping_the_first():
    texts = [" a\nOutput: b", " a\nOutput: b", " c\nOutput: d"]
    screened = postprocess.screen(RECORD, [done(t) for t in texts])
    assert [c.sample for c in screened.candidates] == [0, 2]
    assert reasons(screened.filtered) == ["duplicate"]
    assert screened.filtered[0]["id"] == "machine_000007-001"


def test_classification_tasks_are_written_output_first():
    screened = postprocess.screen(LABELS, [done(" Positive\nInput: I loved it.")])
    assert screened.candidates[0].instance == Instance("Is it positive?", "I loved it.", "Positive")


def test_cap_keeps_the_earliest_and_threshold_applies_first():
    candidates = [
        postprocess.Candidate(k, Instance("Name a fruit.", "", f"fruit {k}")) for k in range(4)
    ]
    kept, filtered = postprocess.select(
        RECORD, candidates, [0.9, 0.1, 0.8, 0.7], min_reward=0.5, cap=2
    )
    assert kept == [0, 2]
    assert reasons(filtered) == ["below_min_reward", "over_cap"]
    assert filtered[1]["reward"] == 0.7
    kept, filtered = postprocess.select(RECORD, candidates, [0.0] * 4, min_reward=None, cap=3)
    assert kept == [0, 1, 2] and reasons(filtered) == ["over_cap"]


def test_shard_spec_is_checked_and_blocks_are_contiguous():
    assert instances.Shard.parse("1/3") == instances.Shard(1, 3)
    for bad in ("3/3", "x/2", "1", "-1/2"):
        with pytest.raises(InputError, match="expected i/n"):
            instances.Shard.parse(bad)
    ranges = [list(instances.Shard(i, 3).blocks(7)) for i in range(3)]
    assert [b for r in ranges for b in r] == list(range(7))


# ---------------------------------------------------------------- the stage, with a fake model

WORDS = ["apple", "pear", "kiwi", "plum", "fig", "lime"]


class SeededWriter:
    """A deterministic stand-in for a sampling model: what it writes depends on the call's
    seed and the prompt's position in the call, as a seeded batched sampler's does."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, *, chat: bool = False
    ) -> list[Completion]:
        self.calls.append(len(prompts))
        rng = random.Random(params.seed)
        results = []
        for prompt in prompts:
            a, b = rng.choice(WORDS), rng.choice(WORDS)
            if prompt.endswith("Class label:"):
                results.append(done(f" {a.title()}\nInput: a {b}"))
                continue
            kind = rng.randrange(8)
            text, finish = {
                0: (f" {a}\nOutput: {b} {a}", "stop"),
                1: (f" {a}\nOutput: {a}", "stop"),
                2: (f" {a}\nOutput:", "stop"),
                3: (f" {a}\nOutput: {b} and", "length"),
                4: (f" {a} {b}", "stop"),
                5: (f" {a}\nOutput: {b}:", "stop"),
                6: (f"\nOutput: {b} {a}!", "stop"),
                7: (f" nan\nOutput: {b} nan", "stop"),
            }[kind]
            results.append(Completion(text, finish, 10))
        return results

    def yes_probability(self, prompts: Sequence[str]) -> list[float]:
        return [0.5] * len(prompts)


class LengthScorer:
    """Scores an output by its length; NaN when it contains "nan"."""

    def __init__(self, name: str) -> None:
        self.name = name

    def score(self, items: Sequence[Instance]) -> list[float]:
        return [math.nan if "nan" in i.output else len(i.output) / 10 for i in items]


def fake_reward(config) -> CompositeReward:
    names = [c.scorer for c in config.stage2.reward.components]
    return CompositeReward.from_settings(config.stage2.reward, {n: LengthScorer(n) for n in names})


def write_instructions(path: Path, count: int) -> Path:
    rows = [
        {"id": "seed_task_0", "instruction": "Sort it.", "is_classification": False,
         "source": "seed"},
        *(
            {"id": f"machine_{k:06d}", "instruction": f"Task number {k}.",
             "is_classification": k % 5 == 4, "source": "machine"}
            for k in range(count)
        ),
    ]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def stage_config(*extra: str):
    return load_config(
        "local-cpu",
        [
            "generation.batch_size=8",
            "stage3.samples_per_instruction=4",
            "stage3.max_per_instruction=3",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One local MLflow store for the module: creating one costs seconds."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        yield tmp_path_factory.mktemp("ws")


@pytest.fixture(scope="module")
def instructions_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_instructions(tmp_path_factory.mktemp("in") / "instructions.jsonl", 11)


@pytest.fixture(scope="module")
def whole_run(instructions_file: Path, workspace: Path, tmp_path_factory) -> Path:
    config = stage_config()
    out = tmp_path_factory.mktemp("whole")
    writer = SeededWriter()
    instances.run(config, instructions_file, out, writer, fake_reward(config), workspace=workspace)
    assert writer.calls == [8, 8, 8, 8, 8, 4]  # 2 instructions × 4 samples per block
    return out


@pytest.fixture(scope="module")
def rl_run(instructions_file: Path, workspace: Path, tmp_path_factory) -> Path:
    """The same instructions written "by stage 2's adapter": the RL policy's export."""
    stage2 = tmp_path_factory.mktemp("rlaf")
    (stage2 / "adapter").mkdir()
    (stage2 / "adapter" / instances.ADAPTER_WEIGHTS).write_bytes(b"lora weights")
    (stage2 / "summary.json").write_text(json.dumps({"run_id": STAGE2_RUN_ID}))
    config = stage_config(f"stage3.adapter={stage2 / 'adapter'}")
    out = tmp_path_factory.mktemp("rl")
    instances.run(
        config, instructions_file, out, SeededWriter(), fake_reward(config),
        workspace=workspace, adapter_uri=ADAPTER_URI,
    )  # fmt: skip
    return out


def test_counts_reconcile_and_every_example_is_scored(whole_run: Path):
    summary = json.loads((whole_run / "summary.json").read_text())
    assert summary["instructions"] == 11 and summary["generations"] == 44
    filtered = sum(summary["filtered"].values())
    quarantined = sum(summary["quarantined"].values())
    assert summary["kept"] + filtered + quarantined == summary["generations"]
    assert {"input_equals_output", "empty_output", "ends_with_colon"} <= set(summary["filtered"])
    assert {"truncated", "missing_output", "nonfinite"} <= set(summary["quarantined"])
    examples = read_records(whole_run / "examples.jsonl", ExampleRecord)
    assert len(examples) == summary["kept"] > 0
    assert all(e.instruction_id.startswith("machine_") for e in examples)  # sources: machine
    for example in examples:
        assert set(example.scores) == JUDGE_SCORERS
        assert example.reward == pytest.approx(sum(example.scores.values()))
        assert example.policy == "base"
    per_task: dict[str, int] = {}
    for example in examples:
        per_task[example.instruction_id] = per_task.get(example.instruction_id, 0) + 1
    assert max(per_task.values()) <= 3
    assert len({e.id for e in examples}) == len(examples)


def test_exports_parquet_card_and_alpaca(whole_run: Path):
    from datasets import load_dataset

    summary = json.loads((whole_run / "summary.json").read_text())
    dataset = load_dataset(str(whole_run / "dataset"), split="train")
    assert len(dataset) == summary["kept"]
    examples = read_records(whole_run / "examples.jsonl", ExampleRecord)
    assert dataset[0]["id"] == examples[0].id
    assert dataset[0]["scores"] == examples[0].scores
    card = (whole_run / "dataset" / "README.md").read_text()
    assert "license: apache-2.0" in card
    assert summary["config_hash"] in card and summary["instructions_sha256"] in card
    assert f"{summary['kept']} kept" in card and "| ends_with_colon |" in card
    assert "model: `smollm2-135m-instruct`" in card
    alpaca = json.loads((whole_run / "alpaca.json").read_text())
    assert alpaca[0] == {k: getattr(examples[0], k) for k in ("instruction", "input", "output")}
    assert len(alpaca) == len(examples)


def own_rows(out_dir: Path) -> list[tuple[str, str]]:
    return [(e.id, e.policy) for e in read_records(out_dir / "examples.jsonl", ExampleRecord)]


def test_two_exports_load_back_as_themselves_with_one_cache(
    whole_run: Path, rl_run: Path, tmp_path: Path
):
    """Regression: with one cache, datasets 5.2 returned the first export for the second."""
    from datasets import load_dataset

    cache = str(tmp_path / "hf-cache")
    assert (whole_run / "dataset").name == (rl_run / "dataset").name
    for out_dir in (rl_run, whole_run, rl_run):
        dataset = load_dataset(str(out_dir / "dataset"), split="train", cache_dir=cache)
        assert list(zip(dataset["id"], dataset["policy"], strict=True)) == own_rows(out_dir)


def test_two_exports_load_back_as_themselves_through_the_parquet_builder(
    whole_run: Path, rl_run: Path, tmp_path: Path
):
    from datasets import load_dataset

    cache = str(tmp_path / "hf-cache")
    for out_dir in (rl_run, whole_run):
        files = str(out_dir / "dataset" / "data" / "*.parquet")
        dataset = load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
        assert list(zip(dataset["id"], dataset["policy"], strict=True)) == own_rows(out_dir)


def test_a_new_export_to_the_same_folder_replaces_the_old_parquet(whole_run: Path, tmp_path):
    from refine_af import exports

    folder = tmp_path / "dataset"
    examples = read_records(whole_run / "examples.jsonl", ExampleRecord)
    first = exports.write_parquet(folder, examples, sorted(JUDGE_SCORERS))
    second = exports.write_parquet(folder, examples[:2], sorted(JUDGE_SCORERS))
    assert first != second
    assert [str(p.relative_to(folder)) for p in folder.rglob("*.parquet")] == [second]


def test_cards_name_durable_references_not_local_paths(whole_run: Path, rl_run: Path):
    rl_card = (rl_run / "dataset" / "README.md").read_text()
    weights = hashlib.sha256(b"lora weights").hexdigest()
    summary = json.loads((rl_run / "summary.json").read_text())
    for reference in (ADAPTER_URI, STAGE2_RUN_ID, weights, summary["config_hash"]):
        assert reference in rl_card
    assert "policy-rl" in rl_card
    for card in (rl_card, (whole_run / "dataset" / "README.md").read_text()):
        assert ABSOLUTE_PATH.findall(card) == [], card


def test_the_absolute_path_check_can_fail():
    assert ABSOLUTE_PATH.findall("adapter: `/tmp/ws/kfp/run/rlaf/policy/adapter`") == ["/tmp"]
    assert ABSOLUTE_PATH.findall("s3://bucket/key, n<1K, 1/4, and/or") == []


@pytest.mark.parametrize("count", [1, 3])
def test_merged_shards_are_byte_identical_to_one_run(
    count: int, instructions_file: Path, whole_run: Path, workspace: Path, tmp_path: Path
):
    config = stage_config()
    shard_dirs = []
    for index in reversed(range(count)):  # the order shards finish in does not matter
        shard_dir = tmp_path / f"shard-{index}"
        instances.run(
            config, instructions_file, shard_dir, SeededWriter(), fake_reward(config),
            workspace=workspace, shard=instances.Shard(index, count),
        )  # fmt: skip
        shard_dirs.append(shard_dir)
    merged = instances.merge(shard_dirs, tmp_path / "merged", workspace=workspace)
    assert parquet_files(merged.out_dir) == parquet_files(whole_run)
    for name in [*DATASET_FILES, *parquet_files(whole_run)]:
        assert (merged.out_dir / name).read_bytes() == (whole_run / name).read_bytes(), name
    whole = json.loads((whole_run / "summary.json").read_text())
    assert {k: v for k, v in merged.summary.items() if k not in {"seconds", "shards"}} == {
        k: v for k, v in whole.items() if k not in {"seconds", "shards"}
    }


def test_merge_refuses_incomplete_or_mixed_shards(
    instructions_file: Path, workspace: Path, tmp_path: Path
):
    def shard(index: int, count: int, *extra: str) -> Path:
        config = stage_config(*extra)
        out = tmp_path / f"s{index}of{count}{len(extra)}"
        instances.run(
            config, instructions_file, out, SeededWriter(), fake_reward(config),
            workspace=workspace, shard=instances.Shard(index, count),
        )  # fmt: skip
        return out

    first, last = shard(0, 2), shard(1, 2)
    with pytest.raises(InputError, match=r"shards 0..1 once each; got \[0\]"):
        instances.merge([first], tmp_path / "m1", workspace=workspace)
    with pytest.raises(InputError, match=r"got \[0, 0, 1\]"):
        instances.merge([first, first, last], tmp_path / "m2", workspace=workspace)
    other = shard(1, 2, "stage3.min_reward=0.5")
    with pytest.raises(InputError, match="config_hash"):
        instances.merge([first, other], tmp_path / "m3", workspace=workspace)
    with pytest.raises(InputError, match="not a stage 3 shard folder"):
        instances.merge([tmp_path], tmp_path / "m4", workspace=workspace)
    assert not any((tmp_path / f"m{k}").exists() for k in range(1, 5))


def test_min_reward_filters_and_is_counted(instructions_file: Path, workspace: Path, tmp_path):
    config = stage_config("stage3.min_reward=4.0")
    result = instances.run(
        config, instructions_file, tmp_path, SeededWriter(), fake_reward(config),
        workspace=workspace,
    )  # fmt: skip
    assert result.summary["filtered"]["below_min_reward"] > 0
    assert all(e.reward >= 4.0 for e in read_records(tmp_path / "examples.jsonl", ExampleRecord))


# ---------------------------------------------------------------- a real model


@pytest.mark.slow
def test_a_real_sampling_model_merges_identically(
    tiny_causal_lm_dir: Path, tiny_lora_adapter_dir: Path, workspace: Path, tmp_path: Path
):
    """Base + adapter, merged, sampling at temperature 0.7: shards reproduce the whole run."""
    config = stage_config(
        f"model.base={tiny_causal_lm_dir}",
        f"stage3.adapter={tiny_lora_adapter_dir}",
        "stage3.max_new_tokens=8",
    )
    instances.check_adapter(config)
    backend = TransformersBackend.from_reference(
        instances.policy_reference(config), device="cpu", batch_size=8
    )
    instructions_file = write_instructions(tmp_path / "instructions.jsonl", 4)
    whole = instances.run(
        config, instructions_file, tmp_path / "whole", backend, fake_reward(config),
        workspace=workspace,
    )  # fmt: skip
    assert whole.summary["policy"] == "rl" and whole.summary["generations"] == 16
    shard_dirs = []
    for index in range(2):
        shard_dir = tmp_path / f"shard-{index}"
        instances.run(
            config, instructions_file, shard_dir, backend, fake_reward(config),
            workspace=workspace, shard=instances.Shard(index, 2),
        )  # fmt: skip
        shard_dirs.append(shard_dir)
    merged = instances.merge(shard_dirs, tmp_path / "merged", workspace=workspace)
    for name in ("examples.jsonl", "filtered.jsonl", "quarantine.jsonl"):
        assert (merged.out_dir / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    texts = [json.loads(line)["text"] for line in (tmp_path / "whole" / "quarantine.jsonl").open()]
    assert len(set(texts)) > 1  # it sampled


# ---------------------------------------------------------------- CLI and bad input


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda p, t, a: ["-i", str(bad_file(p))], ":2: field 'is_classification': Field required"),
        (lambda p, t, a: ["-i", str(p / "none.jsonl")], "none.jsonl: file not found"),
        (
            lambda p, t, a: ["-i", str(write_instructions(p / "i.jsonl", 0))],
            "no instructions from machine",
        ),
        (lambda p, t, a: ["-i", str(good_file(p)), "--adapter", str(a)], "was trained on base"),
        (lambda p, t, a: ["-i", str(good_file(p)), "--adapter", str(t)], "not a LoRA adapter"),
        (lambda p, t, a: ["-i", str(good_file(p)), "--shard", "2/2"], "expected i/n"),
    ],
    ids=["missing-field", "missing-file", "no-machine", "other-base", "not-adapter", "shard"],
)
def test_bad_input_exits_2_and_writes_nothing(
    make_args, message, tmp_path, tiny_causal_lm_dir, tiny_lora_adapter_dir, monkeypatch, capsys
):
    out = tmp_path / "out"
    args = make_args(tmp_path, tiny_causal_lm_dir, tiny_lora_adapter_dir)
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", "instances", "-o", str(out),
        "--workspace", str(tmp_path / "ws"), *args,
    )  # fmt: skip
    assert code == 2, err
    assert message in err
    assert not out.exists() and not (tmp_path / "ws").exists()


def test_merge_of_a_missing_shard_exits_2(tmp_path, monkeypatch, capsys):
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", "merge", str(tmp_path / "nope"), "-o", str(tmp_path / "o")
    )
    assert code == 2 and "not a stage 3 shard folder" in err
    assert not (tmp_path / "o").exists()


def good_file(path: Path) -> Path:
    return write_instructions(path / "good.jsonl", 2)


def bad_file(path: Path) -> Path:
    lines = write_instructions(path / "x.jsonl", 2).read_text().splitlines()
    lines[1] = lines[1].replace('"is_classification"', '"is_clf"')
    (path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    return path / "bad.jsonl"


@pytest.mark.slow
def test_cli_shards_and_merge_print_summary_tables(
    tiny_causal_lm_dir: Path, workspace: Path, tmp_path: Path, monkeypatch, capsys
):
    instructions_file = write_instructions(tmp_path / "instructions.jsonl", 3)
    sets = [
        arg
        for item in (
            f"model.base={tiny_causal_lm_dir}",
            f"stage2.scorers.llm_judge.model={tiny_causal_lm_dir}",
            "stage3.max_new_tokens=8",
            "stage3.samples_per_instruction=4",
            "generation.batch_size=4",
        )
        for arg in ("--set", item)
    ]
    common = ["-i", str(instructions_file), "--workspace", str(workspace), *sets]
    for index in range(2):
        out = tmp_path / f"shard-{index}"
        code, stdout, err = cli_output(
            monkeypatch, capsys, "stage", "instances", "-o", str(out), "--shard", f"{index}/2",
            *common,
        )  # fmt: skip
        assert code == 0, err
        assert f"shard {index}/2" in stdout and "completions sampled" in stdout
    code, stdout, err = cli_output(
        monkeypatch, capsys, "stage", "merge", str(tmp_path / "shard-1"), str(tmp_path / "shard-0"),
        "-o", str(tmp_path / "merged"), "--workspace", str(workspace),
    )  # fmt: skip
    assert code == 0, err
    assert "stage 3 · instances (base policy)" in stdout
    summary = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert summary["instructions"] == 3 and summary["generations"] == 12 and summary["shards"] == 2
