"""mtl's own routes: ``POST /v1/infer`` (one request of any task, answered or streamed) and ``GET /health``."""

from __future__ import annotations

from mtl.serving.http_base import REFUSALS, Api, status_of
from mtl.serving.server import BadRequest, error_response, to_json


def add_routes(app, api: Api) -> None:
    from aiohttp import web

    server = api.server

    async def health(_request):
        return web.json_response({"status": "ok", "tasks": server.table.names()})

    async def infer(request):
        try:
            raw = await api.read_json(request)
        except ValueError as e:
            return api.error(request, 400, str(e))
        try:
            parsed = server.parse(raw)
        except BadRequest as e:
            response = error_response(raw, e)
            api.metrics.observe(raw.get("task") if isinstance(raw, dict) else None, response)
            return web.json_response(response, status=e.status)
        if parsed.stream:
            delta = {"id": parsed.id, "task": parsed.task.name}

            def end(_, response, text):
                rest = text.finish(response["output"]) if "output" in response else ""
                return [{**delta, "delta": rest}, response] if rest else [response]

            return await api.streamed(request, [parsed], lambda _, text: {**delta, "delta": text}, end)
        try:
            [response] = await api.answer([parsed])
        except REFUSALS as e:
            return api.refused(request, e, parsed.id)
        return web.json_response(response, status=status_of(response), dumps=to_json)

    app.router.add_get("/health", health)
    app.router.add_post("/v1/infer", infer)
