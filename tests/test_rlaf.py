"""Stage 2: trl reward functions, inputs, a 2-step training run, resume and CLI bad input."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import cli_output

from refine_af import cli, launch, models, training, trl_rewards
from refine_af.config import PRESETS_DIR, load_config
from refine_af.errors import InputError
from refine_af.feedback import CompositeReward
from refine_af.instances_format import Instance, Parsed, build_prompt
from refine_af.stages import rlaf

INSTRUCTIONS = [
    {"id": "seed_task_0", "instruction": "Sort the numbers.", "is_classification": False},
    {"id": "seed_task_1", "instruction": "Is the review positive?", "is_classification": True},
    {"id": "machine_000000", "instruction": "Name a fruit.", "is_classification": False},
    {"id": "machine_000001", "instruction": "Translate to French.", "is_classification": False},
]


def write_instructions(path: Path, rows: list[dict] = INSTRUCTIONS) -> Path:
    lines = [
        json.dumps({**row, "source": "seed" if row["id"].startswith("seed") else "machine"})
        for row in rows
    ]
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- rewards for trl


class LengthScorer:
    """Scores an output by its length (NaN for "nan"); counts its calls."""

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, 0

    def score(self, instances):
        self.calls += 1
        return [math.nan if i.output == "nan" else float(len(i.output)) for i in instances]


def rewards_of_two(
    max_completion_length: int = 8,
) -> tuple[trl_rewards.TrlRewards, list[LengthScorer]]:
    scorers = [LengthScorer("a"), LengthScorer("b")]
    composite = CompositeReward([(scorers[0], 2.0), (scorers[1], -0.5)], bias=0.5, floor=-9.0)
    return (
        trl_rewards.TrlRewards(
            composite, max_completion_length=max_completion_length, eos_token_ids={0}
        ),
        scorers,
    )


BATCH = {
    "prompts": ["p0", "p1", "p2", "p3", "p4"],
    "completions": [" 3\nOutput: abc\n\n", " x\nOutput: nan", " rambling on", " on and on", " ok"],
    "completion_ids": [[5, 6, 0], [5, 6], [7] * 3, [7] * 8, [7] * 8 + [0]],
    "instruction": ["t0", "t1", "t2", "t3", "t4"],
    "is_classification": [False, False, False, False, True],
}


def test_trl_sum_of_reward_functions_is_the_composite_reward() -> None:
    rewards, scorers = rewards_of_two()
    logged: list[tuple[str, float]] = []
    outputs = [
        function(**BATCH, log_metric=lambda name, value: logged.append((name, value)))
        for function in rewards.functions()
    ]
    assert [f.__name__ for f in rewards.functions()] == ["a", "b", trl_rewards.BIAS_OR_FLOOR]
    assert rewards.weights() == [2.0, -0.5, 1.0]
    # trl: None → NaN, weighted, nansum over the functions
    table = torch.tensor([[math.nan if v is None else v for v in out] for out in outputs]).T
    trl_sum = (table * torch.tensor(rewards.weights())).nansum(dim=1).tolist()
    assert trl_sum == [2.0 * 3 - 0.5 * 3 + 0.5, -9.0, -9.0, -9.0, 2.0 * 2 - 0.5 * 2 + 0.5]
    assert rewards._batch.failures == [None, "nonfinite", "missing_output", "truncated", None]
    assert [s.calls for s in scorers] == [1, 1]  # scored once for all three functions
    assert dict(logged)["floored/truncated"] == pytest.approx(0.2)
    assert dict(logged)["floored/nonfinite"] == pytest.approx(0.2)
    assert list(rewards.samples)[1] == {
        "instruction": "t1", "completion": " x\nOutput: nan", "reward": -9.0, "floored": "nonfinite"
    }  # fmt: skip


def test_self_instruct_completions_earn_the_mean_reward_of_their_instances() -> None:
    scorers = [LengthScorer("a")]
    composite = CompositeReward([(scorers[0], 1.0)], bias=0.5, floor=-9.0)
    rewards = trl_rewards.TrlRewards(
        composite, max_completion_length=8, eos_token_ids={0}, format="self_instruct"
    )
    batch = {
        "prompts": ["p0", "p1", "p2"],
        "completions": [
            "Example 1\nInput: 1\nOutput: ab\nExample 2\nInput: 2\nOutput: abcd\nTask: x",
            "Example 1\nInput: 1\nOutput: ab\nExample 2\nInput: 2\nOutput: abc",
            "Class label: Yes\nInput: 13\nClass label: No\nInput: 21",
        ],
        "completion_ids": [[5] * 8, [5] * 8, [5, 0]],  # the second hit the token limit
        "instruction": ["t0", "t1", "t2"],
        "is_classification": [False, False, True],
    }
    values = [function(**batch) for function in rewards.functions()]
    assert values[0] == [3.0, 2.0, 2.5]  # mean output length: (2+4)/2, 2 (cut "abc" dropped)
    assert values[1] == [0.5, 0.5, 0.5]  # the bias, as every completion was scored


def test_a_new_batch_is_scored_again() -> None:
    rewards, scorers = rewards_of_two()
    first, *_ = rewards.functions()
    first(**BATCH)
    first(**{**BATCH, "completions": [" 1\nOutput: 22\n\n", *BATCH["completions"][1:]]})
    assert scorers[0].calls == 2


# ---------------------------------------------------------------- inputs


def test_empty_or_missing_instructions_are_input_errors(tmp_path: Path) -> None:
    settings = load_config("local-cpu").stage2
    empty = tmp_path / "instructions.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="no instructions in the file"):
        rlaf.load_instructions(empty, settings)
    with pytest.raises(InputError, match="file not found"):
        rlaf.load_instructions(tmp_path / "missing.jsonl", settings)


def test_max_instructions_is_a_seeded_sample(tmp_path: Path) -> None:
    path = write_instructions(tmp_path / "instructions.jsonl")
    settings = load_config("local-cpu", ["stage2.max_instructions=2"]).stage2
    first = [r.id for r in rlaf.load_instructions(path, settings)]
    assert len(first) == 2 and first == [r.id for r in rlaf.load_instructions(path, settings)]


def test_deepspeed_config_resolves_bundled_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert training.deepspeed_config(None, "stage2.deepspeed") is None
    monkeypatch.setattr(training.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="needs the deepspeed package"):
        training.deepspeed_config("zero2", "stage2.deepspeed")
    monkeypatch.setattr(training.importlib.util, "find_spec", lambda name: object())
    rendezvous = []
    monkeypatch.setattr(training.launch, "single_process_rendezvous", lambda: rendezvous.append(1))
    bundled = Path(training.deepspeed_config("zero2", "stage2.deepspeed"))
    assert rendezvous == [1]  # DeepSpeed on one GPU gets its world of one
    assert bundled == Path(str(PRESETS_DIR.joinpath("deepspeed", "zero2.json")))
    assert json.loads(bundled.read_text())["zero_optimization"]["stage"] == 2
    with pytest.raises(InputError, match="neither a file nor a bundled config"):
        training.deepspeed_config("zero9", "stage2.deepspeed")


def test_single_process_rendezvous_fills_in_only_what_no_launcher_set() -> None:
    environ: dict[str, str] = {}
    assert launch.single_process_rendezvous(environ)
    assert {k: environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")} == {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    assert environ["MASTER_ADDR"] == "127.0.0.1" and int(environ["MASTER_PORT"]) > 0
    launched = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "node-0"}
    assert not launch.single_process_rendezvous(launched)
    assert launched == {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "node-0"}


# ---------------------------------------------------------------- CLI bad input


@pytest.mark.parametrize(
    ("rows", "overrides", "message"),
    [
        ([], [], "no instructions in the file"),
        (INSTRUCTIONS, ["stage2.reward.components=[{scorer: judge.vibes, weight: 1}]"],
         "unknown scorer 'judge.vibes'"),
        (INSTRUCTIONS, ["stage2.reward.components=[{scorer: reward_model}]"],
         "weight: Field required"),
        (INSTRUCTIONS, ["stage2.scorers.llm_judge.model=/nowhere/judge"],
         "model '/nowhere/judge' not found"),
        (INSTRUCTIONS, ["stage2.scorers.llm_judge.model=no-such-org/judge"],
         "HF_HUB_OFFLINE=1"),
    ],
)  # fmt: skip
def test_cli_bad_input_exits_2_before_training(
    rows: list[dict],
    overrides: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write_instructions(tmp_path / "instructions.jsonl", rows)
    out_dir = tmp_path / "out"
    sets = [arg for override in overrides for arg in ("--set", override)]
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", "rlaf", "--instructions", str(path),
        "--out", str(out_dir), "--workspace", str(tmp_path / "ws"), *sets,
    )  # fmt: skip
    assert code == 2
    assert message in " ".join(err.split())
    assert not out_dir.exists()


def test_cli_names_file_line_and_field_of_a_bad_instruction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "instructions.jsonl"
    path.write_text('{"id": "a", "instruction": "x", "source": "seed"}\n')
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", "rlaf", "-i", str(path), "-o", str(tmp_path / "out")
    )
    assert code == 2
    assert f"{path}:1: field 'is_classification': Field required" in " ".join(err.split())


# ---------------------------------------------------------------- a short training run


def tiny_overrides(tiny: Path, steps: int) -> list[str]:
    """The local-cpu preset shrunk to a 2-layer policy and judge and a few short steps."""
    return [
        f"model.base={tiny}",
        f"stage2.scorers.llm_judge.model={tiny}",
        "stage2.reward.components=[{scorer: llm_judge.helpfulness, weight: 1.0}, "
        "{scorer: llm_judge.coherence, weight: 0.5}]",
        f"stage2.max_steps={steps}",
        "stage2.per_device_batch_size=4",
        "stage2.num_generations=2",
        "stage2.max_completion_length=12",
        "stage2.learning_rate=0.01",
        "stage2.save_steps=1",
        "stage2.lora.r=4",
        "stage2.lora.target_modules=[q_proj, v_proj]",
    ]


def tiny_run_args(tiny: Path, instructions: Path, out_dir: Path, workspace: Path, steps: int):
    sets = [arg for override in tiny_overrides(tiny, steps) for arg in ("--set", override)]
    return [
        "stage", "rlaf", "--config", "local-cpu", "--instructions", str(instructions),
        "--out", str(out_dir), "--workspace", str(workspace), *sets,
    ]  # fmt: skip


def whole_completion_as_output(instruction, is_classification, completion, **_):
    """A random 2-layer model never writes the instance format, so every completion would
    get the floor and the policy no gradient; here the whole completion is the output."""
    return [Parsed(Instance(instruction, "", completion.strip() or "(empty)"))]


@pytest.fixture(scope="module")
def trained(tiny_causal_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two GRPO steps of a tiny policy judged by a tiny model, through the CLI."""
    root = tmp_path_factory.mktemp("rlaf")
    instructions = write_instructions(root / "instructions.jsonl")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        patch.setattr(trl_rewards, "parse_instances", whole_completion_as_output)
        args = tiny_run_args(tiny_causal_lm_dir, instructions, root / "out", root / "ws", 2)
        patch.setattr(sys, "argv", ["refine-af", *args])
        try:
            cli.main()
        except SystemExit as done:
            assert not done.code, f"refine-af exited with {done.code}"
    return root


