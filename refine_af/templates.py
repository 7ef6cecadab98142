"""Prompt templates shared by everything that trains on, evaluates or serves a fine-tuned model.

Stage 4 fine-tunes on these formats; whatever later asks that model a question must ask it
in the same format, so the format lives here and is recorded with the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

from refine_af.errors import InputError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

Template = Literal["chat", "alpaca"]


def resolve_template(setting: str, tokenizer) -> Template:
    """``auto`` picks the model's chat template when it has one, Alpaca otherwise."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if setting == "chat" and not has_chat:
        raise InputError(
            "stage4.template=chat but the model has no chat template; use auto or alpaca"
        )
    if setting == "auto":
        return "chat" if has_chat else "alpaca"
    return setting  # type: ignore[return-value]


def request(instruction: str, input: str = "") -> str:
    """What the user asks: the instruction, then its input when there is one."""
    return "\n\n".join(part for part in (instruction, input) if part)


def to_row(example, template: Template) -> dict[str, Any]:
    """A trl prompt-completion row (conversational for the chat template)."""
    if template == "chat":
        return {
            "prompt": [{"role": "user", "content": request(example.instruction, example.input)}],
            "completion": [{"role": "assistant", "content": example.output}],
        }
    alpaca = ALPACA_WITH_INPUT if example.input else ALPACA_NO_INPUT
    prompt = alpaca.format(instruction=example.instruction, input=example.input)
    return {"prompt": prompt, "completion": example.output}


TEMPLATE_FILE = "refine_af_template.json"
"""Written next to an adapter's weights: the template it was fine-tuned in."""


def render_prompt(template: Template, instruction: str, input: str, tokenizer) -> str:
    """The generation prompt, character for character what stage 4 trained on.

    That is the prompt part of ``to_row``'s row as trl renders it: the chat template
    with the generation prompt for ``chat``, the Alpaca text otherwise.
    """
    if template == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": request(instruction, input)}],
            add_generation_prompt=True,
            tokenize=False,
        )
    alpaca = ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT
    return alpaca.format(instruction=instruction, input=input)


def adds_special_tokens(template: Template) -> bool:
    """Whether the prompt is tokenized with the tokenizer's special tokens, as trl does.

    trl's SFTTrainer tokenizes an Alpaca (plain-text) prompt with them (a BOS for Llama and
    Mistral), and a chat prompt without them (the chat template already holds them).
    """
    return template != "chat"


def record_template(adapter_dir: Path, template: Template) -> None:
    """Record the template with the adapter, so whoever loads it asks in the same format."""
    (adapter_dir / TEMPLATE_FILE).write_text(json.dumps({"template": template}) + "\n")


def recorded_template(model_dir: str | Path) -> Template | None:
    """The template a refine-af adapter was trained in; None for any other model."""
    path = Path(model_dir) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text())["template"]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f'{path}: expected {{"template": "chat"|"alpaca"}}') from error
    if template not in get_args(Template):
        raise InputError(f"{path}: template {template!r} is neither chat nor alpaca")
    return template
