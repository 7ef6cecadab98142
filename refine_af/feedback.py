"""Automated feedback: scorers of (instruction, input, output) and the composite reward.

REFINE-AF replaces human preference with automated scores of each written instance: a
reward model's score and UniEval's naturalness, coherence and understandability. Offline
(the ``local-cpu`` preset) an LLM judge asks the same questions of a small instruct model.
Every scorer maps a batch of instances to one float each, in eval mode and without
gradients, so the same instance always gets the same score. The composite reward combines
them as ``r = Σ wᵢ·sᵢ + b``; an instance that could not be parsed, or that a scorer gave a
non-finite score, gets a fixed floor instead, so no NaN ever reaches an optimizer.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, get_args

import torch

from refine_af import models
from refine_af.config import JUDGE_DIMENSIONS, UNIEVAL_DIMENSIONS, RewardSettings, ScorerSettings
from refine_af.errors import InputError
from refine_af.generation import GenerationBackend, TransformersBackend, length_batches
from refine_af.instances_format import Instance, Parsed, ParseFailure

NONFINITE = "nonfinite"
FAILURES = (*get_args(ParseFailure), NONFINITE)  # why an item gets the floor

# UniEval's own dialogue questions (maszhongming/UniEval, utils.add_question); the
# "dialogue history" is the instruction and input, the "response" the output.
UNIEVAL_QUESTIONS = {
    "naturalness": "question: Is this a natural response in the dialogue? </s> response: {output}",
    "coherence": "question: Is this a coherent response given the dialogue history? "
    "</s> response: {output} </s> dialogue history: {history}",
    "understandability": "question: Is this an understandable response in the dialogue? "
    "</s> response: {output}",
}

# The LLM judge is asked the same questions; helpfulness stands in for the reward model.
JUDGE_QUESTIONS = {
    "helpfulness": "Is this a helpful response that correctly does what the dialogue history asks?",
    "naturalness": "Is this a natural response in the dialogue?",
    "coherence": "Is this a coherent response given the dialogue history?",
    "understandability": "Is this an understandable response in the dialogue?",
}
JUDGE_TEMPLATE = (
    "Dialogue history: {history}\nResponse: {output}\n\nQuestion: {question} Answer Yes or No."
)


class Scorer(Protocol):
    """Scores instances; one float per instance, in order."""

    name: str

    def score(self, instances: Sequence[Instance]) -> list[float]: ...


def history(instance: Instance) -> str:
    """The request a response answers: the instruction, then its input if it has one."""
    return "\n".join(part for part in (instance.instruction, instance.input) if part)


# ---------------------------------------------------------------- reward model


class RewardModelScorer:
    """A sequence-classification reward model's logit for (request, response).

    OpenAssistant's DeBERTa reward models were trained on (question, answer) sentence pairs;
    their GPT-NeoX ones on ``<|prompter|>q<|endoftext|><|assistant|>a<|endoftext|>``, with
    the score read at the last token.
    """

    name = "reward_model"

    def __init__(
        self, tokenizer, model, *, prompt_format: str, max_length: int, batch_size: int
    ) -> None:
        if model.config.num_labels != 1:
            raise InputError(
                f"reward model {model.config.name_or_path!r} has {model.config.num_labels} "
                "outputs; a reward model has one (num_labels=1)"
            )
        if prompt_format == "auto":
            prompt_format = "oasst" if model.config.model_type == "gpt_neox" else "pair"
        self.tokenizer, self.model = tokenizer, model
        self.prompt_format, self.max_length, self.batch_size = prompt_format, max_length, batch_size
        if prompt_format == "oasst":
            self._pad_for_last_token_pooling()
        else:
            tokenizer.padding_side = "right"
            model.config.pad_token_id = tokenizer.pad_token_id

    def _pad_for_last_token_pooling(self) -> None:
        """Pad on the left with an id that the model's pooling cannot mistake for EOS.

        Decoder classifiers score the rightmost token that is not the pad id. The format
        ends with EOS, so when EOS doubles as the pad token the score would be read one
        token early; padded positions are masked, so any other id pads just as well.
        """
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"  # keep the end, where the score is read
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            other = next(i for i in range(len(tokenizer)) if i != tokenizer.eos_token_id)
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(other)
        self.model.config.pad_token_id = tokenizer.pad_token_id

    def _encode(self, instances: Sequence[Instance]) -> dict[str, torch.Tensor]:
        requests = [history(i) for i in instances]
        responses = [i.output for i in instances]
        if self.prompt_format == "pair":
            encoded = self.tokenizer(
                requests, responses, truncation=True, max_length=self.max_length,
                padding=True, return_tensors="pt",
            )  # fmt: skip
        else:
            eos = self.tokenizer.eos_token
            texts = [
                f"<|prompter|>{q}{eos}<|assistant|>{a}{eos}"
                for q, a in zip(requests, responses, strict=True)
            ]
            encoded = self.tokenizer(
                texts, truncation=True, max_length=self.max_length, padding=True,
                return_tensors="pt", add_special_tokens=False,
            )  # fmt: skip
        return {k: v.to(self.model.device) for k, v in encoded.items()}

    @torch.inference_mode()
    def score(self, instances: Sequence[Instance]) -> list[float]:
        results = [0.0] * len(instances)
        texts = [history(i) + i.output for i in instances]
        for batch in length_batches(texts, self.batch_size):
            logits = self.model(**self._encode([instances[i] for i in batch])).logits
            for row, index in enumerate(batch):
                results[index] = logits[row, 0].float().item()
        return results


# ---------------------------------------------------------------- UniEval


class UniEvalModel:
    """UniEval's T5 boolean QA: P(Yes) / (P(Yes) + P(No)) at the first decoder step."""

    def __init__(self, tokenizer, model, *, max_length: int, batch_size: int) -> None:
        tokenizer.padding_side = "right"
        self.tokenizer, self.model = tokenizer, model
        self.max_length, self.batch_size = max_length, batch_size
        self.yes_id = tokenizer("Yes", add_special_tokens=False).input_ids[0]
        self.no_id = tokenizer("No", add_special_tokens=False).input_ids[0]

    @torch.inference_mode()
    def yes_share(self, texts: Sequence[str]) -> list[float]:
        results = [0.0] * len(texts)
        start = self.model.config.decoder_start_token_id
        for batch in length_batches(texts, self.batch_size):
            encoded = self.tokenizer(
                [texts[i] for i in batch], truncation=True, max_length=self.max_length,
                padding=True, return_tensors="pt",
            ).to(self.model.device)  # fmt: skip
            decoder_input_ids = torch.full(
                (len(batch), 1), start, dtype=torch.long, device=self.model.device
            )
            logits = self.model(**encoded, decoder_input_ids=decoder_input_ids).logits[:, 0, :]
            # softmax's shares of Yes and No, relative to each other: sigmoid of their difference
            shares = torch.sigmoid(logits[:, self.yes_id].float() - logits[:, self.no_id].float())
            for row, index in enumerate(batch):
                results[index] = shares[row].item()
        return results


