"""Serve mixed-task requests from a checkpoint: ``python serve.py --help``.

Batch mode reads one JSON request a line and writes one JSON response a line,
in request order (CONTRACT.md); HTTP mode (``--http HOST:PORT``) answers
``POST /v1/infer`` and ``GET /health``. Both feed one continuous-batching
engine (``mtl.engine``), compiled for every shape at start-up. From Python::

    import serve
    server = serve.Server.load("runs/demo")
    server.respond([{"id": "a", "task": "g2p", "input": "hello"}])

A bad request gets an error response naming what is wrong; it never stops
the others.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from flax import nnx
from rich.console import Console

import evaluate
import tasks
from mtl import config as C
from mtl.checkpoint import Checkpoints, find
from mtl.engine import Generation, QueueFull, Request
from mtl.model import MultiTaskModel
from mtl.partition import abstract_state
from sharding import make_mesh

REQUIRED = ("id", "task", "input")
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")


class UsageError(Exception):
    """A bad flag or checkpoint: one line, exit status 2."""


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
    request: Any  # mtl.engine.Request
    stop: tuple[str, ...]
    text: str  # the input, for tag answers (one tag a word)


class Server:
    """A model restored onto a serving mesh, its tasks, and the engine that runs them."""

    def __init__(self, engine, tasks_info: dict[str, TaskInfo], tokenizer):
        self.engine = engine
        self.tasks = tasks_info
        self.tokenizer = tokenizer

    @classmethod
    def load(
        cls, ckpt: str, mesh_spec: str = "", max_batch: int = 32, log=lambda *_: None, max_queue: int = 1024
    ) -> Server:
        """Restores the model of ``ckpt`` (a run folder or a step folder) onto ``mesh_spec``
        and compiles the engine for every shape it will run.

        Raises:
          UsageError: no checkpoint there, or a mesh that does not fit the devices.
        """

        try:
            folder, step = find(ckpt)
            mesh = make_mesh(mesh_spec)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if max_batch < 1:
            raise UsageError(f"--max-batch {max_batch} must be at least 1")
        if max_queue < 1:
            raise UsageError(f"--max-queue {max_queue} must be at least 1")
        checkpoints = Checkpoints(folder, read_only=True)
        meta = checkpoints.read_meta(step)
        cfg = C.from_dict(meta["config"])
        graphdef, abstract, _ = abstract_state(lambda: MultiTaskModel(cfg.model, rngs=nnx.Rngs(0)), mesh)
        t0 = time.perf_counter()
        params, _, _ = checkpoints.restore(step, abstract)
        checkpoints.close()
        log(f"restored step {step} from {folder} onto mesh {dict(mesh.shape)} in {time.perf_counter() - t0:.1f}s")
        model = nnx.merge(graphdef, params)
        engine = evaluate.make_engine(model, mesh, max_batch, max_queue)
        t0 = time.perf_counter()
        engine.warmup()  # every shape compiled now, so no request waits for a compilation
        log(f"compiled {len(engine.buckets) + 2} programs in {time.perf_counter() - t0:.1f}s")
        infos = {
            t["name"]: TaskInfo(t["name"], t["kind"], tuple(t["labels"]), t["max_new_tokens"]) for t in meta["tasks"]
        }
        return cls(engine, infos, tasks.ByteTokenizer())

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
        unknown = sorted(set(raw) - set(REQUIRED) - set(SAMPLING_FIELDS))
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}; fields are {', '.join(REQUIRED + SAMPLING_FIELDS)}")
        if not isinstance(raw["id"], (str, int)) or isinstance(raw["id"], bool):
            raise BadRequest(f"id {raw['id']!r} must be a string or an integer")
        task = self.tasks.get(raw["task"]) if isinstance(raw["task"], str) else None
        if task is None:
            raise BadRequest(f"unknown task {raw['task']!r}; this model serves {', '.join(sorted(self.tasks))}")
        if not isinstance(raw["input"], str):
            raise BadRequest(f"input must be a string, not {type(raw['input']).__name__}")
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
        request = Request(raw["task"], prompt, max_new, temperature, top_k, top_p, seed)
        return Parsed(raw["id"], task, request, tuple(stop), raw["input"])

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
                rid = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), (str, int)) else None
                parsed.append({"id": rid, "error": str(e)})
        good = [(i, p) for i, p in enumerate(parsed) if isinstance(p, Parsed)]
        # Latency counts from here: every request of a batch file arrives at once.
        now = time.perf_counter()
        tickets = self.engine.serve([dataclasses.replace(p.request, arrival=now) for _, p in good])
        responses: list[dict] = [p for p in parsed]  # errors stay, answers replace the rest
        for (i, p), ticket in zip(good, tickets):
            responses[i] = self.format(p, ticket.wait())
        return responses

    def format(self, p: Parsed, result) -> dict:
        """The response object to a served request, by its task's kind."""
        if not isinstance(result, Generation):
            return head_response(p, result)
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


