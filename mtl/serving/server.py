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
from mtl.serving import chat, schemas, task_loader
from mtl.serving.engine import Engine, slots_that_fit
from mtl.serving.requests import DeadlineExceeded, Generation, Request
from mtl.serving.scheduler import Scheduler
from mtl.serving.task_table import Task, TaskTable
from sharding import make_mesh


class BadRequest(ValueError):
    """A request that cannot be served; its message is the response's ``error``, ``status`` its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


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
    kv_memory = C.parse_bytes(settings.kv_memory, "serve.kv_memory")
    engine = Engine(
        model,
        mesh,
        max_batch=slots_that_fit(model.cfg, settings.max_batch, settings.kv_dtype, kv_memory),
        allowed_tokens=allowed_tokens(tokenizer, model.cfg.vocab_size),
        eos_id=tokenizer.eos_ids,
        pad_id=tokenizer.pad_id,
        prefill_batch=settings.prefill_batch or None,
        steps_per_call=settings.steps_per_call,
        kv_dtype=settings.kv_dtype,
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
        self.base = ("", "")  # train.init and serve.default_task: OpenAI's model=<base model's name> (openai_api)
        self.loader = None  # adds and removes tasks (POST/DELETE /v1/tasks, mtl.serving.task_loader), set by load
        self.chat = chat.ChatTemplate.from_tokenizer(tokenizer)  # None: no chat template, no chat completions

    @classmethod
    def load(cls, ckpt: str, overrides: Sequence[str] = (), log=lambda *_: None, runs_root=None) -> Server:
        """Restores the model of ``ckpt`` (a run folder or a step folder) and compiles the engine
        for every shape it will run.

        Args:
          ckpt: the checkpoint.
          overrides: ``serve.FIELD=VALUE`` changes to the run's own serving config
            (its mesh, slots, queue, prefill batch, steps a call).
          log: called with progress lines.
          runs_root: the folder ``POST /v1/tasks`` may read runs from (default: the one holding the run).

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
        try:
            scheduler = make_scheduler(nnx.merge(graphdef, params), mesh, cfg.serve, tokenizer, table)
        except ValueError as e:  # a KV budget that holds no slot
            raise UsageError(str(e)) from None
        engine = scheduler.engine
        log(
            f"KV cache: {engine.max_batch} slots of {cfg.model.max_len} positions "
            f"({engine.max_batch * cfg.model.max_len:,} tokens) as {engine.kv_dtype.name}, "
            f"{engine.cache_bytes() / 2**20:.1f} MiB"
            + (f" of serve.kv_memory={cfg.serve.kv_memory}" if cfg.serve.kv_memory else "")
            + f"; decode spans {','.join(map(str, engine.spans))}"
        )
        server = cls(scheduler, tokenizer)
        server.base = (cfg.train.init or "", cfg.serve.default_task)  # OpenAI's model=<base name> (openai_api)
        server.loader = task_loader.TaskLoader(table, scheduler.engine, cfg, folder.parent, runs_root)
        task_loader.add_at_start(server.loader, cfg.serve.add_tasks)
        t0 = time.perf_counter()
        scheduler.warmup()  # every shape compiled now, so no request waits for a compilation
        programs = len(engine.buckets) + 1 + len(engine.spans)
        log(f"compiled {programs} programs in {time.perf_counter() - t0:.1f}s")
        return server

    # Requests in, responses out.

    def parse(self, raw: Any) -> Parsed:
        """Validates one decoded request object (:class:`mtl.serving.schemas.InferRequest`).

        Raises:
          BadRequest: naming the first thing wrong with it (status 404: no such task).
        """
        try:
            body = schemas.check(schemas.InferRequest, raw)
        except schemas.SchemaError as e:
            raise BadRequest(str(e)) from None
        task = self.table.get(body.task)
        if task is None:
            served = ", ".join(self.table.names())
            raise BadRequest(f"unknown task {body.task!r}; this model serves {served}", status=404)
        prompt = tasks.prompt_ids(self.tokenizer, body.input)
        limit = self.scheduler.max_prompt_len()
        if len(prompt) > limit:
            raise BadRequest(f"input is {len(prompt)} tokens with its markers; this model takes at most {limit}")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop)
        if not all(stop):
            raise BadRequest(f"stop {body.stop!r} must be a non-empty string or a list of them")
        # The scheduler ends a generation on a stop string's tokens as it reads them and frees its slot.
        stop_ids = tuple(tuple(self.tokenizer.encode(text)) for text in stop)
        max_new = body.max_new_tokens or task.max_new_tokens or 32
        request = Request(
            task.name,
            prompt,
            max_new,
            body.temperature,
            body.top_k,
            body.top_p,
            body.seed,
            stop_ids,
            body.priority,
            body.deadline_ms,
        )
        return Parsed(body.id, task, request, tuple(stop), body.input, body.stream)

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
        except RecursionError:
            items.append(BadRequest(f"line {number} is nested too deeply to read"))
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
