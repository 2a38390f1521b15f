"""Serving mixed-task requests from a checkpoint: request parsing, responses, and the HTTP app.

The request and response objects are CONTRACT.md's. A :class:`Server` holds a
model restored onto a serving mesh, its tasks, and the continuous-batching
engine (:mod:`mtl.engine`) that runs them; batch mode (:meth:`Server.respond`)
and HTTP mode (:func:`make_app`) feed the same engine. From Python::

    from mtl.server import Server
    server = Server.load("runs/demo")
    server.respond([{"id": "a", "task": "g2p", "input": "hello"}])

A bad request gets an error response naming what is wrong; it never stops
the others. Like the trainer, this module joins ``tasks`` (the tokenizer, tag
reading) and the model core, which never import each other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flax import nnx

import tasks
from mtl import chat, task_admin
from mtl import config as C
from mtl.checkpoint import Checkpoints, candidates, restore_newest
from mtl.config import UsageError
from mtl.engine import DeadlineExceeded, Engine, Generation, QueueFull, Request
from mtl.model import MultiTaskModel
from mtl.partition import abstract_state
from sharding import make_mesh

REQUIRED = ("id", "task", "input")
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
SERVING_FIELDS = ("priority", "deadline_ms", "stream")  # when it is served, and how it is sent (HTTP)


class BadRequest(ValueError):
    """A request that cannot be served; its message is the response's ``error``."""


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str
    labels: tuple[str, ...]
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A validated request, ready for the engine."""

    id: Any
    task: TaskInfo
    request: Request
    stop: tuple[str, ...]
    text: str  # the input, for tag answers (one tag a word)
    stream: bool = False  # HTTP: send the output as server-sent events while it is generated


def make_engine(model: MultiTaskModel, mesh, settings: C.ServeConfig, tokenizer) -> Engine:
    """The engine that serves ``model`` on ``mesh`` as ``settings`` say, with ``tokenizer``'s special tokens."""
    return Engine(
        model,
        mesh,
        max_batch=settings.max_batch,
        allowed_tokens=allowed_tokens(tokenizer, model.cfg.vocab_size),
        eos_id=tokenizer.eos_ids,
        pad_id=tokenizer.pad_id,
        prefill_batch=settings.prefill_batch or None,
        max_queue=settings.max_queue,
        steps_per_call=settings.steps_per_call,
        scheduler=settings.scheduler,
    )


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
    """A model restored onto a serving mesh, its tasks, and the engine that runs them."""

    def __init__(self, engine: Engine, tasks_info: dict[str, TaskInfo], tokenizer):
        self.engine = engine
        self.tasks = tasks_info
        self.tokenizer = tokenizer
        self.room = None  # the task rows POST/DELETE /v1/tasks change (mtl.task_admin), set by load
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
            graphdef, params = task_admin.make_room(cfg, params, mesh)
        log(f"restored step {step} from {folder} onto mesh {dict(mesh.shape)} in {time.perf_counter() - t0:.1f}s")
        tokenizer = tasks.load_tokenizer(folder.parent)  # the run's own (--init), else the byte tokenizer
        engine = make_engine(nnx.merge(graphdef, params), mesh, cfg.serve, tokenizer)
        infos = {
            t["name"]: TaskInfo(t["name"], t["kind"], tuple(t["labels"]), t["max_new_tokens"]) for t in meta["tasks"]
        }
        server = cls(engine, infos, tokenizer)
        server.room = task_admin.TaskRoom(server, cfg, folder.parent)
        task_admin.add_at_start(server.room, cfg.serve.add_tasks)
        t0 = time.perf_counter()
        engine.warmup()  # every shape compiled now, so no request waits for a compilation
        log(f"compiled {len(engine.buckets) + 2} programs in {time.perf_counter() - t0:.1f}s")
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
        task = self.tasks.get(raw["task"]) if isinstance(raw["task"], str) else None
        if task is None:
            raise BadRequest(f"unknown task {raw['task']!r}; this model serves {', '.join(sorted(self.tasks))}")
        if not isinstance(raw["input"], str):
            raise BadRequest(f"input must be a string, not {type(raw['input']).__name__}")
        _check_text(raw["input"], "input")
        prompt = tasks.prompt_ids(self.tokenizer, raw["input"])
        limit = self.engine.max_prompt_len()
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
        tickets = self.engine.serve([dataclasses.replace(p.request, arrival=now) for _, p in good])
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
            items.append(json.loads(line, parse_constant=_refuse_constant))
        except json.JSONDecodeError as e:
            items.append(BadRequest(f"line {number} is not valid JSON: {e.msg} at column {e.colno}"))
        except ValueError as e:
            items.append(BadRequest(f"line {number} is not valid JSON: {e}"))
    return items


