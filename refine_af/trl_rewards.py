"""The composite reward as trl reward functions, and its counts across resumed runs.

trl sums weighted reward functions; the composite reward is ``Σ wᵢ·sᵢ + b`` or a floor for
an item that failed. One function per scorer (weight wᵢ) plus one for the bias-or-floor
(weight 1) make trl's sum exactly the composite reward, and trl logs each component.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from refine_af import storage
from refine_af.feedback import FAILURES, CompositeReward, RewardBatch
from refine_af.instances_format import Format, parse_instances

BIAS_OR_FLOOR = "bias_or_floor"
SAMPLES_KEPT = 32
TOTALS_FILE = "refine_af_totals.json"  # in each checkpoint: what a resume cannot recompute


class _Component:
    """One scorer's score as a trl reward function (trl applies its weight and logs it)."""

    def __init__(self, rewards: TrlRewards, name: str) -> None:
        self.rewards, self.__name__ = rewards, name

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        return self.rewards.batch(prompts, completions, columns).scores[self.__name__]


class _BiasOrFloor:
    """The bias for scored items and the floor for the others (with weight 1).

    Components return None for floored items, which trl leaves out of its weighted sum, so
    trl's sum is exactly the composite reward: Σ wᵢ·sᵢ + bias, or the floor.
    """

    __name__ = BIAS_OR_FLOOR

    def __init__(self, rewards: TrlRewards) -> None:
        self.rewards = rewards

    def __call__(self, prompts, completions, **columns) -> list[float]:
        batch = self.rewards.batch(prompts, completions, columns)
        composite = self.rewards.composite
        return [composite.floor if f else composite.bias for f in batch.failures]


class TrlRewards:
    """The composite reward as trl reward functions, scored once per batch.

    trl calls every reward function with the same batch, one after the other; the first
    call parses and scores the batch and the others read the cached result.
    """

    def __init__(
        self,
        composite: CompositeReward,
        *,
        max_completion_length: int,
        eos_token_ids: set[int],
        format: Format = "one_per_prompt",
        max_instances: int = 5,
    ) -> None:
        self.composite = composite
        self.max_completion_length, self.eos_token_ids = max_completion_length, eos_token_ids
        self.format, self.max_instances = format, max_instances
        self.samples: deque[dict[str, Any]] = deque(maxlen=SAMPLES_KEPT)
        self._key: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._batch: RewardBatch | None = None

    def functions(self) -> list[Callable[..., list]]:
        components = [_Component(self, scorer.name) for scorer, _ in self.composite.components]
        return [*components, _BiasOrFloor(self)]

    def weights(self) -> list[float]:
        return [weight for _, weight in self.composite.components] + [1.0]

    def _finished(self, completion_ids: Sequence[int]) -> bool:
        return len(completion_ids) < self.max_completion_length or (
            bool(completion_ids) and completion_ids[-1] in self.eos_token_ids
        )

    def batch(self, prompts, completions, columns: dict[str, Any]) -> RewardBatch:
        key = (tuple(prompts), tuple(completions))
        if key == self._key and self._batch is not None:
            return self._batch
        groups = [
            parse_instances(
                instruction,
                is_classification,
                text,
                finished=self._finished(ids),
                format=self.format,
                max_instances=self.max_instances,
            )
            for instruction, is_classification, text, ids in zip(
                columns["instruction"],
                columns["is_classification"],
                completions,
                columns["completion_ids"],
                strict=True,
            )
        ]
        batch = self.composite.per_completion(groups)
        self._key, self._batch = key, batch
        counts = batch.failure_counts()
        if log_metric := columns.get("log_metric"):
            for failure in FAILURES:
                log_metric(f"floored/{failure}", counts[failure] / len(groups))
        for instruction, text, reward, failure in zip(
            columns["instruction"], completions, batch.rewards, batch.failures, strict=True
        ):
            self.samples.append(
                {
                    "instruction": instruction,
                    "completion": text,
                    "reward": reward,
                    "floored": failure,
                }
            )
        return batch


def totals_callback(composite: CompositeReward, seconds_before: float):
    """Save the reward totals and the seconds spent so far into every checkpoint, so the
    summary of a resumed run counts every invocation, not only the last."""
    from transformers import TrainerCallback

    started = time.monotonic()

    class SaveTotals(TrainerCallback):
        def on_save(self, args, state, control, **kwargs) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                seconds = seconds_before + time.monotonic() - started
                data = {"totals": dict(composite.totals), "seconds": seconds}
                storage.write_text(folder / TOTALS_FILE, json.dumps(data) + "\n")

    return SaveTotals()


def totals_before(checkpoint: str | None) -> tuple[dict[str, int], float]:
    """The totals and seconds saved with ``checkpoint`` (none without one)."""
    path = Path(checkpoint or "") / TOTALS_FILE
    if checkpoint is None or not path.is_file():
        return {}, 0.0
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved["totals"], float(saved["seconds"])
