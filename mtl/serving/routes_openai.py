"""OpenAI's routes: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``.

The request mapping and answer shapes are :mod:`mtl.serving.openai_api`'s;
these handlers serve them through the scheduler, whole or streamed. Errors on
these paths take OpenAI's shape (``{"error": {"message", "type", ...}}``).
"""

from __future__ import annotations

import dataclasses

from mtl.serving import chat, openai_api
from mtl.serving.http_base import REFUSALS, Api, status_of
from mtl.serving.server import BadRequest, Parsed, to_json

PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def add_routes(app, api: Api) -> None:
    from aiohttp import web

    server = api.server
    api.openai_paths.update(PATHS)

    async def list_models(_request):
        return web.json_response(openai_api.models(api.kinds(), api.started, api.named()))

    async def completions(request):
        try:
            body = await api.read_json(request)
            raws = openai_api.completion_requests(body, api.kinds(), api.named())
        except ValueError as e:
            return api.error(request, 400, str(e))
        except openai_api.OpenAIError as e:
            return web.json_response(e.body(), status=e.status)
        try:
            parsed = [server.parse(raw) for raw in raws]
        except BadRequest as e:
            return api.error(request, 400, openai_api.openai_message(str(e)))
        if body.get("stream"):
            return await stream(request, body, parsed)
        try:
            answers = await api.answer(parsed)
        except REFUSALS as e:
            return api.refused(request, e)
        failed = [a for a in answers if "error" in a]
        if failed:
            return api.error(request, status_of(failed[0]), failed[0]["error"])
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

        piece = lambda i, text: openai_api.chunk(cid, model, i, text, None)  # noqa: E731
        return await api.streamed(request, parsed, piece, end, last)

    async def chat_completions(request):
        if server.chat is None:
            message = "this checkpoint carries no chat template (its tokenizer has none); use /v1/completions"
            return api.error(request, 400, message)
        try:
            body = await api.read_json(request)
            raw = openai_api.chat_request(body, api.kinds(), api.named())
            prompt = server.chat.prompt_ids(chat.messages_of(body["messages"]))
            # Checked as any request; the rendered messages then replace the task's prompt template.
            parsed = server.parse({**raw, "id": 0, "input": ""})
        except openai_api.OpenAIError as e:
            return web.json_response(e.body(), status=e.status)
        except (ValueError, BadRequest) as e:
            return api.error(request, 400, openai_api.openai_message(str(e)))
        limit = server.scheduler.max_prompt_len()
        if len(prompt) > limit:
            return api.error(
                request, 400, f"the messages are {len(prompt)} tokens in the chat template; at most {limit}"
            )
        parsed = dataclasses.replace(parsed, request=dataclasses.replace(parsed.request, prompt=prompt))
        cid, model = openai_api.new_id("chatcmpl"), body["model"]
        if body.get("stream"):
            return await chat_stream(request, body, parsed, cid)
        try:
            [answer] = await api.answer([parsed])
        except REFUSALS as e:
            return api.refused(request, e)
        if "error" in answer:
            return api.error(request, status_of(answer), answer["error"])
        return web.json_response(openai_api.chat_completion(cid, model, answer, len(prompt)), dumps=to_json)

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

        return await api.streamed(request, [parsed], piece, end, last)

    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
