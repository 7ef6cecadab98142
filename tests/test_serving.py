"""A fine-tuned LoRA model logged as stage 4 logs it answers in the format it was trained on."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import cli_output

from refine_af import models, serving
from refine_af.templates import ALPACA_NO_INPUT

QUESTION = "Name a fruit that is yellow."


def log_tiny(
    tiny_causal_lm_dir: Path,
    tiny_lora_adapter_dir: Path,
    target: Path,
    chat: bool,
    temperature: float = 0.0,
):
    """The tiny LoRA model saved as stage 4 logs it (chat or Alpaca template; greedy by
    default, sampling with ``temperature``)."""
    import mlflow
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = models.load_tokenizer(str(tiny_causal_lm_dir))
    if not chat:
        tokenizer.chat_template = None
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    model = PeftModel.from_pretrained(base, tiny_lora_adapter_dir)
    template = "chat" if chat else "alpaca"
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        path=str(target),
        base_model_path=str(tiny_causal_lm_dir),
        pip_requirements=["torch", "transformers", "peft"],  # no inference: it imports all
        **serving.flavor_arguments(template, 12, temperature, top_p=1.0),
    )
    return mlflow.pyfunc.load_model(str(target)), tokenizer


def test_alpaca_requests_are_wrapped_as_stage_4_trained_and_answered_without_echo(
    tiny_causal_lm_dir: Path, tiny_lora_adapter_dir: Path, tmp_path: Path
):
    model, tokenizer = log_tiny(tiny_causal_lm_dir, tiny_lora_adapter_dir, tmp_path / "m", False)
    assert model.metadata.flavors["transformers"]["inference_task"] == serving.COMPLETIONS_TASK
    (prediction,) = model.predict(serving.request(serving.COMPLETIONS_TASK, QUESTION))
    text = serving.answer(serving.COMPLETIONS_TASK, prediction)
    prompt = ALPACA_NO_INPUT.format(instruction=QUESTION)
    # the flavor asked the Alpaca prompt: its token count, not the bare question's
    assert prediction["usage"]["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
    assert QUESTION not in text and "### Response" not in text
    assert 0 < prediction["usage"]["completion_tokens"] <= 12  # the logged default
    (short,) = model.predict(serving.request(serving.COMPLETIONS_TASK, QUESTION, max_tokens=3))
    assert short["usage"]["completion_tokens"] <= 3
    assert text.startswith(serving.answer(serving.COMPLETIONS_TASK, short).strip())  # greedy


def test_chat_requests_get_the_chat_template_and_the_answer_only(
    tiny_causal_lm_dir: Path, tiny_lora_adapter_dir: Path, tmp_path: Path
):
    model, tokenizer = log_tiny(
        tiny_causal_lm_dir, tiny_lora_adapter_dir, tmp_path / "m", True, temperature=0.7
    )
    assert model.metadata.flavors["transformers"]["inference_task"] == serving.CHAT_TASK
    (prediction,) = model.predict(serving.request(serving.CHAT_TASK, QUESTION))
    text = serving.answer(serving.CHAT_TASK, prediction)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    assert prediction["usage"]["prompt_tokens"] == len(
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
    )
    assert QUESTION not in text
    assert 0 < prediction["usage"]["completion_tokens"] <= 12
    (short,) = model.predict(serving.request(serving.CHAT_TASK, QUESTION, max_tokens=2))
    assert short["usage"]["completion_tokens"] <= 2
    hot = serving.request(serving.CHAT_TASK, QUESTION, max_tokens=6, temperature=5.0)
    answers = {serving.answer(serving.CHAT_TASK, model.predict(hot)[0]) for _ in range(4)}
    assert len(answers) > 1  # the request's temperature reached a sampler


def test_a_greedy_default_gives_one_answer(
    tiny_causal_lm_dir: Path, tiny_lora_adapter_dir: Path, tmp_path: Path
):
    model, _ = log_tiny(tiny_causal_lm_dir, tiny_lora_adapter_dir, tmp_path / "m", True)
    request = serving.request(serving.CHAT_TASK, QUESTION, max_tokens=6)
    answers = {serving.answer(serving.CHAT_TASK, model.predict(request)[0]) for _ in range(3)}
    assert len(answers) == 1


def test_a_chat_request_asks_for_greedy_with_top_k_1_not_temperature_0(
    tiny_causal_lm_dir: Path, tiny_lora_adapter_dir: Path, tmp_path: Path
):
    from mlflow.exceptions import MlflowException

    sampled, _ = log_tiny(
        tiny_causal_lm_dir, tiny_lora_adapter_dir, tmp_path / "s", True, temperature=5.0
    )
    greedy, _ = log_tiny(tiny_causal_lm_dir, tiny_lora_adapter_dir, tmp_path / "g", True)
    request = serving.request(serving.CHAT_TASK, QUESTION, max_tokens=6)
    expected = serving.answer(serving.CHAT_TASK, greedy.predict(request)[0])
    top_1 = {**request, "top_k": 1}
    answers = {serving.answer(serving.CHAT_TASK, sampled.predict(top_1)[0]) for _ in range(3)}
    assert answers == {expected}  # the logged temperature still applies, but only to one token
    with pytest.raises((ValueError, MlflowException), match="strictly positive"):
        sampled.predict({**request, "temperature": 0.0})  # transformers' sampler refuses 0


def test_the_request_fields_are_those_the_docs_name(
    tiny_causal_lm_dir: Path, tiny_lora_adapter_dir: Path, tmp_path: Path
):
    """MLflow fixes the signature of the llm/v1 tasks: completions has no top_p or top_k."""
    for chat, task in ((True, serving.CHAT_TASK), (False, serving.COMPLETIONS_TASK)):
        model, _ = log_tiny(tiny_causal_lm_dir, tiny_lora_adapter_dir, tmp_path / task, chat)
        fields = set(model.metadata.get_input_schema().input_names())
        generation = fields & {"max_tokens", "temperature", "top_p", "top_k", "stop"}
        assert generation == set(serving.REQUEST_FIELDS[task])


def test_flavor_arguments_follow_the_template_and_the_sampling_settings():
    chat = serving.flavor_arguments("chat", 64, 0.0, 0.5)
    greedy = {"max_new_tokens": 64, "do_sample": False}
    assert chat == {"task": "llm/v1/chat", "model_config": greedy}
    sampled = serving.flavor_arguments("chat", 64, 0.7, 0.5)["model_config"]
    assert sampled == {"max_new_tokens": 64, "do_sample": True, "temperature": 0.7, "top_p": 0.5}
    alpaca = serving.flavor_arguments("alpaca", 64, 0.7, 0.5)
    assert alpaca["task"] == "llm/v1/completions"
    assert alpaca["prompt_template"].format(prompt="Q?") == ALPACA_NO_INPUT.format(instruction="Q?")


@pytest.mark.parametrize(
    ("task", "body"),
    [
        (serving.CHAT_TASK, {"messages": [{"role": "user", "content": "Q?"}], "max_tokens": 5}),
        (serving.COMPLETIONS_TASK, {"prompt": "Q?", "max_tokens": 5}),
    ],
)
def test_requests_are_in_the_flavors_format(task, body):
    assert serving.request(task, "Q?", max_tokens=5) == body


def test_serving_an_alias_that_is_not_set_exits_2_naming_it(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = cli_output(
        monkeypatch, capsys, "models", "serve", "--alias", "nobody", "--workspace", str(tmp_path)
    )
    assert code == 2, err
    assert "registered model 'refine-af-model' has no alias @nobody" in err