class UniEvalScorer:
    """One UniEval dialogue dimension; the dimensions share one loaded model."""

    def __init__(self, unieval: UniEvalModel, dimension: str) -> None:
        self.unieval, self.question = unieval, UNIEVAL_QUESTIONS[dimension]
        self.name = f"unieval.{dimension}"

    def score(self, instances: Sequence[Instance]) -> list[float]:
        texts = [self.question.format(output=i.output, history=history(i)) for i in instances]
        return self.unieval.yes_share(texts)


# ---------------------------------------------------------------- LLM judge


class JudgeScorer:
    """A causal instruct model's P(Yes) / (P(Yes) + P(No)) for one question.

    The backend is in-process or a server that returns logprobs; either puts a chat prompt
    in the model's template (the server's own chat endpoint does that there).
    """

    def __init__(self, backend: GenerationBackend, dimension: str, *, chat: bool) -> None:
        self.backend, self.question, self.chat = backend, JUDGE_QUESTIONS[dimension], chat
        self.name = f"llm_judge.{dimension}"

    def prompt(self, instance: Instance) -> str:
        text = JUDGE_TEMPLATE.format(
            history=history(instance), output=instance.output, question=self.question
        )
        return text if self.chat else text + "\nAnswer:"

    def score(self, instances: Sequence[Instance]) -> list[float]:
        return self.backend.yes_probability([self.prompt(i) for i in instances], chat=self.chat)


# ---------------------------------------------------------------- building scorers


def build_scorers(
    settings: ScorerSettings,
    names: Sequence[str],
    *,
    judge_backend: GenerationBackend | None = None,
) -> dict[str, Scorer]:
    """The named scorers, each family's model loaded once (only families that are named).

    ``judge_backend``, when given, answers the LLM judge's questions instead of an
    in-process copy of ``llm_judge.model`` (a server that serves that model).
    """
    families = {name.split(".")[0] for name in names}
    scorers: dict[str, Scorer] = {}
    if "reward_model" in families:
        rm = settings.reward_model
        scorers["reward_model"] = RewardModelScorer(
            models.load_tokenizer(rm.model),
            models.load_sequence_classifier(rm.model, dtype=rm.dtype, device=rm.device),
            prompt_format=rm.prompt_format,
            max_length=rm.max_length,
            batch_size=rm.batch_size,
        )
    if "unieval" in families:
        ue = settings.unieval
        unieval = UniEvalModel(
            models.load_tokenizer(ue.model),
            models.load_seq2seq_lm(ue.model, dtype=ue.dtype, device=ue.device),
            max_length=ue.max_length,
            batch_size=ue.batch_size,
        )
        scorers.update({f"unieval.{d}": UniEvalScorer(unieval, d) for d in UNIEVAL_DIMENSIONS})
    if "llm_judge" in families:
        judge = settings.llm_judge
        backend = judge_backend or TransformersBackend.from_reference(
            judge.model, dtype=judge.dtype, device=judge.device, batch_size=judge.batch_size
        )
        scorers.update(
            {f"llm_judge.{d}": JudgeScorer(backend, d, chat=judge.chat) for d in JUDGE_DIMENSIONS}
        )
    return {name: scorers[name] for name in names}


