"""Serving mixed-task requests from a checkpoint: request parsing and validation, responses.

The request and response objects are docs/contract.md's. A :class:`Server` holds a
model restored onto a serving mesh, its task table (:mod:`mtl.serving.task_table`),
and the scheduler (:mod:`mtl.serving.scheduler`) and engine
(:mod:`mtl.serving.engine`) that run them; batch mode (:meth:`Server.respond`)
and HTTP mode (:func:`mtl.serving.http_app.make_app`) feed the same scheduler. From Python::

    from mtl.serving.server import Server
    server = Server.load("runs/demo")
    server.respond([{"id": "a", "task": "g2p", "input": "hello"}])

A bad request gets an error response naming what is wrong; it never stops
the others. Like the trainer, this module joins ``tasks`` (the tokenizer, tag
reading) and the model core, which never import each other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flax import nnx

import tasks
from mtl import config as C
from mtl.checkpoint import Checkpoints, candidates, restore_newest
from mtl.config import UsageError
from mtl.model import MultiTaskModel
from mtl.partition import abstract_state
from mtl.serving import chat, task_loader
from mtl.serving.engine import Engine
from mtl.serving.requests import DeadlineExceeded, Generation, Request
from mtl.serving.scheduler import Scheduler
from mtl.serving.task_table import Task, TaskTable
from sharding import make_mesh

REQUIRED = ("id", "task", "input")
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
SERVING_FIELDS = ("priority", "deadline_ms", "stream")  # when it is served, and how it is sent (HTTP)


class BadRequest(ValueError):
    """A request that cannot be served; its message is the response's ``error``."""


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A validated request, ready for the engine."""

    id: Any
    task: Task
    request: Request
    stop: tuple[str, ...]
    text: str  # the input, for tag answers (one tag a word)
    stream: bool = False  # HTTP: send the output as server-sent events while it is generated


def make_scheduler(
    model: MultiTaskModel, mesh, settings: C.ServeConfig, tokenizer, table: TaskTable | None = None
) -> Scheduler:
    """The scheduler and engine that serve ``model`` on ``mesh`` as ``settings`` say, with ``tokenizer``'s
    special tokens; ``table`` (default: the model's own tasks) says which task holds each row."""
    engine = Engine(
        model,
        mesh,
        max_batch=settings.max_batch,
        allowed_tokens=allowed_tokens(tokenizer, model.cfg.vocab_size),
        eos_id=tokenizer.eos_ids,
        pad_id=tokenizer.pad_id,
        prefill_batch=settings.prefill_batch or None,
        steps_per_call=settings.steps_per_call,
    )
    return Scheduler(engine, table, max_queue=settings.max_queue, scheduler=settings.scheduler)


def allowed_tokens(tokenizer, vocab_size: int) -> np.ndarray:
    """Tokens generation may produce: the tokenizer's, less those it never generates (PAD, BOS, SEP of bytes)."""
    allowed = np.arange(vocab_size) < tokenizer.vocab_size
    allowed[list(tokenizer.never_generated)] = False
    return allowed


def serving_config(cfg: C.Config, overrides: Sequence[str]) -> C.Config:
    """``cfg`` with ``serve.FIELD=VALUE`` overrides applied and checked.

    Raises:
      UsageError: an override names another section, or a value is bad.
    """
    try:
        for assignment in overrides:
            if not assignment.strip().startswith("serve."):
                raise ValueError(f"--set {assignment!r}: only serve.* fields can change when serving a checkpoint")
            cfg = C.override(cfg, assignment)
        C.validate(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg


class Server:
    """A model restored onto a serving mesh, its task table, and the scheduler and engine that run them."""

    def __init__(self, scheduler: Scheduler, tokenizer):
        self.scheduler = scheduler
        self.table = scheduler.table
        self.tokenizer = tokenizer
        self.loader = None  # adds and removes tasks (POST/DELETE /v1/tasks, mtl.serving.task_loader), set by load
        self.chat = chat.ChatTemplate.from_tokenizer(tokenizer)  # None: no chat template, no chat completions

    @classmethod
    def load(cls, ckpt: str, overrides: Sequence[str] = (), log=lambda *_: None) -> Server:
        """Restores the model of ``ckpt`` (a run folder or a step folder) and compiles the engine
        for every shape it will run.

        Args:
          ckpt: the checkpoint.
          overrides: ``serve.FIELD=VALUE`` changes to the run's own serving config
            (its mesh, slots, queue, prefill batch, steps a call).
          log: called with progress lines.

        Raises:
          UsageError: no checkpoint there, a bad override, or a mesh that does not fit the devices.
        """
        try:
            folder, steps = candidates(ckpt)
        except ValueError as e:
            raise UsageError(str(e)) from None
        checkpoints = Checkpoints(folder, read_only=True)

        def restore(step: int):
            meta = checkpoints.read_meta(step)
            cfg = serving_config(C.from_dict(meta["config"]), overrides)
            try:
                mesh = make_mesh(cfg.serve.mesh)
            except ValueError as e:
                raise UsageError(str(e)) from None
            graphdef, abstract, _ = abstract_state(lambda: MultiTaskModel(cfg.model, rngs=nnx.Rngs(0)), mesh)
            return meta, cfg, mesh, graphdef, checkpoints.restore(step, abstract)[0]

        t0 = time.perf_counter()
        try:  # past a damaged newest checkpoint to the newest that restores, with a warning
            step, (meta, cfg, mesh, graphdef, params), _ = restore_newest(folder, steps, restore, log)
        except ValueError as e:
            raise UsageError(str(e)) from None
        checkpoints.close()
        if cfg.serve.max_tasks:  # rows for tasks added while serving
            graphdef, params = task_loader.make_room(cfg, params, mesh)
        log(f"restored step {step} from {folder} onto mesh {dict(mesh.shape)} in {time.perf_counter() - t0:.1f}s")
        tokenizer = tasks.load_tokenizer(folder.parent)  # the run's own (--init), else the byte tokenizer
        table = TaskTable(task_loader.with_room(cfg).model.heads, {t["name"]: t for t in meta["tasks"]})
        scheduler = make_scheduler(nnx.merge(graphdef, params), mesh, cfg.serve, tokenizer, table)
        server = cls(scheduler, tokenizer)
        server.loader = task_loader.TaskLoader(table, scheduler.engine, cfg, folder.parent)
        task_loader.add_at_start(server.loader, cfg.serve.add_tasks)
        t0 = time.perf_counter()
        scheduler.warmup()  # every shape compiled now, so no request waits for a compilation
        log(f"compiled {len(scheduler.engine.buckets) + 2} programs in {time.perf_counter() - t0:.1f}s")
        return server

    # Requests in, responses out.

    def parse(self, raw: Any) -> Parsed:
        """Validates one decoded request object.

        Raises:
          BadRequest: naming the first thing wrong with it.
        """
        if not isinstance(raw, dict):
            raise BadRequest(f"a request must be a JSON object, not {type(raw).__name__}")
        for field in REQUIRED:
            if field not in raw:
                raise BadRequest(f"the request has no {field!r} field; {', '.join(REQUIRED)} are required")
        fields = REQUIRED + SAMPLING_FIELDS + SERVING_FIELDS
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}; fields are {', '.join(fields)}")
        if not isinstance(raw["id"], (str, int)) or isinstance(raw["id"], bool):
            raise BadRequest(f"id {raw['id']!r} must be a string or an integer")
        if isinstance(raw["id"], str):
            _check_text(raw["id"], "id")
        task = self.table.get(raw["task"]) if isinstance(raw["task"], str) else None
        if task is None:
            raise BadRequest(f"unknown task {raw['task']!r}; this model serves {', '.join(self.table.names())}")
        if not isinstance(raw["input"], str):
            raise BadRequest(f"input must be a string, not {type(raw['input']).__name__}")
        _check_text(raw["input"], "input")
        prompt = tasks.prompt_ids(self.tokenizer, raw["input"])
        limit = self.scheduler.max_prompt_len()
        if len(prompt) > limit:
            raise BadRequest(f"input is {len(prompt)} tokens with its markers; this model takes at most {limit}")
        default_new = task.max_new_tokens or 32
        max_new = _field(raw, "max_new_tokens", int, default_new, lambda v: v >= 1, "an integer of at least 1")
        temperature = _field(raw, "temperature", float, 0.0, lambda v: 0 <= v < math.inf, "a number of at least 0")
        top_k = _field(raw, "top_k", int, 0, lambda v: v >= 0, "an integer of at least 0")
        top_p = _field(raw, "top_p", float, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
        seed = _field(raw, "seed", int, 0, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
        stop = raw.get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest(f"stop {raw.get('stop')!r} must be a non-empty string or a list of them")
        for text in stop:
            _check_text(text, "stop")
        # The engine ends a generation on a stop string's tokens as it reads them and frees its slot.
        stop_ids = tuple(tuple(self.tokenizer.encode(text)) for text in stop)
        stream = raw.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(f"stream {stream!r} must be true or false")
        priority = _field(raw, "priority", int, 0, lambda v: -(2**31) <= v < 2**31, "an integer (higher first)")
        deadline = _field(raw, "deadline_ms", float, None, lambda v: 0 < v < math.inf, "a positive number")
        request = Request(raw["task"], prompt, max_new, temperature, top_k, top_p, seed, stop_ids, priority, deadline)
        return Parsed(raw["id"], task, request, tuple(stop), raw["input"], stream)

    def respond(self, items: Sequence[Any]) -> list[dict]:
        """Serves decoded request objects (or exceptions standing for unreadable lines), in order."""
        parsed: list[Parsed | dict] = []
        for item in items:
            if isinstance(item, Exception):
                parsed.append({"id": None, "error": str(item)})
                continue
            try:
                parsed.append(self.parse(item))
            except BadRequest as e:
                parsed.append(error_response(item, e))
        good = [(i, p) for i, p in enumerate(parsed) if isinstance(p, Parsed)]
        # Latency counts from here: every request of a batch file arrives at once.
        now = time.perf_counter()
        tickets = self.scheduler.serve([dataclasses.replace(p.request, arrival=now) for _, p in good])
        responses: list[dict] = [p for p in parsed]  # errors stay, answers replace the rest
        for (i, p), ticket in zip(good, tickets):
            try:
                responses[i] = self.format(p, ticket.wait())
            except DeadlineExceeded as e:  # batch mode's deadlines count from when the file is read
                responses[i] = {"id": p.id, "error": str(e)}
        return responses

    def format(self, p: Parsed, result) -> dict:
        """The response object to a served request, by its task's kind (an error if it is not finite)."""
        if not isinstance(result, Generation):
            return finite_or_error(head_response(p, result, self.tokenizer))
        text, reason, count = self.tokenizer.decode(result.tokens), result.finish_reason, len(result.tokens)
        # The engine stops on a stop string's tokens; a tokenizer whose tokens straddle it is caught here.
        cut = min((text.find(s) for s in p.stop if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            count = len(self.tokenizer.encode(text))
        return {
            "id": p.id,
            "task": p.task.name,
            "output": text,
            "tokens": count,
            "finish_reason": reason,
            "ttft_ms": round(result.ttft_ms, 2),
            "latency_ms": round(result.latency_ms, 2),
        }


def head_response(p: Parsed, answer, tokenizer) -> dict:
    """The response to a request answered by a non-generation head, by the task's kind."""
    response = {"id": p.id, "task": p.task.name}
    if p.task.kind == "classify":
        probs = answer.values
        response["label"] = p.task.labels[int(probs.argmax())]
        response["scores"] = {label: round(float(q), 6) for label, q in zip(p.task.labels, probs)}
    elif p.task.kind == "regress":
        response["value"] = round(float(answer.values), 6)
    else:
        response["tags"] = [p.task.labels[i] for i in tasks.tags_at_word_ends(answer.values, p.text, tokenizer)]
    response["latency_ms"] = round(answer.latency_ms, 2)
    return response


def error_response(raw: Any, error: Exception) -> dict:
    """The error object for a request that cannot be served, with its id where it has a usable one."""
    rid = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or (isinstance(rid, str) and not _is_text(rid)):
        rid = None
    return {"id": rid, "error": str(error)}


def _is_text(value: str) -> bool:
    """Whether ``value`` can be written as UTF-8: JSON's ``\\ud800`` escapes decode to lone surrogates, which cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(value: str, field: str) -> None:
    if not _is_text(value):
        at = next(i for i, ch in enumerate(value) if 0xD800 <= ord(ch) <= 0xDFFF)
        raise BadRequest(f"{field} holds a lone surrogate \\u{ord(value[at]):04x} at character {at}, which is not text")


def to_json(response: dict) -> str:
    """One response line, strict JSON: non-ASCII text kept as it is, and never a bare NaN."""
    return json.dumps(response, ensure_ascii=False, allow_nan=False)


def finite_or_error(response: dict) -> dict:
    """``response``, or an error naming its first non-finite number.

    A diverged checkpoint answers NaN; written bare, that line would not be JSON.
    """
    bad = next((k for k, v in response.items() if not _finite(v)), None)
    if bad is None:
        return response
    error = f"the model's {bad} is not a finite number; its checkpoint may have diverged"
    return {"id": response["id"], "error": error}


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _field(raw: dict, name: str, kind: type, default, ok, accepted: str):
    if name not in raw:
        return default
    value = raw[name]
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and numeric and float(value).is_integer():
        value = int(value)
    if not numeric or (kind is int and not isinstance(value, int)) or not ok(value):
        raise BadRequest(f"{name} {value!r} must be {accepted}")
    return kind(value)


def read_requests(lines: Iterable[bytes | str]) -> list[Any]:
    """Decodes request lines, each on its own; an unreadable line becomes a BadRequest in its place.

    A line may be bytes (as read from a file or standard input): one that is
    not UTF-8 is refused alone. JSON's non-standard ``NaN`` and ``Infinity``
    are refused too. Blank lines are skipped.
    """
    items: list[Any] = []
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = f"byte 0x{line[e.start]:02x} at byte {e.start + 1}"
                items.append(BadRequest(f"line {number} is not UTF-8: {bad}"))
                continue
        if not line.strip():
            continue
        try:
            items.append(json.loads(line, parse_constant=refuse_constant))
        except json.JSONDecodeError as e:
            items.append(BadRequest(f"line {number} is not valid JSON: {e.msg} at column {e.colno}"))
        except ValueError as e:
            items.append(BadRequest(f"line {number} is not valid JSON: {e}"))
    return items


def refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class TextStream:
    """The part of a generation's text that is decided while it runs: what streaming may send.

    Text is held back while it ends in an incomplete UTF-8 sequence (decoded as
    U+FFFD, which the next token may complete) or in what could still be the
    start of a stop string (which would be cut), so the pieces sent add up to
    the finished answer's ``output``. A tokenizer whose decoded text of more
    tokens does not extend what was sent has the rest wait for :meth:`finish`.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.sent = ""

    def update(self, tokens: Sequence[int]) -> str:
        """The newly decided text, given the tokens generated so far."""
        text = self.tokenizer.decode(tokens).rstrip("\ufffd")
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        else:
            held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - held]
        return self._extend(text)

    def finish(self, output: str) -> str:
        """The rest of the finished answer's ``output``."""
        return self._extend(output)

    def _extend(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new