@pytest.mark.slow
def test_training_writes_adapter_config_reward_and_curves(trained: Path, tiny_causal_lm_dir: Path):
    out_dir = trained / "out"
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["completions_scored"] == 8
    assert summary["resumed_from_checkpoint"] is None
    assert sorted(p.name for p in (out_dir / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2",
    ]  # fmt: skip
    adapter_config = json.loads((out_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_causal_lm_dir)
    assert (out_dir / "adapter" / "tokenizer.json").is_file()
    assert load_config(str(out_dir / "rlaf_config.yaml")).stage2.max_steps == 2
    reward = json.loads((out_dir / "reward.json").read_text())
    assert [c["scorer"] for c in reward["components"]] == [
        "llm_judge.helpfulness", "llm_judge.coherence",
    ]  # fmt: skip
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    per_step = [s for s in steps if "reward" in s]
    assert [s["step"] for s in per_step] == [1, 2]
    for key in ("kl", "loss", "rewards/llm_judge.helpfulness/mean", "floored/truncated"):
        assert all(key in s for s in per_step), key
    assert (out_dir / "reward_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out_dir / "samples.jsonl").read_text().splitlines()) == 8


@pytest.mark.slow
def test_training_logs_per_step_metrics_to_mlflow(trained: Path) -> None:
    import mlflow

    from refine_af import tracking

    client = mlflow.MlflowClient(tracking.tracking_uri(trained / "ws"))
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`refine_af.stage` = 'rlaf'"
    )
    for key in ("reward", "kl", "loss", "rewards/llm_judge.coherence/mean"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2]
    assert run.data.params["stage2.kl_coef"] == "0.05"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"reward_curves.png", "summary.json", "reward.json"} <= artifacts


@pytest.mark.slow
def test_saved_adapter_reloads_and_changed_the_policy(trained: Path, tiny_causal_lm_dir: Path):
    from peft import PeftModel

    adapter = trained / "out" / "adapter"
    tokenizer = models.load_tokenizer(str(adapter))
    inputs = tokenizer([build_prompt("Name a fruit.", False)], return_tensors="pt")
    base = models.load_causal_lm(str(tiny_causal_lm_dir), device="cpu")
    with torch.no_grad():
        base_logits = base(**inputs).logits
        policy = PeftModel.from_pretrained(base, str(adapter)).eval()
        policy_logits = policy(**inputs).logits
        merged_logits = models.load_causal_lm(str(adapter), device="cpu")(**inputs).logits
    assert (policy_logits - base_logits).abs().max() > 1e-4
    assert torch.allclose(merged_logits, policy_logits, atol=1e-5)


@pytest.mark.slow
def test_rerun_continues_from_the_last_checkpoint(
    trained: Path,
    tiny_causal_lm_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out_dir = trained / "resumed"
    shutil.copytree(trained / "out", out_dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(trl_rewards, "parse_instances", whole_completion_as_output)
    instructions = trained / "instructions.jsonl"
    args = tiny_run_args(tiny_causal_lm_dir, instructions, out_dir, trained / "ws", 3)
    code, out, _ = cli_output(monkeypatch, capsys, *args, "--set", "stage2.kl_coef=0.2")
    assert code == 2  # different settings: the checkpoints are not continued
    code, out, _ = cli_output(monkeypatch, capsys, *args)
    assert code == 0
    assert "stage 2 · rlaf (grpo)" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["resumed_from_checkpoint"].endswith("checkpoint-2")
    before = json.loads((trained / "out" / "summary.json").read_text())
    # issue 13: the summary counts every invocation, not only the last
    assert summary["completions_scored"] == before["completions_scored"] + 4
    assert summary["seconds"] > before["seconds"] * 0.5
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "reward" in s] == [1, 2, 3]


@pytest.mark.slow
def test_rloo_trainer_trains_and_publishes_an_adapter(
    tiny_causal_lm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(trl_rewards, "parse_instances", whole_completion_as_output)
    config = load_config(
        "local-cpu", [*tiny_overrides(tiny_causal_lm_dir, 1), "stage2.trainer=rloo"]
    )
    instructions = write_instructions(tmp_path / "instructions.jsonl")
    result = rlaf.run(config, instructions, tmp_path / "out", workspace=tmp_path / "ws")
    assert result.summary["trainer"] == "rloo" and result.summary["steps"] == 1
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    (step,) = [
        json.loads(line)
        for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
        if '"reward"' in line
    ]
    assert {"reward", "kl", "rewards/llm_judge.coherence/mean"} <= set(step)
