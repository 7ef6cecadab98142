"""The instance-generation prompt (Self-Instruct's) and the parser of what the model writes.

Stage 2 trains the policy on these prompts and stage 3 generates instances with them, so
both import them from here: a policy trained on one format and sampled with another would
have learnt nothing useful.

As in Self-Instruct, non-classification tasks are written input-first (an input, then its
output) and classification tasks output-first (a class label, then an input of that
class), because input-first generation for classification tends to produce inputs of one
label only. One prompt asks for one instance; a short few-shot prefix shows the format, so
base models (which continue text) and instruct models both follow it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

INPUT_FIRST_PREFIX = """\
Write one example for the task: an input, then the correct output for that input. \
If the task needs no input, leave the input empty.

Task: Sort the numbers in ascending order.
Input: 7, -2, 15, 3
Output: -2, 3, 7, 15

Task: Suggest a name for a bakery that sells only gluten-free bread.
Input:
Output: Crumb Free Bakery

"""

OUTPUT_FIRST_PREFIX = """\
Given a classification task, write one class label and then an input that belongs to \
that class. If the task needs no input, leave the input empty.

Task: Classify the sentiment of the review as positive or negative.
Class label: Negative
Input: The battery died after two days and support never answered my emails.

Task: Is the number prime? Answer Yes or No.
Class label: Yes
Input: 13

"""

# A field ends at a blank line (the separator between the prefix's examples) or where the
# model starts another field or task; whatever follows it is not part of the instance.
_FIELD_END = re.compile(r"\n[ \t]*\n|\n(Task|Input|Output|Class label):")

# Generation may stop at these: an instance never spans a blank line.
STOP = ("\n\n",)

ParseFailure = Literal["missing_output", "empty_output", "truncated"]


@dataclass(frozen=True)
class Instance:
    """One (instruction, input, output) triplet; ``input`` may be empty."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Parsed:
    """The instance a completion holds, or why it holds none."""

    instance: Instance | None
    failure: ParseFailure | None = None


def normalise_instruction(instruction: str) -> str:
    return re.sub(r"\s+", " ", instruction).strip()


def build_prompt(instruction: str, is_classification: bool) -> str:
    """The few-shot prompt; the model continues after ``Input:`` or ``Class label:``."""
    task = normalise_instruction(instruction)
    if is_classification:
        return f"{OUTPUT_FIRST_PREFIX}Task: {task}\nClass label:"
    return f"{INPUT_FIRST_PREFIX}Task: {task}\nInput:"


def _split_field(text: str) -> tuple[str, str | None, str]:
    """The field, what ended it and the text after that.

    What ended it is a field name, "" for a blank line, or None when the text ran out.
    """
    match = _FIELD_END.search(text)
    if match is None:
        return text, None, ""
    return text[: match.start()], match.group(1) or "", text[match.end() :]


def parse_completion(
    instruction: str, is_classification: bool, completion: str, *, finished: bool = True
) -> Parsed:
    """The instance in a completion of ``build_prompt(instruction, is_classification)``.

    ``finished`` is False when generation stopped at its token limit: an instance whose
    last field runs to the end of such a completion was cut off and is not kept. A
    classification example may stop after its label (a task that needs no input).
    """
    first, ended_by, rest = _split_field(completion)
    second_field = "Input" if is_classification else "Output"
    second = ""
    if ended_by == second_field:
        second, ended_by, _ = _split_field(rest)
    elif not is_classification:
        return Parsed(None, "truncated" if ended_by is None and not finished else "missing_output")
    if ended_by is None and not finished:
        return Parsed(None, "truncated")
    task_input, output = (second, first) if is_classification else (first, second)
    if not output.strip():
        return Parsed(None, "empty_output")
    return Parsed(Instance(normalise_instruction(instruction), task_input.strip(), output.strip()))
