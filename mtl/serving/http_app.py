"""HTTP mode: docs/contract.md's routes in front of a :class:`~mtl.serving.server.Server` (aiohttp).

The routes come in families, each a module: mtl's own (``POST /v1/infer``,
``GET /health``: :mod:`mtl.serving.routes_mtl`), OpenAI's (``/v1/models``,
``/v1/completions``, ``/v1/chat/completions``: :mod:`mtl.serving.routes_openai`),
admin (``POST``/``DELETE /v1/tasks``: :mod:`mtl.serving.routes_admin`, left out
with ``task_admin=False``) and metrics (``GET /metrics``:
:mod:`mtl.serving.metrics`); ``GET /openapi.json`` describes them
(:mod:`mtl.serving.schemas`). This module assembles them with what applies to
every route:

- JSON error answers whatever the failure (the contract's shape on mtl's
  routes, OpenAI's on theirs), never an HTML page;
- an API key (:class:`HttpSettings`): every ``/v1/*`` route then needs
  ``Authorization: Bearer KEY`` (compared in constant time) or answers 401;
  ``/health``, ``/metrics`` and ``/openapi.json`` stay open, as in vLLM;
- a graceful stop (:func:`serve_forever`): on SIGTERM or SIGINT new requests get
  503 (``/health`` too) while those in flight finish, for at most
  ``shutdown_timeout`` seconds, after which they are cancelled.

Concurrent requests wait in the scheduler's queue and share its prefill
batches and decode slots; a client that disconnects cancels its request and
frees its slot; a body that stalls past ``read_timeout`` is answered 408 and its
connection closed (it never reached the queue).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import signal
import time

from mtl.serving import metrics, routes_admin, routes_mtl, routes_openai, schemas
from mtl.serving.http_base import Api, BodyTimeout
from mtl.serving.server import Server

LOOPBACK = ("127.0.0.1", "localhost", "::1")
OPEN_PATHS = ("/health", "/metrics", "/openapi.json")  # answered without a key, and (but /health) while stopping


@dataclasses.dataclass(frozen=True)
class HttpSettings:
    """How the HTTP app guards and stops (``serve.py``'s flags).

    Attributes:
      api_key: when set, every ``/v1/*`` route needs ``Authorization: Bearer KEY``.
      task_admin: whether ``POST /v1/tasks`` and ``DELETE /v1/tasks/NAME`` are served.
      read_timeout: seconds a request body may take to arrive.
      shutdown_timeout: seconds requests in flight may take to finish after SIGTERM (0: cancel them).
    """

    api_key: str | None = None
    task_admin: bool = True
    read_timeout: float = 30.0
    shutdown_timeout: float = 30.0


def make_app(server: Server, settings: HttpSettings = HttpSettings(), api: Api | None = None):
    """The aiohttp application: docs/contract.md's routes (see the module's docstring); ``api`` is what
    its routes share (made here if not given: :func:`serve_forever` keeps it, to stop gracefully)."""
    from aiohttp import web

    api = api or Api(server, read_timeout=settings.read_timeout)
    key = settings.api_key.encode() if settings.api_key else None

    @web.middleware
    async def guard(request, handler):
        """Answers 503 while stopping and 401 without the key, before the handler reads anything."""
        if api.draining and request.path not in OPEN_PATHS[1:]:
            if request.path == "/health":
                return web.json_response({"status": "stopping", "tasks": server.table.names()}, status=503)
            response = api.error(request, 503, "the server is shutting down and takes no new requests")
            response.force_close()
            return response
        if key is not None and request.path.startswith("/v1/"):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
                message = "this server needs an API key: send Authorization: Bearer KEY"
                return api.error(request, 401, message, {"WWW-Authenticate": "Bearer"})
        api.in_flight += 1
        try:
            return await handler(request)
        finally:
            api.in_flight -= 1

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
            return api.error(request, e.status, message, _kept(e.headers))
        except BodyTimeout as e:
            response = api.error(request, 408, str(e))
            response.force_close()
            return response
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: answered as JSON all the same, and the server goes on
            return api.error(request, 500, f"internal error: {type(e).__name__}: {e}")

    async def start_scheduler(_app):
        server.scheduler.start()

    async def stop_scheduler(_app):
        server.scheduler.stop()

    document = schemas.openapi(admin=settings.task_admin)

    async def openapi(_request):
        return web.json_response(document)

    app = web.Application(middlewares=[json_errors, guard])
    families = (routes_mtl, routes_openai, metrics) + ((routes_admin,) if settings.task_admin else ())
    for family in families:
        family.add_routes(app, api)
    app.router.add_get("/openapi.json", openapi)
    app.on_startup.append(start_scheduler)
    app.on_cleanup.append(stop_scheduler)
    return app


def _kept(headers) -> dict:
    """The headers of an HTTP error worth keeping in its JSON answer (Allow on a 405, say)."""
    return {k: v for k, v in headers.items() if k in ("Allow", "Retry-After", "WWW-Authenticate")}


async def start_http(
    server: Server, host: str, port: int, settings: HttpSettings = HttpSettings(), api: Api | None = None
):
    """Starts serving; returns the aiohttp runner (``await runner.cleanup()`` stops it) and the bound port."""
    from aiohttp import web

    # lingering_time: after an early answer (408, 413) the rest of a body is read for 1 s at most before the
    # connection is closed (aiohttp's default 10 s would let a stalled client hold it that long).
    app = make_app(server, settings, api)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, lingering_time=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, runner.addresses[0][1]


async def serve_forever(
    server: Server, host: str, port: int, settings: HttpSettings = HttpSettings(), log=lambda *_: None
) -> None:
    """Serves HTTP on ``host:port`` until SIGTERM or SIGINT, then stops gracefully (:func:`drain`)."""
    api = Api(server, read_timeout=settings.read_timeout)
    runner, bound = await start_http(server, host, port, settings, api)
    posts = "/v1/infer, /v1/completions" + (", /v1/chat/completions" if server.chat is not None else "")
    log(f"serving on http://{host}:{bound} (POST {posts}; GET /v1/models, /health, /metrics, /openapi.json)")
    if settings.api_key is None and host not in LOOPBACK:
        log(f"warning: serving on {host} without an API key: anyone who reaches the port can use it (--api-key)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        await drain(api, settings.shutdown_timeout, log)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


async def drain(api: Api, timeout: float, log=lambda *_: None) -> None:
    """Stops taking requests (503) and waits ``timeout`` seconds at most for those in flight, then cancels
    what is left; the caller then closes the app's runner."""
    scheduler = api.server.scheduler
    api.draining = scheduler.draining = True
    log(f"stopping: no new requests; waiting up to {timeout:g}s for {api.in_flight} in flight")
    deadline = time.monotonic() + timeout
    while (api.in_flight or scheduler.busy()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if api.in_flight or scheduler.busy():
        log(f"stopping: {api.in_flight} requests still in flight after {timeout:g}s are cancelled")
        scheduler.abort("the server shut down before the request finished")
        grace = time.monotonic() + 5  # their handlers answer the cancellation
        while api.in_flight and time.monotonic() < grace:
            await asyncio.sleep(0.02)
    log("stopped")
