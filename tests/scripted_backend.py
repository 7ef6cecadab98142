"""A deterministic stand-in for a language model, for testing stage 1's loop without one.

Each prompt gets a numbered continuation of fresh, mutually dissimilar instructions, with
a few that the filters must catch (too short, blocked word, near-duplicate). Run as a
script it bootstraps into a folder slowly, so a test can kill it half-way.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence

from refine_af.generation import Completion, SamplingParams

WORDS = """
alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar
papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu amber basil cedar dune
ember fjord grove heath iris jade kelp lotus maple nectar olive pearl quartz raven sage thyme
umber violet willow yarrow zinnia acorn birch clover
""".split()  # noqa: SIM905 - a word list reads better as text


class ScriptedBackend:
    """Writes 4 items per prompt: 2 fresh instructions, 1 too short, 1 repeat of the first."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0

    @staticmethod
    def _fresh(rng: random.Random) -> str:
        return "Classify the " + " ".join(rng.sample(WORDS, 9))

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, *, chat: bool = False
    ) -> list[Completion]:
        self.calls += 1
        time.sleep(self.delay_s)
        rng = random.Random(params.seed)  # per round, like a seeded sampler
        completions = []
        for _ in prompts:
            first, second = self._fresh(rng), self._fresh(rng)
            text = f" {first}\n10. {second}\n11. Do it now\n12. {first.lower()}"
            completions.append(Completion(text, "stop", 40))
        return completions

    def yes_probability(self, prompts: Sequence[str]) -> list[float]:
        return [0.9 if "alpha" in p.rsplit("Task:", 1)[-1] else 0.1 for p in prompts]


if __name__ == "__main__":  # python scripted_backend.py OUT_DIR WORKSPACE TARGET [OPTION…]
    # The real command line (lock, checks, exit codes), with this backend for the model.
    from refine_af import cli
    from refine_af.stages import instructions

    out_dir, workspace, target, *options = sys.argv[1:]
    instructions.backend_for = lambda config: ScriptedBackend(delay_s=0.3)
    sys.argv = [
        "refine-af", "stage", "instructions", "--out", out_dir, "--workspace", workspace,
        "--set", f"stage1.num_instructions={target}", *options,
    ]  # fmt: skip
    cli.main()
