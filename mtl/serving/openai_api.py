"""OpenAI-compatible completions over the served tasks: request mapping, response shapes and errors.

A task's model id is its name (:func:`resolve_model`). ``POST /v1/completions``
serves generation tasks with OpenAI's fields; the body is checked by its
pydantic model (:mod:`mtl.serving.schemas`), each prompt becomes one mtl
request, validated by :meth:`mtl.serving.server.Server.parse` like any other,
and comes back as one choice. ``POST /v1/chat/completions`` (where the
checkpoint carries a chat template, :mod:`mtl.serving.chat`) serves the same
tasks: the messages rendered by the template are the prompt, and the answer is
one assistant message. Fields that would change what OpenAI's API computes in
ways mtl does not (``n`` > 1, ``logprobs``, ``echo``, penalties,
``logit_bias``, ``suffix``, tools) are refused with a clear 400 rather than
ignored; those that change nothing it computes (``user``, ``store``,
``metadata``, ``parallel_tool_calls``, ``service_tier``) are accepted and
ignored. Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from mtl.serving import schemas

# OpenAI fields mtl cannot honour, with the value that would mean "not asked for".
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "echo": False, "suffix": None, "logit_bias": None}
PENALTIES = ("presence_penalty", "frequency_penalty")
# mtl's own fields beside OpenAI's (docs/contract.md), passed through as they are (vLLM accepts ``priority`` so too).
EXTRA = ("priority", "deadline_ms")
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
# Fields that change nothing mtl computes are accepted and ignored: schemas.IGNORED.


class OpenAIError(Exception):
    """A request the OpenAI routes refuse; :meth:`body` is OpenAI's error object."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.param)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def base_model(init: str) -> str:
    """The name of the pretrained model a run started from (``train.init``): ``hf:ORG/NAME`` -> NAME, a folder's
    or GGUF file's name without ``.gguf`` and its quantisation (``SmolLM2-135M-Instruct.Q4_1.gguf`` ->
    ``SmolLM2-135M-Instruct``); "" for a run trained from scratch."""
    name = init.removeprefix("hf:").rstrip("/\\").replace("\\", "/").split("/")[-1] if init else ""
    if name.lower().endswith(".gguf"):
        name = re.sub(r"[.-](I?Q\d\w*|F16|F32|BF16)$", "", name[:-5], flags=re.IGNORECASE)
    return name


def aliases(init: str, default_task: str, task_kinds: dict[str, str]) -> dict[str, str]:
    """``{base model's name: the generation task it answers as}`` (``serve.default_task``, else the first one)."""
    name = base_model(init)
    generate = sorted(t for t, kind in task_kinds.items() if kind == "generate")
    task = default_task or (generate[0] if generate else "")
    return {name: task} if name and task and name not in task_kinds else {}


def models(task_kinds: dict[str, str], created: int, named: dict[str, str] | None = None) -> dict:
    """``GET /v1/models``: the base model's name (``named``: its task), then every served task, generation or
    not (its kind says which routes answer it)."""
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "mtl", "kind": "generate", "task": task}
        for name, task in (named or {}).items()
    ]
    data += [
        {"id": name, "object": "model", "created": created, "owned_by": "mtl", "kind": kind}
        for name, kind in sorted(task_kinds.items())
    ]
    return {"object": "list", "data": data}


def completion_requests(body: Any, task_kinds: dict[str, str], named: dict[str, str] | None = None) -> list[dict]:
    """The mtl request objects (docs/contract.md's) that an OpenAI completions body asks for, one a prompt.

    Raises:
      OpenAIError: the body does not fit :class:`~mtl.serving.schemas.CompletionRequest`, names no
        generation task, or asks for what mtl cannot do.
    """
    checked, request = _generation_request(body, task_kinds, schemas.CompletionRequest, UNSUPPORTED, named)
    prompts = [checked.prompt] if isinstance(checked.prompt, str) else list(checked.prompt)
    return [{**request, "id": i, "input": p} for i, p in enumerate(prompts)]


def chat_request(body: Any, task_kinds: dict[str, str], named: dict[str, str] | None = None) -> dict:
    """The mtl request object an OpenAI chat completions body asks for, without its ``input``:
    the messages (``body["messages"]``) become the prompt through the checkpoint's chat template.

    Raises:
      OpenAIError: as :func:`completion_requests`; ``max_completion_tokens`` is read as ``max_tokens``.
    """
    checked, request = _generation_request(body, task_kinds, schemas.ChatCompletionRequest, CHAT_UNSUPPORTED, named)
    if checked.max_completion_tokens is not None:
        request["max_new_tokens"] = checked.max_completion_tokens
    return request


def resolve_model(model: str, task_kinds: dict[str, str], named: dict[str, str] | None = None) -> str:
    """The generation task a request's ``model`` names (a task's model id is its name; ``named``: the base
    model's name and the task it answers as).

    Raises:
      OpenAIError: no such model (404, listing the served ones), or one that does not generate.
    """
    model = (named or {}).get(model, model)
    kind = task_kinds.get(model)
    if kind is None:
        served = ", ".join([*(named or {}), *sorted(task_kinds)])
        raise OpenAIError(f"the model {model!r} does not exist; served: {served}", 404, "model", "not_found_error")
    if kind != "generate":
        message = f"{model!r} is a {kind} task; completions serve generation tasks (use /v1/infer)"
        raise OpenAIError(message, 400, "model")
    return model


def _generation_request(body: Any, task_kinds: dict[str, str], model_cls, unsupported, named=None) -> tuple[Any, dict]:
    """The body checked as ``model_cls``, and the fields shared by completions and chat completions in mtl's names."""
    try:
        checked = schemas.check(model_cls, body)
    except schemas.SchemaError as e:
        raise OpenAIError(openai_message(str(e)), param=_param(str(e))) from None
    for field, default in unsupported.items():
        value = getattr(checked, field, None)
        if value not in (default, None) and value != {} and value != []:
            raise OpenAIError(f"{field}={value!r} is not supported; mtl serves {field}={default!r}", param=field)
    for field in PENALTIES:
        if getattr(checked, field) not in (0, 0.0, None):
            raise OpenAIError(f"{field}={getattr(checked, field)!r} is not supported; only 0", param=field)
    request: dict[str, Any] = {"task": resolve_model(checked.model, task_kinds, named)}
    # OpenAI's defaults where they differ from /v1/infer's: sampling at temperature 1.
    request["temperature"] = 1.0 if checked.temperature is None else checked.temperature
    honoured = (("max_new_tokens", "max_tokens"), ("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"))
    for ours, theirs in (*honoured, ("stop", "stop"), *((f, f) for f in EXTRA)):
        if getattr(checked, theirs) is not None:
            request[ours] = getattr(checked, theirs)
    return checked, request


def _param(message: str) -> str | None:
    """The field a one-line schema error names first, for OpenAI's ``param``."""
    for word in message.replace("'", " ").split():
        if word in schemas.ACCEPTED or word in ("messages", "prompt", "model"):
            return word
    return None


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
