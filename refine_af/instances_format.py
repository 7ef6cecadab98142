"""The instance-generation prompt (Self-Instruct's) and the parser of what the model writes.

Stage 2 trains the policy on these prompts and stage 3 generates instances with them, so
both import them from here: a policy trained on one format and sampled with another would
have learnt nothing useful.

As in Self-Instruct, non-classification tasks are written input-first (an input, then its
output) and classification tasks output-first (a class label, then an input of that
class), because input-first generation for classification tends to produce inputs of one
label only. Two formats (``stage3.format``):

- ``self_instruct`` (the paper presets): Self-Instruct's own way, several instances of a
  task in one completion ("Example 1 … Example 2 …", or one "Class label:" block per
  label), generation stopped at "Example N+1" or the next "Task:", parsed as
  Self-Instruct's ``prepare_for_finetuning.py`` parses it; when generation hit the token
  limit the last instance is unfinished and is dropped.
- ``one_per_prompt`` (``local-cpu``): one instance per completion, which a 135M model
  follows far more reliably; several completions are sampled per task instead.

A short few-shot prefix shows the format, so base models (which continue text) and
instruct models both follow it.
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

SELF_INSTRUCT_INPUT_FIRST = """\
Come up with examples for the following tasks. Write several examples when you can. \
If a task needs no input, write the output directly.

Task: Sort the numbers in ascending order.
Example 1
Input: 7, -2, 15, 3
Output: -2, 3, 7, 15
Example 2
Input: 40, 4, 14
Output: 4, 14, 40

Task: Suggest a name for a bakery that sells only gluten-free bread.
Output: Crumb Free Bakery

Task: Rewrite the sentence in the passive voice.
Example 1
Input: The committee approved the budget.
Output: The budget was approved by the committee.
Example 2
Input: A storm damaged the old bridge.
Output: The old bridge was damaged by a storm.

"""

SELF_INSTRUCT_OUTPUT_FIRST = """\
Given a classification task and its class labels, write an input for each class label. \
If the task needs no input, just write the possible class labels.

Task: Classify the sentiment of the review as positive or negative.
Class label: Negative
Input: The battery died after two days and support never answered my emails.
Class label: Positive
Input: Setup took a minute and it has worked flawlessly since.

Task: Is the number prime? Answer Yes or No.
Class label: Yes
Input: 13
Class label: No
Input: 21

"""

Format = Literal["one_per_prompt", "self_instruct"]

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


def build_prompt(
    instruction: str, is_classification: bool, format: Format = "one_per_prompt"
) -> str:
    """The few-shot prompt for one task.

    ``one_per_prompt``: the model continues after ``Input:`` or ``Class label:``;
    ``self_instruct``: after ``Task: …`` and a newline, as Self-Instruct's prompts end.
    """
    task = normalise_instruction(instruction)
    if format == "self_instruct":
        prefix = SELF_INSTRUCT_OUTPUT_FIRST if is_classification else SELF_INSTRUCT_INPUT_FIRST
        return f"{prefix}Task: {task}\n"
    if is_classification:
        return f"{OUTPUT_FIRST_PREFIX}Task: {task}\nClass label:"
    return f"{INPUT_FIRST_PREFIX}Task: {task}\nInput:"


def stop_strings(format: Format, max_instances: int) -> tuple[str, ...]:
    """Where generation stops: after one instance, or Self-Instruct's ``Example N+1``/``Task:``."""
    if format == "self_instruct":
        return (f"Example {max_instances + 1}", "Task:")
    return STOP


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


# Self-Instruct's field patterns (prepare_for_finetuning.py)
_EXAMPLE = re.compile(r"Example\s?\d*\.?")
_OUTPUT = re.compile(r"Output\s*\d*\s*:")
_INPUT = re.compile(r"Input\s*\d*\s*:")
_LEADING_INPUT = re.compile(r"^Input\s*\d*\s*:")


def _input_output(text: str) -> tuple[str, str]:
    """One example's (input, output): the text before and after ``Output:``."""
    parts = _OUTPUT.split(text)
    task_input, output = (parts[0], parts[1]) if len(parts) > 1 else ("", text)
    output = _INPUT.split(output)[0]  # a next "Input:" starts another example
    return _LEADING_INPUT.sub("", task_input.strip()).strip(), output.strip()


def _pairs(is_classification: bool, text: str) -> list[tuple[str, str]] | None:
    """(input, output) of every instance in a Self-Instruct completion; None if it has none."""
    if is_classification:
        if "Class label:" not in text:
            return None
        pairs = []
        for block in text.split("Class label:")[1:]:
            label, _, rest = block.strip().partition("\n")
            pairs.append((_LEADING_INPUT.sub("", rest.strip()).strip(), label.strip()))
        return pairs
    text = text.strip()
    if _EXAMPLE.search(text):
        return [_input_output(t.strip()) for t in _EXAMPLE.split(text) if t.strip()]
    if _OUTPUT.search(text):
        return [_input_output(text)]
    return None


def parse_instances(
    instruction: str,
    is_classification: bool,
    completion: str,
    *,
    finished: bool = True,
    format: Format = "one_per_prompt",
    max_instances: int = 5,
) -> list[Parsed]:
    """Every instance a completion of ``build_prompt(…, format)`` holds, in order.

    ``one_per_prompt``: exactly one item (``parse_completion``). ``self_instruct``: one
    item per instance; text from a stop string on is cut first (as generation would have
    stopped there); a completion cut by the token limit loses its last, unfinished
    instance (a ``truncated`` item), as Self-Instruct drops it.
    """
    if format == "one_per_prompt":
        return [parse_completion(instruction, is_classification, completion, finished=finished)]
    for stop in stop_strings(format, max_instances):
        if (cut := completion.find(stop)) >= 0:
            completion, finished = completion[:cut], True
    pairs = _pairs(is_classification, completion)
    if pairs is None:
        return [Parsed(None, "missing_output" if finished else "truncated")]
    task = normalise_instruction(instruction)
    parsed = [
        Parsed(Instance(task, task_input, output)) if output else Parsed(None, "empty_output")
        for task_input, output in pairs
    ]
    if not finished:
        parsed[-1] = Parsed(None, "truncated")
    return parsed
