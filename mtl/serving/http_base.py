"""What every family of HTTP routes shares: error answers, reading a body, serving parsed requests.

:class:`Api` is handed to each route module (``routes_mtl``, ``routes_openai``,
``routes_admin``, ``metrics``); it serves parsed requests through the
scheduler, as one answer or as server-sent events, and turns refusals into
JSON error answers: the contract's on mtl's routes, OpenAI's on the paths an
OpenAI route module registered (:attr:`Api.openai_paths`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from mtl.serving import openai_api
from mtl.serving.metrics import ServerMetrics
from mtl.serving.requests import DeadlineExceeded, Draining, QueueFull, UnknownTask
from mtl.serving.server import Parsed, Server, TextStream, refuse_constant, to_json


class BodyTimeout(Exception):
    """A request body that did not arrive within the read timeout (answered 408, its connection closed)."""


# What the scheduler may answer a submission with instead of tickets (see Api.refused).
REFUSALS = (QueueFull, Draining, UnknownTask, ValueError)


class Api:
    """The server behind the routes, its metrics, and the helpers the route modules share."""

    def __init__(self, server: Server, read_timeout: float = 30.0):
        self.server = server
        self.metrics = ServerMetrics(server.scheduler, server.table)
        self.started = int(time.time())
        self.openai_paths: set[str] = set()  # paths whose errors take OpenAI's shape
        self.read_timeout = read_timeout
        self.draining = False  # stopping: new requests get 503
        self.in_flight = 0  # requests being handled (each handler, from its start to its last byte)

    def kinds(self) -> dict[str, str]:
        """Each served task's kind, now (tasks come and go)."""
        return self.server.table.kinds()

    def named(self) -> dict[str, str]:
        """The base model's name and the generation task OpenAI's ``model=<name>`` answers as (none if scratch)."""
        from mtl.serving import openai_api

        init, default_task = getattr(self.server, "base", ("", ""))
        return openai_api.aliases(init, default_task, self.kinds())

    def error(self, request, status: int, message: str, headers=None, rid=None):
        """A JSON error answer in the shape of ``request``'s route family."""
        from aiohttp import web

        if request.path in self.openai_paths:
            kind = "invalid_request_error" if status < 500 else "server_error"
            return web.json_response(openai_api.error_body(message, kind), status=status, headers=headers)
        return web.json_response({"id": rid, "error": message}, status=status, headers=headers)

    def refused(self, request, e: Exception, rid=None):
        """The answer to a request the scheduler would not take: 429 (queue full), 503 (stopping),
        404 (its task removed meanwhile), 400 (more prompts than the queue holds)."""
        if isinstance(e, QueueFull):
            return self.error(request, 429, str(e), {"Retry-After": str(e.retry_after)}, rid)
        if isinstance(e, Draining):
            return self.error(request, 503, str(e), {"Retry-After": "5"}, rid)
        if isinstance(e, UnknownTask):
            return self.error(request, 404, str(e), rid=rid)
        return self.error(request, 400, str(e), rid=rid)

    async def read_json(self, request):
        """The request's body as JSON; ValueError names what is wrong (413 and 408 pass through).

        A body that takes longer than ``read_timeout`` seconds to arrive is answered 408 and its
        connection closed: a client that stalls holds no slot and no connection for long.
        """
        try:
            raw = await asyncio.wait_for(request.read(), self.read_timeout)
        except asyncio.TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {self.read_timeout:g}s") from None
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=refuse_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ValueError("the request body is nested too deeply to read") from None

    def answered(self, parsed: Parsed, ticket) -> dict:
        """The response object to a finished ticket (an error object if it failed), counted in the metrics."""
        try:
            result = ticket.wait(0)
        except DeadlineExceeded as e:
            response = {"id": parsed.id, "error": str(e)}
        except Exception as e:
            response = {"id": parsed.id, "error": f"the request failed: {e}"}
        else:
            response = self.server.format(parsed, result)
        self.metrics.observe(parsed.task.name, response)
        return response

    async def answer(self, parsed: list[Parsed]) -> list[dict]:
        """Serves parsed requests through the scheduler, admitted whole or refused whole (REFUSALS);
        a client that goes away frees their slots."""
        scheduler = self.server.scheduler
        now = time.perf_counter()
        tickets = scheduler.submit_all([dataclasses.replace(p.request, arrival=now) for p in parsed])
        loop = asyncio.get_running_loop()
        finished = [loop.create_future() for _ in tickets]
        for ticket, future in zip(tickets, finished):
            ticket.add_done_callback(lambda _, f=future: loop.call_soon_threadsafe(_settle, f))
        try:
            await asyncio.gather(*finished)
        except asyncio.CancelledError:
            for ticket in tickets:
                scheduler.cancel(ticket)
            raise
        return [self.answered(p, t) for p, t in zip(parsed, tickets)]

    async def streamed(self, request, parsed: list[Parsed], piece, end, last=None):
        """Serves ``parsed`` as server-sent events (``data: JSON``, a blank line after each).

        ``piece(i, text)`` is the event for a decided piece of request ``i``'s text
        (:class:`TextStream`; at its first token, sent even if empty, so a client sees
        its time to first token), ``end(i, response, text_stream)`` the events once it is
        answered (its response object), ``last()`` those after every request is. A
        refusal (a full queue: 429) is answered before the stream starts; a client that
        goes away (the handler cancelled, or a write that fails) cancels what is still running.
        """
        from aiohttp import web

        scheduler = self.server.scheduler
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        texts = [TextStream(self.server.tokenizer, p.stop) for p in parsed]
        tickets = []

        def put(item):
            loop.call_soon_threadsafe(events.put_nowait, item)

        try:
            now = time.perf_counter()
            listeners = [lambda tokens, i=i: put((i, tokens)) for i in range(len(parsed))]
            try:
                tickets = scheduler.submit_all([dataclasses.replace(p.request, arrival=now) for p in parsed], listeners)
            except REFUSALS as e:
                return self.refused(request, e, parsed[0].id)
            for i, ticket in enumerate(tickets):
                ticket.add_done_callback(lambda _, i=i: put((i, None)))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            left, started = len(parsed), [False] * len(parsed)
            while left:
                i, tokens = await events.get()
                if tokens is not None:
                    text = texts[i].update(tokens)
                    if text or not started[i]:  # the first token is announced even while its text is held
                        started[i] = True
                        await send_event(response, piece(i, text))
                    continue
                left -= 1
                for event in end(i, self.answered(parsed[i], tickets[i]), texts[i]):
                    await send_event(response, event)
            for event in last() if last else ():
                await send_event(response, event)
            await response.write_eof()
            return response
        finally:
            for ticket in tickets:
                if not ticket.done():
                    scheduler.cancel(ticket)


def status_of(response: dict) -> int:
    """The HTTP status of an answer: 200, 504 for a request cancelled at its deadline, else 500."""
    if "error" not in response:
        return 200
    return 504 if "deadline_ms" in response["error"] else 500


async def send_event(response, event) -> None:
    """One server-sent event: ``data: JSON`` (or ``data: [DONE]``) and a blank line."""
    data = event if isinstance(event, str) else to_json(event)
    await response.write(f"data: {data}\n\n".encode())


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
