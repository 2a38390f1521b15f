"""The HTTP request bodies as pydantic models, their one-line errors, and the OpenAPI document.

Every body a route reads is checked here, by pydantic (as vLLM and sglang check
theirs), before anything is queued: wrong types, a task given as a list,
``stream`` that is not a boolean, a lone surrogate in any text. A failed check
is :class:`SchemaError`: one line naming the first bad field, answered with
400. ``GET /openapi.json`` publishes :func:`openapi` (OpenAPI 3.1), from these
models.

mtl's own request (``POST /v1/infer``, batch mode) is :class:`InferRequest`.
OpenAI's (:class:`CompletionRequest`, :class:`ChatCompletionRequest`) accept
the fields OpenAI's clients send routinely: those mtl honours, those that
change nothing it computes (accepted and ignored: ``IGNORED``), and those it
cannot honour, refused only when set to anything but their "not asked for"
value (``openai_api.UNSUPPORTED``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

INT32 = 2**31


class SchemaError(ValueError):
    """A body that does not fit its model: one line naming the first bad field."""


def _text(value: Any) -> Any:
    """Refuses strings JSON's ``\\ud800`` escapes decode to lone surrogates, which are not text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            at = next(i for i, ch in enumerate(value) if 0xD800 <= ord(ch) <= 0xDFFF)
            raise ValueError(f"holds a lone surrogate \\u{ord(value[at]):04x} at character {at}, which is not text")
    return value


def _integral(value: Any) -> Any:
    """2.0 is an integer (JSON writers differ); 2.5, true and "2" are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be finite")
    return value


Text = Annotated[StrictStr, BeforeValidator(_text)]
Int = Annotated[StrictInt, BeforeValidator(_integral)]
Number = Annotated[float, Field(strict=True), BeforeValidator(_finite)]
Stop = Text | list[Annotated[Text, Field(min_length=1)]]


class Body(BaseModel):
    """A request body: unknown fields refused, and nothing coerced (``"2"`` is no number, ``1`` no boolean)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class InferRequest(Body):
    """One request to any task (``POST /v1/infer``, a line of a batch file): docs/contract.md's request object."""

    id: StrictInt | Text
    task: Text = Field(description="a served task's name (GET /health lists them)")
    input: Text
    max_new_tokens: Int | None = Field(None, ge=1, lt=INT32, description="default: the task's own, else 32")
    temperature: Number = Field(0.0, ge=0, le=1e6)
    top_k: Int = Field(0, ge=0, lt=INT32, description="0: no top-k")
    top_p: Number = Field(1.0, gt=0, le=1)
    seed: Int = Field(0, ge=0, lt=2**32)
    stop: Stop = Field([], description="a non-empty string or a list of them; ends a generation (not returned)")
    priority: Int = Field(0, ge=-INT32, lt=INT32, description="higher is admitted first")
    deadline_ms: Number | None = Field(None, gt=0, description="from arrival; past it the request is cancelled")
    stream: StrictBool = Field(False, description="send the output as server-sent events while it is generated")


# What each field accepts, in words, for the one-line errors.
ACCEPTED = {
    "id": "a string or an integer",
    "task": "a task's name (a string)",
    "input": "a string",
    "model": "a served model's name (a string)",
    "prompt": "a string or a non-empty list of strings",
    "messages": "a non-empty list of message objects",
    "max_new_tokens": "an integer in [1, 2**31)",
    "max_tokens": "an integer in [1, 2**31)",
    "max_completion_tokens": "an integer in [1, 2**31)",
    "temperature": "a number in [0, 1e6]",
    "top_k": "an integer in [0, 2**31) (0: no top-k)",
    "top_p": "a number in (0, 1]",
    "seed": "an integer in [0, 2**32)",
    "stop": "a non-empty string or a list of them",
    "priority": "an integer (higher first)",
    "deadline_ms": "a positive number",
    "stream": "true or false",
    "run": "a run folder (a string)",
}

# OpenAI fields that change nothing mtl computes: accepted and ignored (vLLM accepts them so).
IGNORED = ("user", "store", "metadata", "parallel_tool_calls", "service_tier", "stream_options")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


