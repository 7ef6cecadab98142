"""Batched text generation behind a small backend interface.

Stages ask a ``GenerationBackend`` for completions and Yes/No probabilities; they never
call a library directly, so a GPU backend (vLLM) can be added without touching them.
The transformers backend sorts prompts by length, pads on the left and runs fixed-size
batches, which is what makes a CPU run bearable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from refine_af import models
from refine_af.config import RunConfig

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 42


@dataclass(frozen=True)
class Completion:
    """Generated text (cut before any stop string) and why generation ended."""

    text: str
    finish_reason: FinishReason
    num_tokens: int


class GenerationBackend(Protocol):
    def generate(
        self, prompts: Sequence[str], params: SamplingParams, *, chat: bool = False
    ) -> list[Completion]:
        """One completion per prompt, in prompt order."""
        ...

    def yes_probability(self, prompts: Sequence[str], *, chat: bool = False) -> list[float]:
        """P(Yes) / (P(Yes) + P(No)) for the token that follows each (rendered) prompt."""
        ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def length_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Index batches of similar length, longest first: less padding in each batch.

    Callers put each result back at its index, so the order they return is the input's.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class TransformersBackend:
    """Generation with a transformers causal LM, in length-sorted left-padded batches."""

    def __init__(
        self, tokenizer, model, batch_size: int = 16, *, add_special_tokens: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.batch_size = batch_size
        # True for prompts a model was fine-tuned on as plain text (trl adds a BOS to those)
        self.add_special_tokens = add_special_tokens

    @classmethod
    def from_reference(
        cls,
        reference: str,
        *,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 16,
        expected_base: str | None = None,
        add_special_tokens: bool = False,
    ) -> TransformersBackend:
        tokenizer = models.load_tokenizer(reference)
        model = models.load_causal_lm(
            reference, dtype=dtype, device=device, expected_base=expected_base
        )
        return cls(tokenizer, model, batch_size, add_special_tokens=add_special_tokens)

    def render(self, prompt: str, *, chat: bool) -> str:
        """The prompt as the model sees it: in its chat template when asked and available."""
        if chat and self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=self.add_special_tokens
        )
        return {k: v.to(self.model.device) for k, v in encoded.items()}

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[str], params: SamplingParams, *, chat: bool = False
    ) -> list[Completion]:
        results: list[Completion | None] = [None] * len(prompts)
        sampling = params.temperature > 0
        for batch_no, batch in enumerate(length_batches(prompts, self.batch_size)):
            torch.manual_seed(params.seed + batch_no)
            inputs = self._encode([self.render(prompts[i], chat=chat) for i in batch])
            output = self.model.generate(
                **inputs,
                max_new_tokens=params.max_new_tokens,
                do_sample=sampling,
                temperature=params.temperature if sampling else None,
                top_p=params.top_p if sampling else None,
                top_k=None,
                repetition_penalty=params.repetition_penalty,
                stop_strings=list(params.stop) or None,
                tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            for row, index in enumerate(batch):
                results[index] = self._completion(new_tokens[row], params)
        return [r for r in results if r is not None]

    def _completion(self, tokens: torch.Tensor, params: SamplingParams) -> Completion:
        pad = self.tokenizer.pad_token_id
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        ids = tokens.tolist()
        while ids and ids[-1] == pad and pad not in eos_ids:
            ids.pop()
        ended_by_eos = any(i in eos_ids for i in ids)
        if ended_by_eos:
            ids = ids[: next(k for k, i in enumerate(ids) if i in eos_ids)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, params.stop)
        finished = ended_by_eos or stopped or len(ids) < params.max_new_tokens
        return Completion(text, "stop" if finished else "length", len(ids))

    def _answer_token_ids(self, word: str) -> list[int]:
        """First token of the answer word with and without a leading space."""
        ids = {self.tokenizer.encode(w, add_special_tokens=False)[0] for w in (word, " " + word)}
        return sorted(ids)

    @torch.inference_mode()
    def yes_probability(self, prompts: Sequence[str], *, chat: bool = False) -> list[float]:
        yes_ids, no_ids = self._answer_token_ids("Yes"), self._answer_token_ids("No")
        results = [0.0] * len(prompts)
        for batch in length_batches(prompts, self.batch_size):
            inputs = self._encode([self.render(prompts[i], chat=chat) for i in batch])
            logits = self.model(**inputs).logits[:, -1, :].float()
            probs = torch.softmax(logits, dim=-1)
            yes = probs[:, yes_ids].sum(dim=-1)
            no = probs[:, no_ids].sum(dim=-1)
            share = (yes / (yes + no).clamp_min(1e-12)).tolist()
            for row, index in enumerate(batch):
                results[index] = share[row]
        return results


def backend_for(
    config: RunConfig,
    reference: str | None = None,
    *,
    batch_size: int | None = None,
    add_special_tokens: bool = False,
) -> GenerationBackend:
    """The backend a run configuration asks for, for its base model or an adapter of it.

    With ``generation.backend: openai`` the configured server generates; an adapter it cannot
    serve is generated for in-process instead, and the step says so.
    """
    reference = reference or config.model.base
    if config.generation.backend == "openai":
        from refine_af.endpoint import endpoint_for

        backend = endpoint_for(config, reference)
        if backend is not None:
            return backend
    return TransformersBackend.from_reference(
        reference,
        dtype=config.model.dtype,
        device=config.model.device,
        batch_size=batch_size or config.generation.batch_size,
        expected_base=config.model.base if reference != config.model.base else None,
        add_special_tokens=add_special_tokens,
    )
