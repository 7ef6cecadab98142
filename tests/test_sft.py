"""Stage 4: prompt templates, the held-out split, a short LoRA SFT run and its registration."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from cli_runner import cli_output
from local_paths import ABSOLUTE_PATH

from refine_af import cli, models, serving, templates
from refine_af.config import load_config
from refine_af.errors import InputError
from refine_af.records import ExampleRecord
from refine_af.stages import sft

TASKS = [
    ("Add the two numbers.", [("2 and 3", "5"), ("10 and 4", "14"), ("7 and 1", "8")]),
    ("Name the fruit's colour.", [("banana", "Yellow"), ("lime", "Green"), ("plum", "Purple")]),
    ("Translate to French.", [("Good morning", "Bonjour"), ("Thank you", "Merci"),
                              ("Goodbye", "Au revoir")]),
    ("Give the opposite word.", [("hot", "cold"), ("up", "down"), ("early", "late")]),
    ("Write a greeting.", [("", "Hello there!"), ("", "Good day to you."), ("", "Hi!")]),
    ("Count the words.", [("one two", "2"), ("a b c", "3"), ("just one", "2")]),
    ("Give the plural.", [("cat", "cats"), ("mouse", "mice"), ("child", "children")]),
    ("Capitalise the word.", [("paris", "Paris"), ("rome", "Rome"), ("oslo", "Oslo")]),
    ("Is the number even?", [("4", "Yes"), ("7", "No"), ("10", "Yes")]),
    ("Name the animal's sound.", [("dog", "Woof"), ("cat", "Meow"), ("cow", "Moo")]),
]  # fmt: skip


def example_rows(policy: str = "rl") -> list[dict]:
    rows = []
    for t, (instruction, pairs) in enumerate(TASKS):
        for k, (task_input, output) in enumerate(pairs):
            rows.append(
                ExampleRecord(
                    id=f"machine_{t:06d}-{k:03d}", instruction_id=f"machine_{t:06d}",
                    instruction=instruction, input=task_input, output=output,
                    scores={"llm_judge.helpfulness": 0.5}, reward=0.5, policy=policy,
                ).model_dump(mode="json")
            )  # fmt: skip
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def example(task_input: str = "2 and 3") -> ExampleRecord:
    return ExampleRecord.model_validate({**example_rows()[0], "input": task_input})


# ---------------------------------------------------------------- data preparation


def test_chat_rows_are_conversational_prompt_completion():
    row = templates.to_row(example(), "chat")
    assert row == {
        "prompt": [{"role": "user", "content": "Add the two numbers.\n\n2 and 3"}],
        "completion": [{"role": "assistant", "content": "5"}],
    }
    assert templates.to_row(example(""), "chat")["prompt"][0]["content"] == "Add the two numbers."


def test_alpaca_rows_with_and_without_input():
    with_input = templates.to_row(example(), "alpaca")
    assert with_input["prompt"].endswith(
        "### Instruction:\nAdd the two numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    assert with_input["completion"] == "5"
    without = templates.to_row(example(""), "alpaca")["prompt"]
    assert "### Input:" not in without and without.endswith("### Response:\n")


def test_template_auto_follows_the_tokenizer(tiny_causal_lm_dir: Path):
    tokenizer = models.load_tokenizer(str(tiny_causal_lm_dir))
    assert templates.resolve_template("auto", tokenizer) == "chat"  # the bundled tokenizer has one
    tokenizer.chat_template = None
    assert templates.resolve_template("auto", tokenizer) == "alpaca"
    with pytest.raises(InputError, match="no chat template"):
        templates.resolve_template("chat", tokenizer)


def test_held_out_split_takes_whole_instructions_and_is_seeded():
    examples = [ExampleRecord.model_validate(r) for r in example_rows()]
    train, held_out = sft.split_by_instruction(examples, 0.2, 7, "x")
    assert len({e.instruction_id for e in held_out}) == 2 and len(held_out) == 6
    assert not {e.instruction_id for e in train} & {e.instruction_id for e in held_out}
    assert sft.split_by_instruction(examples, 0.2, 7, "x") == (train, held_out)
    assert sft.split_by_instruction(examples, 0.0, 7, "x") == (examples, [])
    with pytest.raises(InputError, match="at least 2"):
        sft.split_by_instruction(examples[:3], 0.1, 7, "x")


def test_examples_of_both_policies_are_refused(tmp_path: Path):
    rows = example_rows()
    rows[-1]["policy"] = "base"
    with pytest.raises(InputError, match="both policies"):
        sft.load_examples(write_rows(tmp_path / "mixed.jsonl", rows))


# ---------------------------------------------------------------- CLI and bad input


def missing_field(path: Path) -> Path:
    rows = example_rows()
    del rows[4]["output"]
    return write_rows(path, rows)


@pytest.mark.parametrize(
    ("make_file", "overrides", "message"),
    [
        (missing_field, [], ":5: field 'output': Field required"),
        (lambda p: write_rows(p, []), [], "no examples to fine-tune on (an empty dataset)"),
        (lambda p: p.with_name("absent.jsonl"), [], "absent.jsonl: file not found"),
        (lambda p: write_rows(p, example_rows()), ["stage4.deepspeed=nope"], "stage4.deepspeed"),
    ],
    ids=["missing-field", "empty", "missing-file", "deepspeed"],
)
def test_bad_input_exits_2_and_writes_nothing(
    make_file, overrides, message, tmp_path: Path, monkeypatch, capsys
):
    path = make_file(tmp_path / "examples.jsonl")
    sets = [arg for item in overrides for arg in ("--set", item)]
    out = tmp_path / "out"
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", "sft", "-e", str(path), "-o", str(out),
        "--workspace", str(tmp_path / "ws"), *sets,
    )  # fmt: skip
    assert code == 2, err
    assert message in err
    assert not out.exists() and not (tmp_path / "ws").exists()


# ---------------------------------------------------------------- a short run, registered


@pytest.fixture(scope="module")
def trained(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory):
    """Two LoRA steps on the bundled model over 30 examples, through the CLI, registered
    on a real MLflow server."""
    root = tmp_path_factory.mktemp("sft")
    examples = write_rows(root / "examples.jsonl", example_rows())
    overrides = [
        "stage4.max_steps=2",
        "stage4.per_device_batch_size=2",
        "stage4.max_length=128",
        "stage4.eval_fraction=0.1",
        "stage6.model_name=sft-test",
    ]
    sets = [arg for item in overrides for arg in ("--set", item)]
    args = ["stage", "sft", "-e", str(examples), "-o", str(root / "out"), *sets]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        patch.setattr(sys, "argv", ["refine-af", *args])
        try:
            cli.main()
        except SystemExit as exit_:
            assert not exit_.code, f"refine-af exited with {exit_.code}"
    return root


@pytest.mark.slow
@pytest.mark.integration
def test_training_writes_adapter_card_and_summary(trained: Path):
    out = trained / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["template"] == "chat"
    assert summary["train_examples"] == 27 and summary["eval_examples"] == 3
    assert summary["eval_loss"] is not None and summary["eval_loss_before"] is not None
    assert summary["policy"] == "rl" and summary["registered_version"] == "1"
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "smollm2-135m-instruct"
    card = (out / "adapter" / "README.md").read_text()
    assert summary["dataset_sha256"] in card and "`sft-test` version 1" in card
    assert summary["run_id"] in card and summary["config_hash"] in card
    assert 'mlflow.pyfunc.load_model("models:/sft-test/1")' in card
    ask = "model.predict({'messages': [{'role': 'user', 'content': 'Give me three tips.'}]})"
    assert ask in card  # a request in the chat format, not a bare string
    assert ABSOLUTE_PATH.findall(card) == [], card
    assert load_config(str(out / "sft_config.yaml")).stage4.max_steps == 2
    assert not (out / ".adapter-staging").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_the_adapter_reloads_and_generates(trained: Path):
    from refine_af.generation import SamplingParams, TransformersBackend

    backend = TransformersBackend.from_reference(str(trained / "out" / "adapter"), device="cpu")
    (completion,) = backend.generate(
        ["Add the two numbers.\n\n4 and 4"],
        SamplingParams(max_new_tokens=8, temperature=0),
        chat=True,
    )
    assert completion.text.strip()


@pytest.mark.slow
@pytest.mark.integration
def test_registered_version_is_tagged_and_references_its_base(trained: Path, mlflow_server: str):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    summary = json.loads((trained / "out" / "summary.json").read_text())
    version = client.get_model_version("sft-test", "1")
    assert version.tags["refine_af.config_hash"] == summary["config_hash"]
    assert version.tags["refine_af.dataset_sha256"] == summary["dataset_sha256"]
    assert version.tags["refine_af.policy"] == "rl"
    assert version.run_id == summary["run_id"]
    local = client.download_artifacts(summary["run_id"], "summary.json", str(trained))
    assert json.loads(Path(local).read_text())["steps"] == 2
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        flavor = mlflow.models.get_model_info("models:/sft-test/1").flavors["transformers"]
    assert flavor["peft_adaptor"] == "peft"
    assert flavor["local_base_model_path"] == models.resolve("smollm2-135m-instruct")
    metrics = client.get_metric_history(summary["run_id"], "eval_loss")
    assert len(metrics) >= 2  # before and after training


# ---------------------------------------------------------------- the registered model in use

SUPERNI_STYLE = (
    "Definition: In this task, you are given a sentence. Classify its sentiment as "
    '"positive" or "negative".\n\nNow complete the following example -\n'
    "Input: I loved every minute of this film.\nOutput:"
)
OPEN_ENDED = "Give me three tips for staying focused."


@pytest.fixture(scope="module")
def champion(trained: Path, mlflow_server: str):
    """Version 1 as the champion, loaded as MLflow users load a registered model."""
    import mlflow

    mlflow.MlflowClient(mlflow_server).set_registered_model_alias("sft-test", "champion", "1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        return mlflow.pyfunc.load_model("models:/sft-test@champion")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("question", [SUPERNI_STYLE, OPEN_ENDED], ids=["superni", "open"])
def test_the_champion_answers_without_echo_and_keeps_to_max_tokens(champion, question: str):
    flavor = champion.metadata.flavors["transformers"]
    assert flavor["inference_task"] == serving.CHAT_TASK  # the bundled tokenizer has a template
    config = load_config("local-cpu")
    (prediction,) = champion.predict(serving.request(serving.CHAT_TASK, question))
    answer = serving.answer(serving.CHAT_TASK, prediction)
    print(json.dumps({"question": question, "answer": answer}))  # for the closing note
    assert answer.strip() and answer.strip() != question
    assert question not in answer and "user\n" not in answer
    assert prediction["usage"]["completion_tokens"] <= config.stage5.max_new_tokens
    (short,) = champion.predict(
        serving.request(serving.CHAT_TASK, question, max_tokens=5, temperature=0.2, stop=["\n"])
    )
    assert 0 < short["usage"]["completion_tokens"] <= 5
    assert question not in serving.answer(serving.CHAT_TASK, short)


@pytest.mark.slow
@pytest.mark.integration
def test_refine_af_models_serve_answers_one_request(
    champion, mlflow_server: str, start_http_server, tmp_path: Path
):
    """`refine-af models serve` runs `mlflow models serve --env-manager local` on 127.0.0.1."""
    import urllib.request

    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "refine_af.cli", "models", "serve",
            "--set", "stage6.model_name=sft-test", "--port", str(port),
            "--workspace", str(tmp_path / "ws"),
        ]  # fmt: skip

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "OMP_NUM_THREADS": "1"}
    url = start_http_server(command, env)
    body = serving.request(serving.CHAT_TASK, OPEN_ENDED, max_tokens=24)
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        payload = json.loads(response.read())
    print(json.dumps({"request": body, "response": payload}))  # for the closing note
    (completion,) = payload  # one chat.completion per request
    answer = serving.answer(serving.CHAT_TASK, completion)
    assert answer.strip() and OPEN_ENDED not in answer
    assert completion["usage"]["completion_tokens"] <= 24
