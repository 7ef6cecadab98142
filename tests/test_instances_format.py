"""instances_format: the instance-generation prompt and the parser stages 2 and 3 share."""

import pytest

from refine_af.instances_format import (
    INPUT_FIRST_PREFIX,
    OUTPUT_FIRST_PREFIX,
    SELF_INSTRUCT_INPUT_FIRST,
    SELF_INSTRUCT_OUTPUT_FIRST,
    Instance,
    Parsed,
    build_prompt,
    parse_completion,
    parse_instances,
    stop_strings,
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


# ---------------------------------------------------------------- Self-Instruct's format


def test_self_instruct_prompts_end_after_the_task_as_self_instructs_do() -> None:
    plain = build_prompt("Sort the numbers.", False, "self_instruct")
    assert plain == SELF_INSTRUCT_INPUT_FIRST + "Task: Sort the numbers.\n"
    labelled = build_prompt("Is it positive?", True, "self_instruct")
    assert labelled == SELF_INSTRUCT_OUTPUT_FIRST + "Task: Is it positive?\n"
    assert stop_strings("self_instruct", 5) == ("Example 6", "Task:")


def test_every_self_instruct_prefix_example_parses_into_its_instances() -> None:
    for prefix, is_classification in (
        (SELF_INSTRUCT_INPUT_FIRST, False),
        (SELF_INSTRUCT_OUTPUT_FIRST, True),
    ):
        for example in prefix.strip().split("\n\n")[1:]:
            task, completion = example.split("\n", 1)
            items = parse_instances(
                task.removeprefix("Task: "), is_classification, completion, format="self_instruct"
            )
            assert items and all(item.instance is not None for item in items), example
    sorted_numbers = SELF_INSTRUCT_INPUT_FIRST.split("\n\n")[1].split("\n", 1)[1]
    items = parse_instances("Sort the numbers.", False, sorted_numbers, format="self_instruct")
    assert [(i.instance.input, i.instance.output) for i in items] == [
        ("7, -2, 15, 3", "-2, 3, 7, 15"),
        ("40, 4, 14", "4, 14, 40"),
    ]


def test_several_examples_in_one_completion_and_the_cut_one_is_dropped() -> None:
    text = (
        "Example 1\nInput: 3, 1\nOutput: 1, 3\nExample 2\nInput: 9, 5\nOutput: 5, 9\n"
        "Example 3\nInput: 4, 2\nOutput: 2,"
    )
    finished = parse_instances("Sort.", False, text, finished=True, format="self_instruct")
    assert [p.instance.output for p in finished] == ["1, 3", "5, 9", "2,"]
    cut = parse_instances("Sort.", False, text, finished=False, format="self_instruct")
    assert [p.instance.output for p in cut[:2]] == ["1, 3", "5, 9"]
    assert cut[2] == Parsed(None, "truncated")


def test_stop_strings_end_a_completion_as_generation_would_have() -> None:
    text = "Example 1\nOutput: A\nExample 2\nOutput: B\nExample 3\nOutput: C\nTask: more"
    items = parse_instances(
        "Name a letter.", False, text, finished=False, format="self_instruct", max_instances=2
    )
    assert [p.instance.output for p in items] == ["A", "B"]  # cut at "Example 3": finished


def test_one_output_without_examples_and_no_output_at_all() -> None:
    one = parse_instances("Name a bakery.", False, "Output: Crumb Free", format="self_instruct")
    assert one == [Parsed(Instance("Name a bakery.", "", "Crumb Free"))]
    none = parse_instances("Name a bakery.", False, "Crumb Free", format="self_instruct")
    assert none == [Parsed(None, "missing_output")]


def test_classification_writes_one_block_per_label() -> None:
    text = (
        "Class label: Negative\nInput: It broke.\nClass label: Positive\nInput: It works.\n"
        "Class label: Neutral"
    )
    items = parse_instances("Sentiment?", True, text, format="self_instruct")
    assert [(p.instance.input, p.instance.output) for p in items] == [
        ("It broke.", "Negative"),
        ("It works.", "Positive"),
        ("", "Neutral"),
    ]
    cut = parse_instances("Sentiment?", True, text, finished=False, format="self_instruct")
    assert cut[-1] == Parsed(None, "truncated") and len(cut) == 3
    assert parse_instances("Sentiment?", True, "Negative", format="self_instruct") == [
        Parsed(None, "missing_output")
    ]


def test_one_per_prompt_is_parse_completion() -> None:
    assert parse_instances("Sort.", False, " 3, 1\nOutput: 1, 3") == [
        parse_completion("Sort.", False, " 3, 1\nOutput: 1, 3")
    ]
