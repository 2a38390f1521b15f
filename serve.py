"""Serve mixed-task requests from a checkpoint: ``python serve.py --help``.

Batch mode reads one JSON request a line and writes one JSON response a line,
in request order (CONTRACT.md). From Python::

    import serve
    server = serve.Server.load("runs/demo")
    server.respond([{"id": "a", "task": "g2p", "input": "hello"}])

A bad request gets an error response naming what is wrong; it never stops
the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from flax import nnx
from rich.console import Console

import tasks
import train
from mtl import config as C
from mtl.checkpoint import Checkpoints, find
from mtl.engine import Request
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


class Server:
    """A model restored onto a serving mesh, its tasks, and the engine that runs them."""

    def __init__(self, engine, tasks_info: dict[str, TaskInfo], tokenizer):
        self.engine = engine
        self.tasks = tasks_info
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, ckpt: str, mesh_spec: str = "", max_batch: int = 32, log=lambda *_: None) -> Server:
        """Restores the model of ``ckpt`` (a run folder or a step folder) onto ``mesh_spec``.

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
        checkpoints = Checkpoints(folder, read_only=True)
        meta = checkpoints.read_meta(step)
        cfg = C.from_dict(meta["config"])
        graphdef, abstract, _ = abstract_state(lambda: MultiTaskModel(cfg.model, rngs=nnx.Rngs(0)), mesh)
        t0 = time.perf_counter()
        params, _, _ = checkpoints.restore(step, abstract)
        checkpoints.close()
        log(f"restored step {step} from {folder} onto mesh {dict(mesh.shape)} in {time.perf_counter() - t0:.1f}s")
        model = nnx.merge(graphdef, params)
        engine = train.make_engine(model, mesh, max_batch)
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
        return Parsed(raw["id"], task, request, tuple(stop))

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
        self.engine.warmup(
            [p.request for _, p in good if p.task.kind != "generate"],
            [p.request for _, p in good if p.task.kind == "generate"],
        )
        # Latency counts from here: every request of a batch file arrives at once, after warm-up.
        now = time.perf_counter()
        good = [(i, dataclasses.replace(p, request=dataclasses.replace(p.request, arrival=now))) for i, p in good]
        responses: list[dict] = [p for p in parsed]  # errors stay, answers replace the rest
        scored = [(i, p) for i, p in good if p.task.kind != "generate"]
        generated = [(i, p) for i, p in good if p.task.kind == "generate"]
        for (i, p), answer in zip(scored, self.engine.score([p.request for _, p in scored])):
            responses[i] = head_response(p, answer)
        for (i, p), gen in zip(generated, self.engine.generate([p.request for _, p in generated])):
            text, reason, count = self.tokenizer.decode(gen.tokens), gen.finish_reason, len(gen.tokens)
            cut = min((text.find(s) for s in p.stop if s in text), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
                count = len(self.tokenizer.encode(text))
            responses[i] = {
                "id": p.id,
                "task": p.task.name,
                "output": text,
                "tokens": count,
                "finish_reason": reason,
                "ttft_ms": round(gen.ttft_ms, 2),
                "latency_ms": round(gen.latency_ms, 2),
            }
        return responses


def head_response(p: Parsed, answer) -> dict:
    """The response to a request answered by a non-generation head, by the task's kind."""
    response = {"id": p.id, "task": p.task.name}
    if p.task.kind == "classify":
        probs = answer.values
        response["label"] = p.task.labels[int(probs.argmax())]
        response["scores"] = {label: round(float(q), 6) for label, q in zip(p.task.labels, probs)}
    else:
        raise NotImplementedError(f"serving {p.task.kind} tasks")  # unreachable: training takes no such task yet
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", description="Serve mixed-task requests from an mtl checkpoint.")
    p.add_argument("--ckpt", required=True, help="a run folder (its newest checkpoint) or checkpoints/<step>")
    p.add_argument("--requests", default="-", help="JSON-lines request file, or - for standard input (default)")
    p.add_argument("--out", default="-", help="where responses go, or - for standard output (default)")
    p.add_argument("--mesh", default="", help="serving mesh, e.g. data=2,tensor=4 (default: all devices on data)")
    p.add_argument("--max-batch", type=int, default=32, help="requests a batch (default 32)")
    p.add_argument("--http", metavar="HOST:PORT", help="serve over HTTP instead of a file (not available yet)")
    return p


def main(argv: Sequence[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        if args.http:
            raise UsageError("--http is not available in this version; use batch mode with --requests")
        if args.requests != "-":
            try:
                with open(args.requests, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except OSError as e:
                raise UsageError(f"--requests {args.requests!r} cannot be read: {e.strerror}") from None
        with console.status("restoring the checkpoint"):
            server = Server.load(args.ckpt, args.mesh, args.max_batch, log=console.log)
    except UsageError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
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
