"""Self-Instruct's instruction generation: its prompt, its parser, its filter rules, and
its few-shot classification question (Wang et al., 2023).

The model continues a numbered list of tasks; the continuation is split into candidate
instructions, and a candidate that breaks a rule (length, blocked words or prefixes, a
leading punctuation mark) is filtered with the rule's name as the reason.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence

from refine_af.config import InstructionsSettings
from refine_af.generation import Completion, GenerationBackend
from refine_af.records import SeedTask

_ITEM_SPLIT = re.compile(r"\n\d+\s?\. ")


def encode_prompt(instructions: Sequence[str]) -> str:
    """Self-Instruct's numbered-list prompt; the model continues after the last number."""
    lines = ["Come up with a series of tasks:"]
    for number, instruction in enumerate(instructions, start=1):
        text = re.sub(r"\s+", " ", instruction).strip().rstrip(":")
        lines.append(f"{number}. {text}")
    return "\n".join(lines) + f"\n{len(instructions) + 1}."


def parse_continuation(
    completion: Completion, on_token_limit: str = "drop_last"
) -> tuple[list[str], str | None]:
    """Candidate instructions of one continuation, and the text cut off by the token limit.

    When generation hit the token limit the last item is unfinished, so it is set aside
    (to the quarantine) instead of being judged as an instruction; with ``drop_response``
    the whole continuation is, as Self-Instruct's ``post_process_gpt3_response`` does.
    """
    if completion.finish_reason == "length" and on_token_limit == "drop_response":
        return [], completion.text or None
    items = [re.sub(r"\s+", " ", item).strip() for item in _ITEM_SPLIT.split(completion.text)]
    items = [item[0].upper() + item[1:].lower() if item else item for item in items]
    truncated = items.pop() if completion.finish_reason == "length" and items else None
    return [item for item in items if item], truncated or None


def rule_violation(candidate: str, settings: InstructionsSettings) -> str | None:
    """Why Self-Instruct's rules reject a candidate, or None when it passes them."""
    words = len(candidate.split())
    if words <= settings.min_words:
        return "too_short"
    if words > settings.max_words:
        return "too_long"
    for word in settings.blocked_words:
        if re.search(rf"\b{re.escape(word)}\b", candidate, flags=re.IGNORECASE):
            return "blocked_word"
    if candidate.startswith(tuple(settings.blocked_prefixes)):
        return "blocked_prefix"
    if candidate[0] in string.punctuation:
        return "starts_with_punctuation"
    if not candidate[0].isascii():
        return "starts_non_ascii"
    return None


class ClassificationDetector:
    """Few-shot Yes/No prompt built from labelled seed tasks; Yes wins above 0.5."""

    QUESTION = (
        "Can the following task be regarded as a classification task with finite output labels?"
    )

    def __init__(self, backend: GenerationBackend, seeds: Sequence[SeedTask], shots: int) -> None:
        rng = random.Random(0)
        positive = [s.instruction for s in seeds if s.is_classification]
        negative = [s.instruction for s in seeds if not s.is_classification]
        half = shots // 2
        examples = [(t, "Yes") for t in rng.sample(positive, min(half, len(positive)))]
        examples += [(t, "No") for t in rng.sample(negative, min(half, len(negative)))]
        rng.shuffle(examples)
        self.backend = backend
        self.prefix = (
            self.QUESTION
            + "\n\n"
            + "".join(
                f"Task: {task}\nIs it classification? {answer}\n\n" for task, answer in examples
            )
        )

    def prompt(self, instruction: str) -> str:
        return f"{self.prefix}Task: {instruction}\nIs it classification?"

    def __call__(self, instructions: Sequence[str]) -> list[bool]:
        if not instructions:
            return []
        probabilities = self.backend.yes_probability([self.prompt(i) for i in instructions])
        return [p > 0.5 for p in probabilities]
