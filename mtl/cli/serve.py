"""``serve.py`` / ``mtl-serve``: serve mixed-task requests from a checkpoint (docs/contract.md).

Batch mode reads one JSON request a line and writes one JSON response a line,
in request order; HTTP mode (``--http HOST:PORT``) answers ``POST /v1/infer``
and ``GET /health``. The work is :mod:`mtl.serving`'s; this module parses the
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
from mtl.serving.http_app import serve_forever
from mtl.serving.server import Server, read_requests, to_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", description="Serve mixed-task requests from an mtl checkpoint.")
    p.add_argument("--ckpt", required=True, help="a run folder (its newest checkpoint) or checkpoints/<step>")
    p.add_argument("--requests", default="-", help="JSON-lines request file, or - for standard input (default)")
    p.add_argument("--out", default="-", help="where responses go, or - for standard output (default)")
    p.add_argument("--mesh", help="serving mesh, e.g. data=2,tensor=4 (default: the run's serve.mesh: all on data)")
    p.add_argument("--max-batch", type=int, help="decode slots: generation requests decoded together (serve.max_batch)")
    p.add_argument("--max-queue", type=int, help="requests that may wait; beyond, HTTP answers 503 (serve.max_queue)")
    p.add_argument("--http", metavar="HOST:PORT", help="serve over HTTP instead of a file (port 0: any free port)")
    p.add_argument("--cache-dir", metavar="DIR", help=CACHE_DIR_HELP)
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
            server = Server.load(args.ckpt, overrides(args), log=console.log)
    except UsageError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    if address:
        try:
            asyncio.run(serve_forever(server, *address, log=console.log))
        except KeyboardInterrupt:
            pass
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
