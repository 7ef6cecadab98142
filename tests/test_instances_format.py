"""instances_format: the instance-generation prompt and the parser stages 2 and 3 share."""

import pytest

from refine_af.instances_format import (
    INPUT_FIRST_PREFIX,
    OUTPUT_FIRST_PREFIX,
    Instance,
    Parsed,
    build_prompt,
    parse_completion,
)


def test_prompts_are_input_first_or_output_first() -> None:
    plain = build_prompt("  Sort the\n numbers.  ", is_classification=False)
    assert plain == INPUT_FIRST_PREFIX + "Task: Sort the numbers.\nInput:"
    labelled = build_prompt("Is the review positive?", is_classification=True)
    assert labelled == OUTPUT_FIRST_PREFIX + "Task: Is the review positive?\nClass label:"


def test_every_prefix_example_parses_as_an_instance() -> None:
    """The few-shot examples are themselves in the format the parser reads."""
    for prefix, is_classification in ((INPUT_FIRST_PREFIX, False), (OUTPUT_FIRST_PREFIX, True)):
        examples = prefix.strip().split("\n\n")[1:]
        marker = "\nClass label:" if is_classification else "\nInput:"
        for example in examples:
            task, completion = example.split(marker, 1)
            parsed = parse_completion(task.removeprefix("Task: "), is_classification, completion)
            assert parsed.instance is not None, example


@pytest.mark.parametrize(
    ("is_classification", "completion", "finished", "expected"),
    [
        (False, " 3, 8, 1\nOutput: 1, 3, 8\n\nTask: next", False, ("3, 8, 1", "1, 3, 8")),
        (False, "\nOutput: Crumb\n\nTask: next", True, ("", "Crumb")),
        (False, " a\nb\nOutput: c\nOutput: d", True, ("a\nb", "c")),
        (False, " x\nOutput: y y y", True, ("x", "y y y")),
        (False, " x\nOutput: y y y", False, "truncated"),
        (False, " x x x", False, "truncated"),
        (False, " x x x", True, "missing_output"),
        (False, " x\n\nTask: b\nInput: c\nOutput: d", True, "missing_output"),
        (False, " x\nOutput:  \n\n", True, "empty_output"),
        (True, " Negative\nInput: bad food\n\nTask", False, ("bad food", "Negative")),
        (True, " Montreal\n\nTask: b", True, ("", "Montreal")),
        (True, " Montreal", True, ("", "Montreal")),
        (True, " Montreal", False, "truncated"),
        (True, "\nInput: foo", True, "empty_output"),
    ],
)
def test_parse_completion(
    is_classification: bool, completion: str, finished: bool, expected: tuple | str
) -> None:
    parsed = parse_completion("Do  the\ttask.", is_classification, completion, finished=finished)
    if isinstance(expected, str):
        assert parsed == Parsed(None, expected)
    else:
        assert parsed == Parsed(Instance("Do the task.", *expected))
