"""The admin routes: ``POST /v1/tasks`` and ``DELETE /v1/tasks/{name}`` change the served tasks
(:mod:`mtl.serving.task_loader`, through the task table).

``POST /v1/tasks`` reads runs only from under the server's runs root
(``serve.py --runs-root``): a path outside it, after symlinks and ``..`` are
resolved, is answered 403 with the same words whether or not it exists. With
``serve.py --no-task-admin`` neither route is served (404).
"""

from __future__ import annotations

import asyncio

from mtl.serving import schemas
from mtl.serving.http_base import Api
from mtl.serving.task_table import TaskError


def add_routes(app, api: Api) -> None:
    from aiohttp import web

    server = api.server

    def loader():
        if server.loader is None:
            raise TaskError("this server was not loaded from a run folder: it cannot add or remove tasks")
        return server.loader

    def failed(e: TaskError):
        return web.json_response({"id": None, "error": str(e)}, status=e.status)

    async def post_task(request):
        try:
            body = schemas.check(schemas.AddTask, await api.read_json(request))
        except ValueError as e:  # not JSON, or not {"run": RUN_DIR, "task": NAME}
            return failed(TaskError(f'{e}; send {{"run": RUN_DIR, "task": NAME}}'))
        loop = asyncio.get_running_loop()
        try:  # restoring a checkpoint takes a while: off the event loop, which keeps answering requests
            added = await loop.run_in_executor(None, loader().add_confined, body.run, body.task)
        except TaskError as e:
            return failed(e)
        return web.json_response(added)

    async def delete_task(request):
        try:
            return web.json_response(loader().remove(request.match_info["name"]))
        except TaskError as e:
            return failed(e)

    app.router.add_post("/v1/tasks", post_task)
    app.router.add_delete("/v1/tasks/{name}", delete_task)