# ---------------------------------------------------------------- the composite reward


@dataclass(frozen=True)
class RewardBatch:
    """Composite rewards of a batch, each component's scores and why items got the floor.

    ``scores[name][k]`` is None where item k got the floor; ``failures[k]`` is None for a
    scored item, else a parse failure or ``nonfinite``.
    """

    rewards: list[float]
    scores: dict[str, list[float | None]]
    failures: list[str | None]

    def failure_counts(self) -> Counter[str]:
        return Counter(f for f in self.failures if f is not None)


@dataclass
class CompositeReward:
    """``r = Σ wᵢ·sᵢ + bias`` over the components; ``floor`` for unparsed or non-finite items."""

    components: list[tuple[Scorer, float]]
    bias: float = 0.0
    floor: float = -1.0
    # over every call: items seen ("scored") and items floored, by reason
    totals: Counter[str] = field(default_factory=Counter)

    @classmethod
    def from_settings(cls, settings: RewardSettings, scorers: dict[str, Scorer]) -> CompositeReward:
        components = [(scorers[c.scorer], c.weight) for c in settings.components]
        return cls(components, bias=settings.bias, floor=settings.floor)

    def definition(self) -> dict[str, object]:
        """What produced the rewards, for the record next to whatever they trained."""
        return {
            "formula": "r = sum(weight * score) + bias; floor if unparsed or non-finite",
            "components": [{"scorer": s.name, "weight": w} for s, w in self.components],
            "bias": self.bias,
            "floor": self.floor,
        }

    def __call__(self, parsed: Sequence[Parsed]) -> RewardBatch:
        batch = self._score(parsed)
        self._count(batch)
        return batch

    def per_completion(self, groups: Sequence[Sequence[Parsed]]) -> RewardBatch:
        """One reward per completion: the mean over the instances it holds.

        A completion that writes several instances (Self-Instruct's format) is worth the
        mean of their rewards, which is ``Σ wᵢ·mean(sᵢ) + bias`` as the sum is linear; one
        with no scored instance gets the floor and its first item's reason.
        """
        flat = self._score([p for group in groups for p in group])
        rewards: list[float] = []
        scores: dict[str, list[float | None]] = {name: [] for name in flat.scores}
        failures: list[str | None] = []
        start = 0
        for group in groups:
            span = range(start, start + len(group))
            start = span.stop
            scored = [k for k in span if flat.failures[k] is None]
            if not scored:
                rewards.append(self.floor)
                failures.append(next((flat.failures[k] for k in span), "missing_output"))
                for values in scores.values():
                    values.append(None)
                continue
            rewards.append(math.fsum(flat.rewards[k] for k in scored) / len(scored))
            failures.append(None)
            for name, values in scores.items():
                values.append(math.fsum(flat.scores[name][k] for k in scored) / len(scored))
        batch = RewardBatch(rewards, scores, failures)
        self._count(batch)
        return batch

    def _count(self, batch: RewardBatch) -> None:
        self.totals.update(batch.failure_counts())
        self.totals["scored"] += len(batch.rewards)

    def _score(self, parsed: Sequence[Parsed]) -> RewardBatch:
        valid = [k for k, p in enumerate(parsed) if p.instance is not None]
        instances = [parsed[k].instance for k in valid]
        failures: list[str | None] = [p.failure for p in parsed]
        raw: dict[str, list[float]] = {}
        for scorer, _ in self.components:
            raw[scorer.name] = scorer.score(instances) if instances else []
        scores: dict[str, list[float | None]] = {
            s.name: [None] * len(parsed) for s, _ in self.components
        }
        rewards = [self.floor] * len(parsed)
        for position, k in enumerate(valid):
            item = {name: values[position] for name, values in raw.items()}
            if not all(math.isfinite(v) for v in item.values()):
                failures[k] = NONFINITE
                continue
            for name, value in item.items():
                scores[name][k] = value
            rewards[k] = sum(w * item[s.name] for s, w in self.components) + self.bias
        return RewardBatch(rewards, scores, failures)
