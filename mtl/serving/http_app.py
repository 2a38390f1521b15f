"""HTTP mode: docs/contract.md's routes in front of a :class:`~mtl.serving.server.Server` (aiohttp).

The routes come in families, each a module: mtl's own (``POST /v1/infer``,
``GET /health``: :mod:`mtl.serving.routes_mtl`), OpenAI's (``/v1/models``,
``/v1/completions``, ``/v1/chat/completions``: :mod:`mtl.serving.routes_openai`),
admin (``POST``/``DELETE /v1/tasks``: :mod:`mtl.serving.routes_admin`) and
metrics (``GET /metrics``: :mod:`mtl.serving.metrics`). This module assembles
them with what applies to every route: JSON error answers whatever the
failure, and starting and stopping the scheduler's loop with the app.

Concurrent requests wait in the scheduler's queue and share its prefill
batches and decode slots; a client that disconnects cancels its request and
frees its slot.
"""

from __future__ import annotations

import asyncio

from mtl.serving import metrics, routes_admin, routes_mtl, routes_openai, schemas
from mtl.serving.http_base import Api
from mtl.serving.server import Server


def make_app(server: Server):
    """The aiohttp application: docs/contract.md's routes. Every error answer, whatever its status, is
    a JSON error object: the contract's on mtl's routes, OpenAI's on theirs."""
    from aiohttp import web

    api = Api(server)

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
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: answered as JSON all the same, and the server goes on
            return api.error(request, 500, f"internal error: {type(e).__name__}: {e}")

    async def start_scheduler(_app):
        server.scheduler.start()

    async def stop_scheduler(_app):
        server.scheduler.stop()

    async def openapi(_request):
        return web.json_response(schemas.openapi(admin=True))

    app = web.Application(middlewares=[json_errors])
    for family in (routes_mtl, routes_openai, metrics, routes_admin):
        family.add_routes(app, api)
    app.router.add_get("/openapi.json", openapi)
    app.on_startup.append(start_scheduler)
    app.on_cleanup.append(stop_scheduler)
    return app


def _kept(headers) -> dict:
    """The headers of an HTTP error worth keeping in its JSON answer (Allow on a 405, say)."""
    return {k: v for k, v in headers.items() if k in ("Allow", "Retry-After")}


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
