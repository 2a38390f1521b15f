"""HTTP mode on localhost with a real client: concurrent requests share batches,
bad requests get 400 with an error object, and a client that disconnects frees its slot."""

import asyncio
import concurrent.futures
import http.client
import json
import socket
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

import tasks
from mtl import server as serving
from mtl.engine import Engine
from mtl.model import MultiTaskModel
from sharding import make_mesh
from tests.helpers import tiny_model_config

pytest.importorskip("aiohttp")

CFG = tiny_model_config(max_len=128)
TASKS = {
    "spell": serving.TaskInfo("spell", "generate", (), 16),
    "lang": serving.TaskInfo("lang", "classify", ("de", "en", "es", "fr", "it"), 0),
    "echo": serving.TaskInfo("echo", "generate", (), 16),
}


@pytest.fixture(scope="module")
def server():
    """A tiny random model behind the server's HTTP app, on a free localhost port."""
    model = MultiTaskModel(CFG, rngs=nnx.Rngs(2))
    ids = np.arange(CFG.vocab_size)
    allowed = (ids >= 4) & (ids < 4 + 128)  # ASCII bytes only, no EOS: generations run to their max_new_tokens
    engine = Engine(
        model, make_mesh("data=1", jax.devices()[:1]), max_batch=4, allowed_tokens=allowed, eos_id=2, pad_id=0
    )
    engine.warmup()
    the_server = serving.Server(engine, TASKS, tasks.ByteTokenizer())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, port = asyncio.run_coroutine_threadsafe(serving.start_http(the_server, "127.0.0.1", 0), loop).result(60)
    the_server.port = port
    yield the_server
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def call(server, method, path, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode()
        return response.status, (
            json.loads(text) if response.getheader("Content-Type", "").startswith("application/json") else text
        )
    finally:
        connection.close()


def test_health(server):
    assert call(server, "GET", "/health") == (200, {"status": "ok", "tasks": ["echo", "lang", "spell"]})


def test_concurrent_requests_share_batches_and_match_batch_mode(server):
    requests = [
        {"id": f"g{i}", "task": ["spell", "echo"][i % 2], "input": "word" * (i + 1), "max_new_tokens": 12}
        for i in range(8)
    ]
    requests += [{"id": "c", "task": "lang", "input": "Deutschland"}]
    steps, made = server.engine.stats["steps"], server.engine.stats["tokens"]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: call(server, "POST", "/v1/infer", r), requests))
    steps, made = server.engine.stats["steps"] - steps, server.engine.stats["tokens"] - made
    assert all(status == 200 for status, _ in answers), answers
    by_id = {a["id"]: a for _, a in answers}
    for r in requests[:-1]:
        a = by_id[r["id"]]
        assert set(a) == {"id", "task", "output", "tokens", "finish_reason", "ttft_ms", "latency_ms"}
        assert a["tokens"] == 12 and a["finish_reason"] == "length" and a["ttft_ms"] <= a["latency_ms"]
    assert set(by_id["c"]) == {"id", "task", "label", "scores", "latency_ms"}
    assert made == 8 * 12
    assert steps <= 8 * 11 / 2  # slots decoded together (the first tokens come from prefills)
    # Greedy answers are the same as batch mode's (served by the same running engine).
    batch = server.respond(requests)
    assert [a["output"] for a in batch[:-1]] == [by_id[r["id"]]["output"] for r in requests[:-1]]


@pytest.mark.parametrize(
    "body, rid, message",
    [
        (b"{not json", None, "not valid JSON"),
        (b"", None, "not valid JSON"),
        ({"id": "x", "task": "nope", "input": "a"}, "x", "unknown task 'nope'"),
        ({"task": "spell", "input": "a"}, None, "'id'"),
        ({"id": 3, "task": "spell", "input": "a" * 200}, 3, "takes at most 127"),
        ({"id": "t", "task": "spell", "input": "a", "top_p": 0}, "t", "top_p 0"),
        ([1, 2], None, "JSON object"),
        (b'{"id": "s", "task": "spell", "input": "a\\ud800b"}', "s", "lone surrogate \\ud800 at character 1"),
        (b'{"id": "a\\udfffb", "task": "spell", "input": "a"}', None, "id holds a lone surrogate"),
        (b'{"id": "n", "task": "spell", "input": "a", "temperature": NaN}', None, "NaN is not a JSON number"),
        (b'{"id": "u", "task": "spell", "input": "\xff"}', None, "not valid JSON"),
    ],
)
def test_bad_requests_get_400_with_an_error_object(server, body, rid, message):
    status, answer = call(server, "POST", "/v1/infer", body)
    assert status == 400 and answer["id"] == rid and message in answer["error"], answer


def test_a_full_queue_answers_503(server):
    server.engine.max_queue = 0
    try:
        status, answer = call(server, "POST", "/v1/infer", {"id": "q", "task": "spell", "input": "a"})
    finally:
        server.engine.max_queue = 1024
    assert status == 503 and answer["id"] == "q" and "queue" in answer["error"]


def test_a_client_that_disconnects_frees_its_slot(server):
    engine = server.engine
    cancelled = engine.stats["cancelled"]
    body = json.dumps({"id": "gone", "task": "spell", "input": "abc", "max_new_tokens": 120}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while not engine.busy() and time.monotonic() < deadline:
            time.sleep(0.0005)
    # Closed mid-generation: the handler is cancelled and the engine drops the request.
    deadline = time.monotonic() + 30
    while engine.stats["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats["cancelled"] == cancelled + 1
    while engine.busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(engine.slots)
    status, answer = call(
        server, "POST", "/v1/infer", {"id": "after", "task": "spell", "input": "abc", "max_new_tokens": 3}
    )
    assert status == 200 and answer["tokens"] == 3


@pytest.mark.parametrize(
    "method, path, body, status, message",
    [
        ("POST", "/v1/infer", b'{"id": "big", "input": "' + b"a" * (1 << 20) + b'"}', 413, "the request body is over 1048576 bytes"),
        ("GET", "/v1/nothing", None, 404, "GET /v1/nothing: Not Found"),
        ("GET", "/v1/infer", None, 405, "GET /v1/infer: Method Not Allowed"),
    ],
)
def test_every_http_error_is_a_json_error_object(server, method, path, body, status, message):
    answer_status, answer = call(server, method, path, body)
    assert answer_status == status and answer == {"id": None, "error": message}, answer


def test_a_stop_string_ends_the_generation_in_the_engine(server):
    """The stop string's tokens reach the engine, which ends the request there and frees its slot."""
    base = {"id": "s", "task": "spell", "input": "stop here", "max_new_tokens": 12}
    status, full = call(server, "POST", "/v1/infer", base)
    assert status == 200 and full["tokens"] == 12 and full["finish_reason"] == "length"
    stop = full["output"][4]  # greedy: the same text comes again, and ends where the stop string first appears
    assert server.parse({**base, "stop": stop}).request.stop == (tuple(server.tokenizer.encode(stop)),)
    made = server.engine.stats["tokens"]
    status, stopped = call(server, "POST", "/v1/infer", {**base, "stop": stop})
    assert status == 200 and stopped["finish_reason"] == "stop", stopped
    assert stopped["output"] == full["output"][: full["output"].index(stop)]
    assert server.engine.stats["tokens"] - made < 12  # the engine stopped decoding it before its budget