def head_response(p: Parsed, answer) -> dict:
    """The response to a request answered by a non-generation head, by the task's kind."""
    response = {"id": p.id, "task": p.task.name}
    if p.task.kind == "classify":
        probs = answer.values
        response["label"] = p.task.labels[int(probs.argmax())]
        response["scores"] = {label: round(float(q), 6) for label, q in zip(p.task.labels, probs)}
    elif p.task.kind == "regress":
        response["value"] = round(float(answer.values), 6)
    else:
        response["tags"] = [p.task.labels[i] for i in tasks.tags_at_word_ends(answer.values, p.text)]
    response["latency_ms"] = round(answer.latency_ms, 2)
    return response


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


def read_requests(lines: Iterable[str]) -> list[Any]:
    """Decodes request lines; an unreadable line becomes a BadRequest in its place. Blank lines are skipped."""
    items: list[Any] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            items.append(BadRequest(f"line {number} is not valid JSON: {e.msg} at column {e.colno}"))
    return items


# HTTP mode: aiohttp in front of the engine's background loop. Concurrent
# requests wait in the engine's queue and share its prefill batches and decode
# slots; a client that disconnects cancels its request and frees its slot.


def make_app(server: Server):
    """The aiohttp application: ``POST /v1/infer`` and ``GET /health`` (CONTRACT.md)."""
    from aiohttp import web

    async def health(_request):
        return web.json_response({"status": "ok", "tasks": sorted(server.tasks)})

    async def infer(request):
        try:
            raw = await request.json()
        except (ValueError, UnicodeDecodeError) as e:
            return web.json_response({"id": None, "error": f"the request body is not valid JSON: {e}"}, status=400)
        try:
            parsed = server.parse(raw)
        except BadRequest as e:
            rid = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), (str, int)) else None
            return web.json_response({"id": rid, "error": str(e)}, status=400)
        parsed = dataclasses.replace(parsed, request=dataclasses.replace(parsed.request, arrival=time.perf_counter()))
        try:
            ticket = server.engine.submit(parsed.request)
        except QueueFull as e:
            return web.json_response({"id": parsed.id, "error": str(e)}, status=503)
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        ticket.add_done_callback(lambda _: loop.call_soon_threadsafe(_settle, finished))
        try:
            await finished
        except asyncio.CancelledError:  # the client went away: free its slot
            server.engine.cancel(ticket)
            raise
        try:
            result = ticket.wait(0)
        except Exception as e:
            return web.json_response({"id": parsed.id, "error": f"the request failed: {e}"}, status=500)
        return web.json_response(server.format(parsed, result), dumps=lambda o: json.dumps(o, ensure_ascii=False))

    async def start_engine(_app):
        server.engine.start()

    async def stop_engine(_app):
        server.engine.stop()

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/infer", infer)
    app.on_startup.append(start_engine)
    app.on_cleanup.append(stop_engine)
    return app


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


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--http {address!r} must be HOST:PORT, e.g. 127.0.0.1:8000")
    return host, int(port)


async def _serve_forever(server: Server, host: str, port: int, log) -> None:
    runner, bound = await start_http(server, host, port)
    log(f"serving on http://{host}:{bound} (POST /v1/infer, GET /health)")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", description="Serve mixed-task requests from an mtl checkpoint.")
    p.add_argument("--ckpt", required=True, help="a run folder (its newest checkpoint) or checkpoints/<step>")
    p.add_argument("--requests", default="-", help="JSON-lines request file, or - for standard input (default)")
    p.add_argument("--out", default="-", help="where responses go, or - for standard output (default)")
    p.add_argument("--mesh", default="", help="serving mesh, e.g. data=2,tensor=4 (default: all devices on data)")
    p.add_argument("--max-batch", type=int, default=32, help="decode slots: generation requests decoded together")
    p.add_argument("--max-queue", type=int, default=1024, help="requests that may wait; beyond, HTTP answers 503")
    p.add_argument("--http", metavar="HOST:PORT", help="serve over HTTP instead of a file (port 0: any free port)")
    return p


def main(argv: Sequence[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        address = parse_address(args.http) if args.http else None
        if address:
            try:
                import aiohttp  # noqa: F401
            except ImportError:
                raise UsageError('--http needs aiohttp: pip install -e ".[serve]"') from None
        elif args.requests != "-":
            try:
                with open(args.requests, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except OSError as e:
                raise UsageError(f"--requests {args.requests!r} cannot be read: {e.strerror}") from None
        with console.status("restoring the checkpoint and compiling"):
            server = Server.load(args.ckpt, args.mesh, args.max_batch, log=console.log, max_queue=args.max_queue)
    except UsageError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    if address:
        try:
            asyncio.run(_serve_forever(server, *address, log=console.log))
        except KeyboardInterrupt:
            pass
        except OSError as e:
            print(f"serve.py: error: --http {args.http!r} cannot be served: {e.strerror}", file=sys.stderr)
            return 2
        return 0
    if args.requests == "-":
        lines = sys.stdin.read().splitlines()
    items = read_requests(lines)
    t0 = time.perf_counter()
    with console.status(f"serving {len(items)} requests"):
        responses = server.respond(items)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in responses)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    errors = sum("error" in r for r in responses)
    console.log(f"served {len(responses) - errors} requests, {errors} errors, in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
