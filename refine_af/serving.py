"""How a fine-tuned model is logged so that MLflow asks it questions the way stage 4 taught it.

MLflow's transformers flavor does the formatting, the decoding and the serving; this module
only chooses its settings. A model with a chat template is logged as ``llm/v1/chat``: a
request is OpenAI-style ``{"messages": [...]}`` and the flavor applies the tokenizer's chat
template, as stage 4's conversational rows did. A model without one is logged as
``llm/v1/completions`` with Alpaca's template as ``prompt_template``: a request is
``{"prompt": "..."}`` and the flavor wraps it as stage 4's Alpaca rows were wrapped. Either
way the answer comes back without the prompt, and a request may carry the generation fields
of the signature MLflow sets for its task (``REQUEST_FIELDS``; others are dropped with a
warning). What it leaves out comes from the defaults logged with the model: stage 5's token
limit and the run's sampling settings (``generation.temperature``, ``generation.top_p``;
temperature 0 logs greedy decoding, and then a request's temperature and top_p have no
effect). With sampling on, a request's temperature must be above 0, as transformers' sampler
requires; a chat request asks for greedy decoding with ``top_k: 1``.
"""

from __future__ import annotations

import sys
from typing import Any

from refine_af.templates import ALPACA_NO_INPUT, Template

CHAT_TASK = "llm/v1/chat"
COMPLETIONS_TASK = "llm/v1/completions"
# stage 4's Alpaca format for a request without a separate input; the flavor fills {prompt}
ALPACA_PROMPT_TEMPLATE = ALPACA_NO_INPUT.format(instruction="{prompt}")
# generation fields of MLflow's input schema per task (mlflow.types.llm); completions has
# neither top_p nor top_k
REQUEST_FIELDS = {
    CHAT_TASK: ("max_tokens", "temperature", "top_p", "top_k", "stop"),
    COMPLETIONS_TASK: ("max_tokens", "temperature", "stop"),
}


def inference_defaults(max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    """Generation settings a request does not override (``model_config`` of the flavor)."""
    if temperature == 0:
        return {"max_new_tokens": max_new_tokens, "do_sample": False}
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": True,
        "temperature": temperature,
        "top_p": top_p,
    }


def task_for(template: Template) -> str:
    """The flavor's inference task for a model trained with ``template``."""
    return CHAT_TASK if template == "chat" else COMPLETIONS_TASK


def flavor_arguments(
    template: Template, max_new_tokens: int, temperature: float, top_p: float
) -> dict[str, Any]:
    """``mlflow.transformers.log_model`` arguments for a model trained with ``template``."""
    arguments = {
        "task": task_for(template),
        "model_config": inference_defaults(max_new_tokens, temperature, top_p),
    }
    if template != "chat":
        arguments["prompt_template"] = ALPACA_PROMPT_TEMPLATE
    return arguments


def request(task: str, question: str, **params: Any) -> dict[str, Any]:
    """The body of one request to the served model (``POST /invocations``) or to ``predict``."""
    if task == CHAT_TASK:
        return {"messages": [{"role": "user", "content": question}], **params}
    return {"prompt": question, **params}


def answer(task: str, prediction: dict[str, Any]) -> str:
    """The text of the first choice in the flavor's OpenAI-style response."""
    choice = prediction["choices"][0]
    return choice["message"]["content"] if task == CHAT_TASK else choice["text"]


def serve_command(model_uri: str, host: str, port: int) -> list[str]:
    """``mlflow models serve`` in this environment (no new virtualenv: the packages are here)."""
    return [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
        "--env-manager", "local", "--host", host, "--port", str(port),
    ]  # fmt: skip
