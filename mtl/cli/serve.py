"""``serve.py`` / ``mtl-serve``: serve mixed-task requests from a checkpoint (docs/contract.md).

Batch mode reads one JSON request a line and writes one JSON response a line,
in request order; HTTP mode (``--http HOST:PORT``) answers docs/contract.md's
routes, guarded by ``--api-key`` (or ``MTL_API_KEY``), and stops gracefully on
SIGTERM (``--shutdown-timeout``). The work is :mod:`mtl.serving`'s; this module parses the
command line once, turns it into serving-config overrides, and reports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import sys
import time
from collections.abc import Sequence

from rich.console import Console

from mtl.cache_dir import HELP as CACHE_DIR_HELP
from mtl.cache_dir import enable_compilation_cache
from mtl.config import UsageError
from mtl.serving.http_app import HttpSettings, serve_forever
from mtl.serving.server import Server, read_requests, to_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", description="Serve mixed-task requests from an mtl checkpoint.")
    p.add_argument("--ckpt", required=True, help="a run folder (its newest checkpoint) or checkpoints/<step>")
    p.add_argument("--requests", default="-", help="JSON-lines request file, or - for standard input (default)")
    p.add_argument("--out", default="-", help="where responses go, or - for standard output (default)")
    p.add_argument("--mesh", help="serving mesh, e.g. data=2,tensor=4 (default: the run's serve.mesh: all on data)")
    p.add_argument("--max-batch", type=int, help="decode slots: generation requests decoded together (serve.max_batch)")
    p.add_argument(
        "--max-queue",
        type=int,
        help="requests that may wait; beyond, a task above its share gets 429 (serve.max_queue)",
    )
    p.add_argument("--http", metavar="HOST:PORT", help="serve over HTTP instead of a file (port 0: any free port)")
    p.add_argument("--cache-dir", metavar="DIR", help=CACHE_DIR_HELP)
    http = p.add_argument_group("HTTP mode")
    http.add_argument(
        "--api-key",
        metavar="KEY",
        help="every /v1/* route needs Authorization: Bearer KEY (default: $MTL_API_KEY; /health, /metrics stay open)",
    )
    http.add_argument(
        "--runs-root",
        metavar="DIR",
        help="POST /v1/tasks reads runs only from under DIR (default: the folder that holds the --ckpt run)",
    )
    http.add_argument("--no-task-admin", action="store_true", help="serve no POST /v1/tasks or DELETE /v1/tasks/NAME")
    http.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="S",
        help="on SIGTERM or SIGINT, seconds requests in flight may take to finish (default 30; 0 cancels them)",
    )
    http.add_argument(
        "--read-timeout", type=float, metavar="S", help="seconds a request body may take to arrive (default 30)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="serve.KEY=VALUE",
        help="override a serving field: mesh, max_batch, max_queue, prefill_batch, steps_per_call, scheduler",
    )
    return p


def overrides(args: argparse.Namespace) -> list[str]:
    """The flags as ``serve.FIELD=VALUE`` assignments on the run's serving config; ``--set`` comes last."""
    flags = {"mesh": args.mesh, "max_batch": args.max_batch, "max_queue": args.max_queue}
    return [f"serve.{k}={v}" for k, v in flags.items() if v is not None] + list(args.set)


HTTP_FLAGS = ("api_key", "runs_root", "no_task_admin", "shutdown_timeout", "read_timeout")


def http_settings(args: argparse.Namespace) -> HttpSettings:
    """The HTTP flags, checked; ``MTL_API_KEY`` stands in for ``--api-key``.

    Raises:
      UsageError: an HTTP flag without ``--http``, an empty key, a timeout below 0, or a runs root that is
        not a folder.
    """
    given = [f for f in HTTP_FLAGS if getattr(args, f) not in (None, False)]
    if given and not args.http:
        raise UsageError(f"--{given[0].replace('_', '-')} applies to HTTP mode only: add --http HOST:PORT")
    key = args.api_key if args.api_key is not None else os.environ.get("MTL_API_KEY")
    if key is not None and not key.strip():
        raise UsageError("--api-key (or MTL_API_KEY) is empty; give a key or leave it unset")
    if args.runs_root is not None and not pathlib.Path(args.runs_root).is_dir():
        raise UsageError(f"--runs-root {args.runs_root!r} is not a folder")
    defaults = HttpSettings()
    timeouts = {}
    for flag in ("shutdown_timeout", "read_timeout"):
        value = getattr(args, flag)
        value = getattr(defaults, flag) if value is None else value
        if not 0 <= value < float("inf") or (flag == "read_timeout" and value == 0):
            what = "at least 0" if flag == "shutdown_timeout" else "positive"
            raise UsageError(f"--{flag.replace('_', '-')} {value:g} must be a number of seconds, {what}")
        timeouts[flag] = value
    return HttpSettings(key.strip() if key else None, not args.no_task_admin, **timeouts)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--http {address!r} must be HOST:PORT, e.g. 127.0.0.1:8000")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)  # warnings stay one line when stderr is a file or pipe
    lines: list[bytes] | None = None
    try:
        address = parse_address(args.http) if args.http else None
        settings = http_settings(args)
        if address:
            try:
                import aiohttp  # noqa: F401
            except ImportError:
                raise UsageError('--http needs aiohttp: pip install "mtl[serve]"') from None
        else:
            if args.requests != "-":
                try:
                    with open(args.requests, "rb") as f:
                        lines = f.read().splitlines()
                except OSError as e:
                    raise UsageError(f"--requests {args.requests!r} cannot be read: {e.strerror}") from None
            output = Output(args.out)  # a bad --out is refused before anything is served
        enable_compilation_cache(args.cache_dir, log=console.log)
        with console.status("restoring the checkpoint and compiling"):
            server = Server.load(args.ckpt, overrides(args), log=console.log, runs_root=args.runs_root)
    except UsageError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    if address:
        try:
            asyncio.run(serve_forever(server, *address, settings, log=console.log))
        except KeyboardInterrupt:  # a second Ctrl-C while stopping
            return 130
        except OSError as e:
            print(f"serve.py: error: --http {args.http!r} cannot be served: {e.strerror}", file=sys.stderr)
            return 2
        return 0
    if lines is None:
        console.log("reading requests from standard input, one JSON object a line, until it ends (Ctrl-D)")
        lines = sys.stdin.buffer.read().splitlines()
    items = read_requests(lines)
    t0 = time.perf_counter()
    with console.status(f"serving {len(items)} requests"):
        responses = server.respond(items)
    output.write("".join(to_json(r) + "\n" for r in responses))
    errors = sum("error" in r for r in responses)
    console.log(f"served {len(responses) - errors} requests, {errors} errors, in {time.perf_counter() - t0:.1f}s")
    return 0


class Output:
    """Where responses go: standard output, or a file written whole under a temporary name, then renamed.

    Opening it checks ``--out`` before serving starts, so a bad path loses no answers.
    """

    def __init__(self, path: str):
        self.path = None if path == "-" else pathlib.Path(path)
        if self.path is None:
            return
        if self.path.is_dir():
            raise UsageError(f"--out {path!r} is a directory; name a file for the responses")
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.tmp.touch()
        except OSError as e:
            raise UsageError(f"--out {path!r} cannot be written: {e.strerror}") from None

    def write(self, text: str) -> None:
        if self.path is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        self.tmp.write_text(text, encoding="utf-8")
        self.tmp.replace(self.path)
