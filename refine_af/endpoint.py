"""Generation through an OpenAI-compatible server: vLLM on a cluster, ``transformers serve`` here.

The server batches and scales; this backend only keeps up to ``max_concurrency`` requests
in flight and puts the answers back in prompt order. Retries and timeouts are the official
``openai`` client's. A request that still fails stops the stage with ``EndpointUnavailable``
(exit 1, naming URL and model) before it writes anything.

Servers differ in two ways that matter here, so the configuration names the server:
- vLLM returns token logprobs (the judge's P(Yes)) and serves LoRA adapters next to the
  base (``--enable-lora``), registered at run time through ``/v1/load_lora_adapter``.
- ``transformers serve`` returns no logprobs (its ``/v1/completions`` and chat endpoints
  ignore ``logprobs``; its ``/v1/systemone`` typed decisions answer with the prompts of
  transformers' ``DecisionPipeline``, not ours), so the judge stays in-process; and it loads
  full model folders only (an adapter folder has no config.json), so a step that generates
  with an adapter falls back to in-process generation and says so.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import openai

from refine_af import models
from refine_af.config import EndpointSettings, RunConfig
from refine_af.errors import EndpointUnavailable
from refine_af.generation import Completion, SamplingParams, cut_at_stop

T = TypeVar("T")
# How many alternatives the judge asks for at its one answer token: "Yes"/"No" in either
# spelling are among them whenever they carry noticeable probability.
TOP_LOGPROBS = 20


@dataclass(frozen=True)
class ServerTraits:
    logprobs: bool
    runtime_adapters: bool  # LoRA adapters registered at run time and named as the model
    repetition_penalty_field: str  # transformers serve maps frequency_penalty f to 1 + f


SERVERS = {
    "vllm": ServerTraits(
        logprobs=True, runtime_adapters=True, repetition_penalty_field="repetition_penalty"
    ),
    "transformers": ServerTraits(
        logprobs=False, runtime_adapters=False, repetition_penalty_field="frequency_penalty"
    ),
}


class LogprobsUnavailable(RuntimeError):
    """A server said to return logprobs answered without them."""


class OpenAIBackend:
    """Completions from an OpenAI-compatible server, concurrently, in prompt order."""

    def __init__(
        self, client: openai.OpenAI, model: str, *, server: str = "vllm", max_concurrency: int = 32
    ) -> None:
        self.client, self.model = client, model
        self.traits = SERVERS[server]
        self.max_concurrency = max_concurrency

    @classmethod
    def from_settings(cls, settings: EndpointSettings, model: str) -> OpenAIBackend:
        client = openai.OpenAI(
            base_url=settings.base_url,
            # servers without auth accept any key; the client insists on one
            api_key=os.environ.get(settings.api_key_env) or "EMPTY",
            timeout=settings.timeout,
            max_retries=settings.max_retries,
        )
        return cls(client, model, server=settings.server, max_concurrency=settings.max_concurrency)

    @property
    def url(self) -> str:
        return str(self.client.base_url)

    def _call(self, request: Callable[[], T]) -> T:
        status = None
        try:
            return request()
        except openai.APIStatusError as err:
            status, reason = err.status_code, f"HTTP {err.status_code}: {_detail(err)}"
        except openai.APITimeoutError:
            reason = f"no answer within {self.client.timeout} s"
        except openai.APIConnectionError as err:
            reason = f"cannot connect ({err.__cause__ or err})"
        error = EndpointUnavailable(
            f"generation endpoint {self.url} (model {self.model!r}) failed after "
            f"{self.client.max_retries} retries: {reason}"
        )
        error.status_code = status
        raise error

    def _in_order(self, work: Callable[[int], T], count: int) -> list[T]:
        """work(0 … count-1), up to max_concurrency at once; a failure cancels what is queued."""
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(count, 1))) as pool:
            futures = [pool.submit(work, i) for i in range(count)]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _sampling(self, params: SamplingParams, index: int) -> dict[str, Any]:
        sampling: dict[str, Any] = {
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            # each request its own seed: repeated prompts must give different samples
            "seed": params.seed + index,
        }
        if params.temperature > 0:
            sampling["top_p"] = params.top_p
        if params.stop:
            sampling["stop"] = list(params.stop)
        if params.repetition_penalty != 1.0:
            if self.traits.repetition_penalty_field == "frequency_penalty":
                sampling["frequency_penalty"] = params.repetition_penalty - 1.0
            else:
                sampling["extra_body"] = {"repetition_penalty": params.repetition_penalty}
        return sampling

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, *, chat: bool = False
    ) -> list[Completion]:
        def one(index: int) -> Completion:
            sampling = self._sampling(params, index)
            if chat:
                response = self._call(
                    lambda: self.client.chat.completions.create(
                        model=self.model,
                        messages=[{"role": "user", "content": prompts[index]}],
                        **sampling,
                    )
                )
                text = response.choices[0].message.content or ""
            else:
                response = self._call(
                    lambda: self.client.completions.create(
                        model=self.model, prompt=prompts[index], **sampling
                    )
                )
                text = response.choices[0].text
            return _completion(text, response, params)

        return self._in_order(one, len(prompts))

    def yes_probability(self, prompts: Sequence[str], *, chat: bool = False) -> list[float]:
        """P(Yes) / (P(Yes) + P(No)) from the top logprobs of the one answer token.

        A server without logprobs answers in words instead, as Self-Instruct asked: the
        greedy answer gives 1.0 (Yes), 0.0 (No) or 0.5 (neither). That decides a Yes/No
        question (stage 1) but is no graded score, so the judge does not use it.
        """
        if not self.traits.logprobs:
            answers = self.generate(
                prompts, SamplingParams(max_new_tokens=2, temperature=0.0), chat=chat
            )
            return [_worded_share(a.text) for a in answers]

        def one(index: int) -> float:
            if chat:
                response = self._call(
                    lambda: self.client.chat.completions.create(
                        model=self.model,
                        messages=[{"role": "user", "content": prompts[index]}],
                        max_tokens=1,
                        temperature=0.0,
                        logprobs=True,
                        top_logprobs=TOP_LOGPROBS,
                    )
                )
                content = response.choices[0].logprobs and response.choices[0].logprobs.content
                top = {t.token: t.logprob for t in content[0].top_logprobs} if content else None
            else:
                response = self._call(
                    lambda: self.client.completions.create(
                        model=self.model,
                        prompt=prompts[index],
                        max_tokens=1,
                        temperature=0.0,
                        logprobs=TOP_LOGPROBS,
                    )
                )
                logprobs = response.choices[0].logprobs
                top = logprobs.top_logprobs[0] if logprobs and logprobs.top_logprobs else None
            if top is None:
                raise LogprobsUnavailable(f"{self.url} answered without logprobs")
            return yes_share(top)

        return self._in_order(one, len(prompts))

    def load_adapter(self, location: str) -> str:
        """Register a LoRA adapter with the server (vLLM) and return the name to ask for.

        The server must read ``location`` itself (the same volume, or a path it mounts) and
        allow runtime updates (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``).
        """
        name = "refine-af-" + hashlib.sha256(location.encode()).hexdigest()[:12]
        self._call(
            lambda: self.client.post(
                "/load_lora_adapter",
                body={"lora_name": name, "lora_path": location},
                cast_to=str,
            )
        )
        return name


def yes_share(top_logprobs: dict[str, float]) -> float:
    """Share of "Yes" among the answer token's "Yes" and "No" (with or without a space),
    the same tokens the in-process judge adds up."""
    yes = sum(math.exp(lp) for token, lp in top_logprobs.items() if token in ("Yes", " Yes"))
    no = sum(math.exp(lp) for token, lp in top_logprobs.items() if token in ("No", " No"))
    return yes / max(yes + no, 1e-12)


def _worded_share(answer: str) -> float:
    word = answer.strip().split(maxsplit=1)[0].strip(".,!") if answer.strip() else ""
    return {"Yes": 1.0, "No": 0.0}.get(word, 0.5)


def _completion(text: str, response: Any, params: SamplingParams) -> Completion:
    text, stopped = cut_at_stop(text, params.stop)  # servers differ on keeping the stop string
    reason = response.choices[0].finish_reason
    tokens = response.usage.completion_tokens if response.usage else 0
    return Completion(text, "length" if reason == "length" and not stopped else "stop", tokens)


def _detail(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, dict):
        body = body.get("detail") or body.get("message") or body.get("error") or body
    return str(body)[:500]


def served_base(config: RunConfig) -> str:
    """The name the server knows model.base by: endpoint.model, or the base itself (a
    builtin alias as its local folder, which a local ``transformers serve`` can open)."""
    if config.generation.endpoint.model:
        return config.generation.endpoint.model
    base = config.model.base
    return models.resolve(base) if base in models.BUILTIN_MODELS else base


def endpoint_for(config: RunConfig, reference: str) -> OpenAIBackend | None:
    """The endpoint backend for the base model or a LoRA adapter of it.

    None where the server cannot serve the adapter: the caller generates in-process.
    """
    settings = config.generation.endpoint
    backend = OpenAIBackend.from_settings(settings, served_base(config))
    if reference == config.model.base:
        return backend
    if not backend.traits.runtime_adapters:
        print(
            f"{settings.server} serve cannot serve LoRA adapters: generating with {reference} "
            "in-process",
            file=sys.stderr,
        )
        return None
    try:
        backend.model = backend.load_adapter(reference)
        backend.generate(["Hello"], SamplingParams(max_new_tokens=1, temperature=0.0))
    except EndpointUnavailable as err:
        if err.status_code is None:  # unreachable: no fallback hides that
            raise
        print(
            f"{backend.url} cannot serve adapter {reference} ({err}); generating in-process",
            file=sys.stderr,
        )
        return None
    return backend


def judge_endpoint(config: RunConfig) -> OpenAIBackend | None:
    """The server as the LLM judge, where it serves the judge's model and returns logprobs.

    None means the judge runs in-process (and says why when an endpoint is configured).
    """
    if config.generation.backend != "openai":
        return None
    if config.stage2.scorers.llm_judge.model != config.model.base:
        return None  # the server serves model.base only
    settings = config.generation.endpoint
    if not SERVERS[settings.server].logprobs:
        print(
            f"{settings.server} serve returns no logprobs: the LLM judge runs in-process",
            file=sys.stderr,
        )
        return None
    return OpenAIBackend.from_settings(settings, served_base(config))
