"""HTTP mode: docs/contract.md's routes in front of a :class:`~mtl.server.Server`'s engine (aiohttp).

``POST /v1/infer`` and ``GET /health`` answer mtl's own objects, the OpenAI
routes OpenAI's (:mod:`mtl.openai_api`), ``GET /metrics`` Prometheus text
(:mod:`mtl.server_metrics`), ``POST``/``DELETE /v1/tasks`` change the served
tasks (:mod:`mtl.task_admin`). Requests are parsed and answered by the same
:class:`~mtl.server.Server` methods batch mode uses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from mtl import chat, task_admin
from mtl.engine import DeadlineExceeded, QueueFull
from mtl.server import BadRequest, Parsed, Server, TextStream, error_response, refuse_constant, to_json

# HTTP mode: aiohttp in front of the engine's background loop. Concurrent
# requests wait in the engine's queue and share its prefill batches and decode
# slots; a client that disconnects cancels its request and frees its slot.

OPENAI_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def make_app(server: Server):
    """The aiohttp application: docs/contract.md's routes.

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
            return await request.json(loads=lambda text: json.loads(text, parse_constant=refuse_constant))
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
