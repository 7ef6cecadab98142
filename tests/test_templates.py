"""Stage 5 asks a fine-tuned adapter exactly what stage 4 trained it on, token for token."""

from pathlib import Path

import pytest
from tokenizers import processors

from refine_af import templates
from refine_af.config import load_config
from refine_af.errors import InputError
from refine_af.generation import TransformersBackend
from refine_af.records import ExampleRecord
from refine_af.stages import evaluate
from refine_af.superni import SuperNIInstance

DEFINITION = "Answer the question with yes or no."
INPUT = "Is water wet?"


def tokenizer_of(model_dir: Path, bos: bool):
    """The bundled tokenizer; with ``bos`` it adds a BOS to plain text, as Llama's does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if bos:
        token = tokenizer.bos_token
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{token} $A", special_tokens=[(token, tokenizer.bos_token_id)]
        )
        assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


def trained_prompt_ids(row: dict, tokenizer, model, work: Path) -> list[int]:
    """The prompt tokens trl's SFTTrainer puts before the completion of ``row``."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(work), completion_only_loss=True, report_to="none", use_cpu=True
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list([row]), processing_class=tokenizer
    )
    item = trainer.train_dataset[0]  # the loss is masked (-100) on the prompt
    return [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label == -100]


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("with_input", [True, False], ids=["input", "no-input"])
@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_evaluation_prompt_is_the_sft_prompt(
    template, with_input, bos, tiny_causal_lm_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_of(tiny_causal_lm_dir, bos)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    task_input = INPUT if with_input else ""
    example = ExampleRecord(
        id="e", instruction_id="i", instruction=DEFINITION, input=task_input, output="yes",
        policy="rl",
    )  # fmt: skip
    instance = SuperNIInstance(
        task="t", id="t-1", definition=f" {DEFINITION}\n", input=task_input, references=["yes"]
    )
    prompts, chat = evaluate.prompts_for([instance], load_config("local-cpu"), template, tokenizer)
    assert chat is False  # the template is already applied
    backend = TransformersBackend(
        tokenizer, model, add_special_tokens=templates.adds_special_tokens(template)
    )
    asked = backend._encode(prompts)["input_ids"][0].tolist()
    row = templates.to_row(example, template)
    assert asked == trained_prompt_ids(row, tokenizer, model, tmp_path)
    if template == "alpaca":
        assert prompts == [row["prompt"]]


def test_the_template_travels_with_the_adapter(tmp_path: Path) -> None:
    assert templates.recorded_template(tmp_path) is None  # not a refine-af adapter
    templates.record_template(tmp_path, "alpaca")
    assert templates.recorded_template(tmp_path) == "alpaca"
    (tmp_path / templates.TEMPLATE_FILE).write_text('{"template": "vicuna"}')
    with pytest.raises(InputError, match="neither chat nor alpaca"):
        templates.recorded_template(tmp_path)