def _refuse_constant(name: str):
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


# HTTP mode: aiohttp in front of the engine's background loop. Concurrent
# requests wait in the engine's queue and share its prefill batches and decode
# slots; a client that disconnects cancels its request and frees its slot.

OPENAI_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def make_app(server: Server):
    """The aiohttp application: CONTRACT.md's routes.

    ``POST /v1/infer`` and ``GET /health`` answer mtl's own objects;
    ``GET /v1/models`` and ``POST /v1/completions`` answer OpenAI's
    (:mod:`mtl.openai_api`); ``GET /metrics`` is Prometheus text
    (:mod:`mtl.server_metrics`). Every error answer, whatever its status, is
    a JSON error object: the contract's on mtl's routes, OpenAI's on theirs.
    """
    from aiohttp import web

    from mtl import openai_api
    from mtl.server_metrics import ServerMetrics

    metrics = ServerMetrics(server.engine, server.tasks.keys())  # a live view: tasks come and go
    kinds = lambda: {name: info.kind for name, info in server.tasks.items()}  # noqa: E731 (tasks come and go)
    started = int(time.time())

    def error(request, status: int, message: str, headers=None, rid=None):
        if request.path in OPENAI_ROUTES:
            kind = "invalid_request_error" if status < 500 else "server_error"
            return web.json_response(openai_api.error_body(message, kind), status=status, headers=headers)
        return web.json_response({"id": rid, "error": message}, status=status, headers=headers)

    @web.middleware
    async def json_errors(request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.content_type == "application/json" or e.status < 400:
                raise
            if e.status == 413:
                message = f"the request body is over {request.client_max_size} bytes"
            else:
                message = f"{request.method} {request.path}: {e.reason}"
            return error(request, e.status, message, _kept(e.headers))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: answered as JSON all the same, and the server goes on
            return error(request, 500, f"internal error: {type(e).__name__}: {e}")

    async def read_json(request):
        """The request's body as JSON; ValueError names what is wrong (413 passes through)."""
        try:
            return await request.json(loads=lambda text: json.loads(text, parse_constant=_refuse_constant))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"the request body is not valid JSON: {e}") from None

    def answered(parsed: Parsed, ticket) -> dict:
        """The response object to a finished ticket (an error object if it failed), counted in the metrics."""
        try:
            result = ticket.wait(0)
        except DeadlineExceeded as e:
            response = {"id": parsed.id, "error": str(e)}
        except Exception as e:
            response = {"id": parsed.id, "error": f"the request failed: {e}"}
        else:
            response = server.format(parsed, result)
        metrics.observe(parsed.task.name, response)
        return response

    async def answer(parsed: Parsed) -> dict:
        """Serves one parsed request through the engine; a client that goes away frees its slot."""
        ticket = server.engine.submit(dataclasses.replace(parsed.request, arrival=time.perf_counter()))
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        ticket.add_done_callback(lambda _: loop.call_soon_threadsafe(_settle, finished))
        try:
            await finished
        except asyncio.CancelledError:
            server.engine.cancel(ticket)
            raise
        return answered(parsed, ticket)

    async def streamed(request, parsed: list[Parsed], piece, end, last=None):
        """Serves ``parsed`` as server-sent events (``data: JSON``, a blank line after each).

        ``piece(i, text)`` is the event for a decided piece of request ``i``'s text
        (:class:`TextStream`; at its first token, sent even if empty, so a client sees
        its time to first token), ``end(i, response, text_stream)`` the events once it is
        answered (its response object), ``last()`` those after every request is. A full
        queue answers 429 before the stream starts; a client that goes away (the
        handler cancelled, or a write that fails) cancels what is still running.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        texts = [TextStream(server.tokenizer, p.stop) for p in parsed]
        tickets = []

        def put(item):
            loop.call_soon_threadsafe(events.put_nowait, item)

        try:
            try:
                for i, p in enumerate(parsed):
                    request_now = dataclasses.replace(p.request, arrival=time.perf_counter())
                    ticket = server.engine.submit(request_now, on_tokens=lambda tokens, i=i: put((i, tokens)))
                    ticket.add_done_callback(lambda _, i=i: put((i, None)))
                    tickets.append(ticket)
            except QueueFull as e:
                return error(request, 429, str(e), {"Retry-After": "1"}, parsed[0].id)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            left, started = len(parsed), [False] * len(parsed)
            while left:
                i, tokens = await events.get()
                if tokens is not None:
                    text = texts[i].update(tokens)
                    if text or not started[i]:  # the first token is announced even while its text is held
                        started[i] = True
                        await _send_event(response, piece(i, text))
                    continue
                left -= 1
                for event in end(i, answered(parsed[i], tickets[i]), texts[i]):
                    await _send_event(response, event)
            for event in last() if last else ():
                await _send_event(response, event)
            await response.write_eof()
            return response
        finally:
            for ticket in tickets:
                if not ticket.done():
                    server.engine.cancel(ticket)

    async def health(_request):
        return web.json_response({"status": "ok", "tasks": sorted(server.tasks)})

    async def infer(request):
        try:
            raw = await read_json(request)
        except ValueError as e:
            return error(request, 400, str(e))
        try:
            parsed = server.parse(raw)
        except BadRequest as e:
            response = error_response(raw, e)
            metrics.observe(raw.get("task") if isinstance(raw, dict) else None, response)
            return web.json_response(response, status=400)
        if parsed.stream:
            delta = {"id": parsed.id, "task": parsed.task.name}

            def end(_, response, text):
                rest = text.finish(response["output"]) if "output" in response else ""
                return [{**delta, "delta": rest}, response] if rest else [response]

            return await streamed(request, [parsed], lambda _, text: {**delta, "delta": text}, end)
        try:
            response = await answer(parsed)
        except QueueFull as e:
            return error(request, 429, str(e), {"Retry-After": "1"}, parsed.id)
        return web.json_response(response, status=_status(response), dumps=to_json)

    async def list_models(_request):
        return web.json_response(openai_api.models(kinds(), started))

    async def completions(request):
        try:
            body = await read_json(request)
            raws = openai_api.completion_requests(body, kinds())
        except ValueError as e:
            return error(request, 400, str(e))
        except openai_api.OpenAIError as e:
            return web.json_response(e.body(), status=e.status)
        try:
            parsed = [server.parse(raw) for raw in raws]
        except BadRequest as e:
            return error(request, 400, openai_api.openai_message(str(e)))
        if body.get("stream"):
            return await stream(request, body, parsed)
        try:
            answers = await asyncio.gather(*(answer(p) for p in parsed))
        except QueueFull as e:
            return error(request, 429, str(e), {"Retry-After": "1"})
        failed = [a for a in answers if "error" in a]
        if failed:
            return error(request, _status(failed[0]), failed[0]["error"])
        prompt_tokens = sum(len(p.request.prompt) for p in parsed)
        response = openai_api.completion(openai_api.new_id(), body["model"], answers, prompt_tokens)
        return web.json_response(response, dumps=to_json)

    async def stream(request, body: dict, parsed: list[Parsed]):
        """``stream: true`` on /v1/completions: OpenAI's chunks, one choice each, then ``[DONE]``."""
        cid, model = openai_api.new_id(), body["model"]
        tokens = [0] * len(parsed)
        usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")

        def end(i, answer, text):
            if "error" in answer:
                return [openai_api.error_body(answer["error"], "server_error")]
            tokens[i] = answer["tokens"]
            return [openai_api.chunk(cid, model, i, text.finish(answer["output"]), answer["finish_reason"])]

        def last():
            prompt_tokens = sum(len(p.request.prompt) for p in parsed)
            final = [openai_api.usage_chunk(cid, model, prompt_tokens, sum(tokens))] if usage else []
            return [*final, "[DONE]"]

        return await streamed(request, parsed, lambda i, text: openai_api.chunk(cid, model, i, text, None), end, last)

    async def chat_completions(request):
        if server.chat is None:
            message = "this checkpoint carries no chat template (its tokenizer has none); use /v1/completions"
            return error(request, 400, message)
        try:
            body = await read_json(request)
            raw = openai_api.chat_request(body, kinds())
            prompt = server.chat.prompt_ids(chat.messages_of(body["messages"]))
            # Checked as any request; the rendered messages then replace the task's prompt template.
            parsed = server.parse({**raw, "id": 0, "input": ""})
        except openai_api.OpenAIError as e:
            return web.json_response(e.body(), status=e.status)
        except (ValueError, BadRequest) as e:
            return error(request, 400, openai_api.openai_message(str(e)))
        limit = server.engine.max_prompt_len()
        if len(prompt) > limit:
            return error(request, 400, f"the messages are {len(prompt)} tokens in the chat template; at most {limit}")
        parsed = dataclasses.replace(parsed, request=dataclasses.replace(parsed.request, prompt=prompt))
        cid, model = openai_api.new_id("chatcmpl"), body["model"]
        if body.get("stream"):
            return await chat_stream(request, body, parsed, cid)
        try:
            answer_ = await answer(parsed)
        except QueueFull as e:
            return error(request, 429, str(e), {"Retry-After": "1"})
        if "error" in answer_:
            return error(request, _status(answer_), answer_["error"])
        return web.json_response(openai_api.chat_completion(cid, model, answer_, len(prompt)), dumps=to_json)

    async def chat_stream(request, body: dict, parsed: Parsed, cid: str):
        """``stream: true`` on /v1/chat/completions: the role, then content deltas, then the finish reason."""
        model, tokens = body["model"], [0]
        usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
        started = []

        def piece(_, text):
            delta = {"content": text} if started else {"role": "assistant", "content": text}
            started.append(True)
            return openai_api.chat_chunk(cid, model, delta)

        def end(_, answer, text):
            if "error" in answer:
                return [openai_api.error_body(answer["error"], "server_error")]
            tokens[0], rest = answer["tokens"], text.finish(answer["output"])
            return [openai_api.chat_chunk(cid, model, {"content": rest} if rest else {}, answer["finish_reason"])]

        def last():
            final = [openai_api.chat_usage_chunk(cid, model, len(parsed.request.prompt), tokens[0])] if usage else []
            return [*final, "[DONE]"]

        return await streamed(request, [parsed], piece, end, last)

    async def prometheus(_request):
        return web.Response(body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def start_engine(_app):
        server.engine.start()

    async def stop_engine(_app):
        server.engine.stop()

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/health", health)
    app.router.add_post("/v1/infer", infer)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/metrics", prometheus)
    task_admin.add_routes(app, server)
    app.on_startup.append(start_engine)
    app.on_cleanup.append(stop_engine)
    return app


def _kept(headers) -> dict:
    """The headers of an HTTP error worth keeping in its JSON answer (Allow on a 405, say)."""
    return {k: v for k, v in headers.items() if k in ("Allow", "Retry-After")}


def _status(response: dict) -> int:
    """The HTTP status of an answer: 200, 504 for a request cancelled at its deadline, else 500."""
    if "error" not in response:
        return 200
    return 504 if "deadline_ms" in response["error"] else 500


async def _send_event(response, event) -> None:
    """One server-sent event: ``data: JSON`` (or ``data: [DONE]``) and a blank line."""
    data = event if isinstance(event, str) else to_json(event)
    await response.write(f"data: {data}\n\n".encode())


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def start_http(server: Server, host: str, port: int):
    """Starts serving; returns the aiohttp runner (``await runner.cleanup()`` stops it) and the bound port."""
    from aiohttp import web

    runner = web.AppRunner(make_app(server), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, runner.addresses[0][1]


async def serve_forever(server: Server, host: str, port: int, log=lambda *_: None) -> None:
    """Serves HTTP on ``host:port`` until cancelled (Ctrl-C)."""
    runner, bound = await start_http(server, host, port)
    posts = "/v1/infer, /v1/completions" + (", /v1/chat/completions" if server.chat is not None else "")
    log(f"serving on http://{host}:{bound} (POST {posts}; GET /v1/models, /health, /metrics)")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
