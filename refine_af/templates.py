"""Prompt templates shared by everything that trains on, evaluates or serves a fine-tuned model.

Stage 4 fine-tunes on these formats; whatever later asks that model a question must ask it
in the same format, so the format lives here and is recorded with the adapter.
"""

from __future__ import annotations

from typing import Any, Literal

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
