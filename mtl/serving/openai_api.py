"""OpenAI-compatible completions over the served tasks: request mapping, response shapes and errors.

A task's model id is its name. ``POST /v1/completions`` serves generation
tasks with OpenAI's fields; each prompt becomes one mtl request, validated by
:meth:`mtl.server.Server.parse` like any other, and comes back as one choice.
``POST /v1/chat/completions`` (where the checkpoint carries a chat template,
:mod:`mtl.chat`) serves the same tasks: the messages rendered by the template
are the prompt, and the answer is one assistant message.
Fields that would change what OpenAI's API computes in ways mtl does not
(``n`` > 1, ``logprobs``, ``echo``, penalties, ``logit_bias``, ``suffix``) are
refused with a clear 400 rather than ignored. Errors have OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

# OpenAI fields mtl cannot honour, with the value that would mean "not asked for".
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "echo": False, "suffix": None, "logit_bias": None}
PENALTIES = ("presence_penalty", "frequency_penalty")
# Fields that change nothing mtl computes, accepted as OpenAI's clients send them.
IGNORED = ("user", "stream_options")
# mtl's own fields beside OpenAI's (docs/contract.md), passed through as they are (vLLM accepts ``priority`` so too).
EXTRA = ("priority", "deadline_ms")
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream")
CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed")
CHAT_FIELDS += ("stream",)
# Chat fields mtl cannot honour (tools, structured output, log-probabilities), with their "not asked for" value.
CHAT_UNSUPPORTED = {
    "n": 1,
    "logprobs": False,
    "top_logprobs": None,
    "logit_bias": None,
    "tools": None,
    "tool_choice": "none",
    "functions": None,
    "function_call": "none",
    "response_format": None,
    "audio": None,
    "modalities": None,
}


class OpenAIError(Exception):
    """A request the OpenAI routes refuse; :meth:`body` is OpenAI's error object."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.param)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def models(task_kinds: dict[str, str], created: int) -> dict:
    """``GET /v1/models``: every served task, generation or not (its kind says which routes answer it)."""
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "mtl", "kind": kind}
        for name, kind in sorted(task_kinds.items())
    ]
    return {"object": "list", "data": data}


def completion_requests(body: Any, task_kinds: dict[str, str]) -> list[dict]:
    """The mtl request objects (docs/contract.md's) that an OpenAI completions body asks for, one a prompt.

    Raises:
      OpenAIError: the body is not an object, names no generation task, or asks for what mtl cannot do.
    """
    request = _generation_request(body, task_kinds, "prompt", FIELDS, UNSUPPORTED)
    prompts = body["prompt"]
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise OpenAIError("prompt must be a string or a non-empty list of strings", param="prompt")
    return [{**request, "id": i, "input": p} for i, p in enumerate(prompts)]


def chat_request(body: Any, task_kinds: dict[str, str]) -> dict:
    """The mtl request object an OpenAI chat completions body asks for, without its ``input``:
    the messages (``body["messages"]``) become the prompt through the checkpoint's chat template.

    Raises:
      OpenAIError: as :func:`completion_requests`; ``max_completion_tokens`` is read as ``max_tokens``.
    """
    request = _generation_request(body, task_kinds, "messages", CHAT_FIELDS, CHAT_UNSUPPORTED)
    if body.get("max_completion_tokens") is not None:
        request["max_new_tokens"] = body["max_completion_tokens"]
    return request


def _generation_request(body: Any, task_kinds: dict[str, str], input_field: str, fields, unsupported) -> dict:
    """The fields shared by completions and chat completions, checked and in mtl's names."""
    if not isinstance(body, dict):
        raise OpenAIError(f"the request body must be a JSON object, not {type(body).__name__}")
    for field in ("model", input_field):
        if field not in body:
            raise OpenAIError(f"the request has no {field!r} field", param=field)
    unknown = sorted(set(body) - set(fields) - set(unsupported) - set(PENALTIES) - set(IGNORED) - set(EXTRA))
    if unknown:
        raise OpenAIError(f"unknown field {unknown[0]!r}", param=unknown[0])
    for field, default in unsupported.items():
        if field in body and body[field] not in (default, None):
            raise OpenAIError(f"{field}={body[field]!r} is not supported; mtl serves {field}={default!r}", param=field)
    for field in PENALTIES:
        if body.get(field, 0) not in (0, 0.0, None):
            raise OpenAIError(f"{field}={body[field]!r} is not supported; only 0", param=field)
    model = body["model"]
    kind = task_kinds.get(model) if isinstance(model, str) else None
    if kind is None:
        served = ", ".join(sorted(task_kinds))
        raise OpenAIError(f"the model {model!r} does not exist; served: {served}", 404, "model", "not_found_error")
    if kind != "generate":
        message = f"{model!r} is a {kind} task; completions serve generation tasks (use /v1/infer)"
        raise OpenAIError(message, 400, "model")
    request: dict[str, Any] = {"task": model}
    # OpenAI's defaults where they differ from /v1/infer's: sampling at temperature 1.
    request["temperature"] = 1.0 if body.get("temperature") is None else body["temperature"]
    for ours, theirs in (("max_new_tokens", "max_tokens"), ("top_p", "top_p"), ("seed", "seed"), ("stop", "stop")):
        if body.get(theirs) is not None:
            request[ours] = body[theirs]
    for field in EXTRA:
        if field in body:
            request[field] = body[field]
    return request


def openai_message(message: str) -> str:
    """An mtl validation message in OpenAI's field names."""
    if message.startswith("input "):
        message = "prompt " + message.removeprefix("input ")
    return message.replace("max_new_tokens", "max_tokens")


def new_id(prefix: str = "cmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, answers: list[dict], prompt_tokens: int) -> dict:
    """The completions response for mtl's answers (docs/contract.md's generate responses), one choice each."""
    choices = [
        {"index": i, "text": a["output"], "finish_reason": a["finish_reason"], "logprobs": None}
        for i, a in enumerate(answers)
    ]
    return {**_envelope(cid, model, choices), "usage": _usage(prompt_tokens, sum(a["tokens"] for a in answers))}


def chunk(cid: str, model: str, index: int, text: str, finish_reason: str | None) -> dict:
    """One server-sent event's object while streaming a completion."""
    choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return _envelope(cid, model, [choice])


def usage_chunk(cid: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last event of a stream asked for with ``stream_options: {"include_usage": true}``: no choices, the usage."""
    return {**_envelope(cid, model, []), "usage": _usage(prompt_tokens, completion_tokens)}


def chat_completion(cid: str, model: str, answer: dict, prompt_tokens: int) -> dict:
    """The chat completions response for mtl's answer: one assistant message."""
    message = {"role": "assistant", "content": answer["output"]}
    choice = {"index": 0, "message": message, "finish_reason": answer["finish_reason"], "logprobs": None}
    usage = _usage(prompt_tokens, answer["tokens"])
    return {**_envelope(cid, model, [choice], "chat.completion"), "usage": usage}


def chat_chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    """One server-sent event while streaming a chat completion: its ``delta`` (``role`` first, then ``content``)."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return _envelope(cid, model, [choice], "chat.completion.chunk")


def chat_usage_chunk(cid: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The usage event of a chat stream asked for with ``stream_options: {"include_usage": true}``."""
    return {**_envelope(cid, model, [], "chat.completion.chunk"), "usage": _usage(prompt_tokens, completion_tokens)}


def _envelope(cid: str, model: str, choices: list[dict], kind: str = "text_completion") -> dict:
    return {"id": cid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}