class OpenAIBody(BaseModel):
    """The fields shared by OpenAI's completions and chat completions, as mtl reads them."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: Text
    max_tokens: Int | None = Field(None, ge=1, lt=INT32)
    temperature: Number | None = Field(None, ge=0, le=1e6, description="default 1, as OpenAI's")
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=0, lt=INT32, description="an extension, as vLLM's")
    seed: Int | None = Field(None, ge=0, lt=2**32)
    stop: Stop | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    priority: Int | None = Field(None, ge=-INT32, lt=INT32, description="mtl's, as vLLM's")
    deadline_ms: Number | None = Field(None, gt=0, description="mtl's")
    # Accepted and ignored.
    user: Text | None = None
    store: StrictBool | None = None
    metadata: dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    service_tier: Text | None = None
    # Refused unless "not asked for" (openai_api.UNSUPPORTED).
    n: Int | None = None
    logprobs: Any = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None


class CompletionRequest(OpenAIBody):
    """``POST /v1/completions``."""

    prompt: Text | Annotated[list[Text], Field(min_length=1)]
    best_of: Int | None = None
    echo: StrictBool | None = None
    suffix: Text | None = None


def _all_text(value: Any) -> Any:
    """Every string in ``value``, however nested, is text (no lone surrogate)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _text(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


# A chat message: its role and content parts are checked further by mtl.serving.chat, with its own messages.
Message = Annotated[dict[str, Any], BeforeValidator(_all_text)]


class ChatCompletionRequest(OpenAIBody):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Int | None = Field(None, ge=1, lt=INT32)
    top_logprobs: Int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: list[Any] | None = None


class AddTask(Body):
    """``POST /v1/tasks``: serve task ``task`` of run folder ``run`` (under the server's ``--runs-root``)."""

    run: Text
    task: Text


def check(model: type[BaseModel], body: Any) -> BaseModel:
    """``body`` as ``model``.

    Raises:
      SchemaError: the body is not an object, or one line naming its first bad field.
    """
    if not isinstance(body, dict):
        raise SchemaError(f"the request body must be a JSON object, not {_json_type(body)}")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        errors = e.errors()
        # A lone surrogate is named as such wherever it is, whichever union member pydantic tried first.
        first = next((x for x in errors if "lone surrogate" in x.get("msg", "")), errors[0])
        raise SchemaError(one_line(first, model, body)) from None
    except RecursionError:
        raise SchemaError("the request body is nested too deeply") from None


def one_line(error: dict, model: type[BaseModel], body: dict) -> str:
    """One sentence for pydantic's first error, naming the field, its value, and what it accepts."""
    # Union members and validators name themselves in the location ("int", "function-before[...]"): dropped.
    loc = [p for p in error["loc"] if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    field = str(loc[0]) if loc else ""
    where = field + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    if error["type"] == "missing":
        required = ", ".join(n for n, f in model.model_fields.items() if f.is_required())
        return f"the request has no {where!r} field; {required} are required"
    if error["type"] == "extra_forbidden":
        return f"unknown field {where!r}; fields are {', '.join(model.model_fields)}"
    message = error.get("msg", "")
    if "lone surrogate" in message:
        return f"{where} {message.removeprefix('Value error, ')}"
    if field in ACCEPTED:
        return f"{field} {_short(body.get(field))} must be {ACCEPTED[field]}"
    return f"{where} {_short(error.get('input'))}: {message[:1].lower()}{message[1:]}"


_TYPE_TAGS = {"int", "str", "float", "bool", "list", "dict", "none"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# The OpenAPI document.

RESPONSES = {
    "400": "a malformed request: one line naming what is wrong",
    "401": "no or a wrong API key (serve.py --api-key)",
    "404": "no such task or model",
    "429": "the queue holds the task's share already; try again after Retry-After seconds",
    "503": "the server is shutting down",
}


def openapi(admin: bool = True) -> dict:
    """The OpenAPI 3.1 document of the routes, their bodies from the models above."""
    error = {
        "type": "object",
        "description": "mtl's routes: {id, error}; OpenAI's: {error: {message, type, param, code}}",
    }
    answer = {"description": "the answer (JSON, or server-sent events when streamed)"}

    def post(model: type[BaseModel], summary: str, secured: bool = True) -> dict:
        operation = {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            },
            "responses": {"200": answer}
            | {k: {"description": v, "content": {"application/json": {"schema": error}}} for k, v in RESPONSES.items()},
        }
        if secured:
            operation["security"] = [{"bearer": []}]
        return {"post": operation}

    def get(summary: str, secured: bool) -> dict:
        operation: dict = {"summary": summary, "responses": {"200": answer}}
        if secured:
            operation["security"] = [{"bearer": []}]
        return {"get": operation}

    paths = {
        "/health": get("liveness and the served tasks (503 while shutting down)", False),
        "/metrics": get("Prometheus text", False),
        "/v1/models": get("the served tasks, as OpenAI's models", True),
        "/v1/infer": post(InferRequest, "one request to any task"),
        "/v1/completions": post(CompletionRequest, "OpenAI completions over a generation task"),
        "/v1/chat/completions": post(ChatCompletionRequest, "OpenAI chat completions over a generation task"),
    }
    models = [InferRequest, CompletionRequest, ChatCompletionRequest]
    if admin:
        paths["/v1/tasks"] = post(AddTask, "serve a task of another run on the same backbone")
        paths["/v1/tasks/{name}"] = {
            "delete": {
                "summary": "stop serving a task (its running requests finish)",
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": answer, "404": {"description": RESPONSES["404"]}},
                "security": [{"bearer": []}],
            }
        }
        models.append(AddTask)
    schemas: dict = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {
        "openapi": "3.1.0",
        "info": {"title": "mtl", "version": "1", "description": "docs/contract.md"},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


Kind = Literal["generate", "classify", "regress", "tag"]
