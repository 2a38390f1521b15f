"""HTTP mode on localhost with a real client: concurrent requests share batches,
bad requests get 400 with an error object, and a client that disconnects frees its slot."""

import concurrent.futures
import http.client
import json
import socket
import time

import jax
import numpy as np
import pytest
from flax import nnx

import tasks
from mtl.model import MultiTaskModel
from mtl.serving import server as serving
from mtl.serving.engine import Engine
from mtl.serving.scheduler import Scheduler
from mtl.serving.task_table import TaskTable
from sharding import make_mesh
from tests.helpers import served_over_http, tiny_model_config

pytest.importorskip("aiohttp")

CFG = tiny_model_config(max_len=128)
TASKS = {  # the run's task records: labels and default lengths
    "spell": {"max_new_tokens": 16},
    "lang": {"labels": ["de", "en", "es", "fr", "it"]},
    "echo": {"max_new_tokens": 16},
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
    scheduler = Scheduler(engine, TaskTable(CFG.heads, TASKS))
    scheduler.warmup()
    the_server = serving.Server(scheduler, tasks.ByteTokenizer())
    with served_over_http(the_server):
        yield the_server


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
    steps, made = server.scheduler.stats["steps"], server.scheduler.stats["tokens"]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: call(server, "POST", "/v1/infer", r), requests))
    steps, made = server.scheduler.stats["steps"] - steps, server.scheduler.stats["tokens"] - made
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
        ({"task": "spell", "input": "a"}, None, "'id'"),
        ({"id": 3, "task": "spell", "input": "a" * 200}, 3, "takes at most 127"),
        ({"id": "t", "task": "spell", "input": "a", "top_p": 0}, "t", "top_p 0"),
        ([1, 2], None, "JSON object"),
        (b'{"id": "s", "task": "spell", "input": "a\\ud800b"}', "s", "lone surrogate \\ud800 at character 1"),
        (b'{"id": "a\\udfffb", "task": "spell", "input": "a"}', None, "id holds a lone surrogate"),
        (b'{"id": "n", "task": "spell", "input": "a", "temperature": NaN}', None, "NaN is not a JSON number"),
        (b'{"id": "u", "task": "spell", "input": "\xff"}', None, "not valid JSON"),
        ({"id": 7, "task": ["spell"], "input": "a"}, 7, "task ['spell'] must be a task's name (a string)"),
        (b'{"id": 8, "task": "spell", "input": "a", "stop": ["\\udc00"]}', 8, "stop[0] holds a lone surrogate"),
        (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
        ({"id": 9, "task": "spell", "input": "a", "top_k": 2**31}, 9, "top_k 2147483648 must be an integer in"),
    ],
)
def test_bad_requests_get_400_with_an_error_object(server, body, rid, message):
    status, answer = call(server, "POST", "/v1/infer", body)
    assert status == 400 and answer["id"] == rid and message in answer["error"], answer


def test_an_unknown_task_gets_404_with_an_error_object(server):
    status, answer = call(server, "POST", "/v1/infer", {"id": "x", "task": "nope", "input": "a"})
    assert status == 404 and answer == {"id": "x", "error": "unknown task 'nope'; this model serves echo, lang, spell"}


def test_a_full_queue_answers_429_with_retry_after(server):
    server.scheduler.max_queue = 0
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        body = json.dumps({"id": "q", "task": "spell", "input": "a"})
        connection.request("POST", "/v1/infer", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        status, retry, answer = response.status, response.getheader("Retry-After"), json.loads(response.read())
    finally:
        server.scheduler.max_queue = 1024
        connection.close()
    assert status == 429 and retry == "1" and answer["id"] == "q" and "queue" in answer["error"]


def assert_cancelled_and_free(scheduler, cancelled_before: int) -> None:
    """Waits (30 s at most) for one more cancelled request and every slot free again."""
    deadline = time.monotonic() + 30
    while scheduler.stats["cancelled"] == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.stats["cancelled"] == cancelled_before + 1
    while scheduler.busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(scheduler.slots)


def test_a_client_that_disconnects_frees_its_slot(server):
    scheduler = server.scheduler
    cancelled = scheduler.stats["cancelled"]
    body = json.dumps({"id": "gone", "task": "spell", "input": "abc", "max_new_tokens": 120}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while not scheduler.busy() and time.monotonic() < deadline:
            time.sleep(0.0005)
    # Closed mid-generation: the handler is cancelled and the scheduler drops the request.
    assert_cancelled_and_free(scheduler, cancelled)
    status, answer = call(
        server, "POST", "/v1/infer", {"id": "after", "task": "spell", "input": "abc", "max_new_tokens": 3}
    )
    assert status == 200 and answer["tokens"] == 3


@pytest.mark.parametrize(
    "method, path, body, status, message",
    [
        (
            "POST",
            "/v1/infer",
            b'{"id": "big", "input": "' + b"a" * (1 << 20) + b'"}',
            413,
            "the request body is over 1048576 bytes",
        ),
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
    made = server.scheduler.stats["tokens"]
    status, stopped = call(server, "POST", "/v1/infer", {**base, "stop": stop})
    assert status == 200 and stopped["finish_reason"] == "stop", stopped
    assert stopped["output"] == full["output"][: full["output"].index(stop)]
    assert server.scheduler.stats["tokens"] - made < 12  # the engine stopped decoding it before its budget


# The clients people use: OpenAI's Python package and Prometheus's own parser.


def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai, openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0)


def test_openai_models_and_completions(server):
    openai, client = openai_client(server)
    assert [(m.id, m.object) for m in client.models.list().data] == [
        ("echo", "model"),
        ("lang", "model"),
        ("spell", "model"),
    ]
    done = client.completions.create(model="spell", prompt=["tree", "a stone"], max_tokens=5, temperature=0, seed=1)
    assert [c.index for c in done.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in done.choices)
    prompt_tokens = sum(
        len(server.parse({"id": 0, "task": "spell", "input": p}).request.prompt) for p in ("tree", "a stone")
    )
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt_tokens, 10)
    assert done.usage.total_tokens == prompt_tokens + 10
    # Greedy: the same text /v1/infer gives.
    mine = [
        call(server, "POST", "/v1/infer", {"id": w, "task": "spell", "input": w, "max_new_tokens": 5})[1]
        for w in ("tree", "a stone")
    ]
    assert [c.text for c in done.choices] == [a["output"] for a in mine]


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"model": "nope", "prompt": "a"}, "NotFoundError", "the model 'nope' does not exist"),
        ({"model": "lang", "prompt": "a"}, "BadRequestError", "'lang' is a classify task"),
        ({"model": "spell", "prompt": "a", "n": 2}, "BadRequestError", "n=2 is not supported"),
        ({"model": "spell", "prompt": "a", "max_tokens": 0}, "BadRequestError", "max_tokens 0 must be"),
        ({"model": "spell", "prompt": "a" * 300}, "BadRequestError", "prompt is 302 tokens"),
        ({"model": "spell", "prompt": "a", "logprobs": 2}, "BadRequestError", "logprobs=2 is not supported"),
    ],
)
def test_openai_errors_have_openais_shape(server, kwargs, error, fragment):
    openai, client = openai_client(server)
    with pytest.raises(getattr(openai, error)) as raised:
        client.completions.create(**kwargs)
    assert fragment in raised.value.body["message"], raised.value.body
    assert raised.value.body["type"] in ("invalid_request_error", "not_found_error")


def test_metrics_parse_and_count_what_was_served(server):
    parser = pytest.importorskip("prometheus_client.parser")

    def scrape():
        status, text = call(server, "GET", "/metrics")
        assert status == 200
        samples = {}
        for family in parser.text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    before = scrape()
    call(server, "POST", "/v1/infer", {"id": 1, "task": "echo", "input": "abc", "max_new_tokens": 4})
    call(server, "POST", "/v1/infer", {"id": 2, "task": "lang", "input": "Hallo"})
    call(server, "POST", "/v1/infer", {"id": 3, "task": "echo", "input": "abc", "top_p": 7})
    after = scrape()

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("mtl_requests_total", task="echo", outcome="length") == 1
    assert grew("mtl_requests_total", task="lang", outcome="ok") == 1
    assert grew("mtl_requests_total", task="echo", outcome="error") == 1
    assert grew("mtl_generated_tokens_total", task="echo") == 4
    assert grew("mtl_time_to_first_token_seconds_count", task="echo") == 1
    assert grew("mtl_time_per_output_token_seconds_count", task="echo") == 1
    assert grew("mtl_request_latency_seconds_count", task="lang") == 1
    assert after[("mtl_queue_depth", ())] == 0 and after[("mtl_busy_slots", ())] == 0


# Streaming: server-sent events as tokens are decided.


def sse_events(server, path, body):
    """The ``data:`` payloads of a streamed answer, in order (``[DONE]`` as a string), and the status."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.getheader("Content-Type", "").startswith("text/event-stream"), response.getheader(
            "Content-Type"
        )
        text = response.read().decode()
    finally:
        connection.close()
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return response.status, events


def test_openai_streaming_adds_up_to_the_greedy_text(server):
    _, client = openai_client(server)
    prompts = ["tree", "a stone"]
    whole = client.completions.create(model="spell", prompt=prompts, max_tokens=14, temperature=0)
    stop = whole.choices[0].text[5:7]  # greedy text comes again: it stops where this first appears
    stopped = client.completions.create(model="spell", prompt=prompts, max_tokens=14, temperature=0, stop=stop)
    for expected, kwargs in ((whole, {}), (stopped, {"stop": stop})):
        texts, reasons, chunks = ["", ""], [[], []], [0, 0]
        for c in client.completions.create(
            model="spell", prompt=prompts, max_tokens=14, temperature=0, stream=True, **kwargs
        ):
            for choice in c.choices:
                texts[choice.index] += choice.text
                reasons[choice.index].append(choice.finish_reason)
                chunks[choice.index] += bool(choice.text)
        assert texts == [c.text for c in expected.choices]
        for got, choice in zip(reasons, expected.choices):
            assert got[-1] == choice.finish_reason and set(got[:-1]) <= {None}  # the reason on the last chunk only
        if not kwargs:
            assert min(chunks) >= 2  # sent as the engine's chunks were read, not all at the end
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text


def test_openai_streaming_reports_usage_when_asked(server):
    _, client = openai_client(server)
    chunks = list(
        client.completions.create(
            model="echo", prompt="abc", max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_infer_streams_deltas_then_the_response_object(server):
    body = {"id": "st", "task": "spell", "input": "streams", "max_new_tokens": 12}
    _, whole = call(server, "POST", "/v1/infer", body)
    status, events = sse_events(server, "/v1/infer", {**body, "stream": True})
    assert status == 200
    *deltas, final = events
    assert deltas and all(set(e) == {"id", "task", "delta"} and e["id"] == "st" for e in deltas)
    assert "".join(e["delta"] for e in deltas) == whole["output"] == final["output"]
    assert final["finish_reason"] == "length" and final["tokens"] == 12
    status, events = sse_events(server, "/v1/infer", {"id": "c", "task": "lang", "input": "Hallo", "stream": True})
    assert status == 200 and len(events) == 1 and events[0]["label"] in TASKS["lang"]["labels"]
    status, answer = call(server, "POST", "/v1/infer", {**body, "stream": "yes"})
    assert status == 400 and "stream 'yes' must be true or false" in answer["error"]


def test_a_streaming_client_that_disconnects_frees_its_slot(server):
    scheduler = server.scheduler
    cancelled = scheduler.stats["cancelled"]
    body = json.dumps({"id": "gone", "task": "spell", "input": "abc", "max_new_tokens": 120, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"data: " not in received:  # streaming has begun
            received += client.recv(4096)
    assert_cancelled_and_free(scheduler, cancelled)


def test_streamed_text_waits_for_whole_characters_and_possible_stop_strings():
    tokenizer = tasks.ByteTokenizer()
    ids = tokenizer.encode("né END")
    text = serving.TextStream(tokenizer, ["ENDS", "x"])
    pieces = [text.update(ids[:n]) for n in range(1, len(ids) + 1)]
    # "é" is two bytes: nothing until both are read; "E", "EN", "END" could start "ENDS": held.
    assert pieces == ["n", "", "é", " ", "", "", ""]
    assert text.finish("né END") == "END"
    cut = serving.TextStream(tokenizer, ["b"])
    assert [cut.update(tokenizer.encode(s)) for s in ("a", "ab", "abc")] == ["a", "", ""]
    assert cut.finish("a") == ""


def test_a_request_past_its_deadline_is_answered_with_an_error_naming_it(server):
    body = {"id": "late", "task": "spell", "input": "abc", "max_new_tokens": 120, "deadline_ms": 1}
    status, answer = call(server, "POST", "/v1/infer", body)
    assert status == 504 and answer["id"] == "late", answer
    assert answer["error"].startswith("the request passed its deadline_ms of 1 ("), answer
    status, events = sse_events(server, "/v1/infer", {**body, "stream": True})
    assert status == 200 and "deadline_ms of 1 (" in events[-1]["error"]
    _, client = openai_client(server)
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(model="spell", prompt="abc", max_tokens=120, extra_body={"deadline_ms": 1})
    assert raised.value.status_code == 504 and "deadline_ms of 1" in raised.value.body["message"]
    status, answer = call(server, "POST", "/v1/infer", {**body, "deadline_ms": 60_000, "priority": 3})
    assert status == 200 and answer["tokens"] == 120
    _, text = call(server, "GET", "/metrics")
    assert 'mtl_requests_total{outcome="deadline",task="spell"} 3.0' in text


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("deadline_ms", 0, "deadline_ms 0 must be a positive number"),
        ("deadline_ms", "soon", "deadline_ms 'soon' must be a positive number"),
        ("priority", 1.5, "priority 1.5 must be an integer"),
        ("priority", True, "priority True must be an integer"),
    ],
)
def test_priority_and_deadline_are_checked(server, field, value, message):
    status, answer = call(server, "POST", "/v1/infer", {"id": "p", "task": "spell", "input": "a", field: value})
    assert status == 400 and message in answer["error"], answer


# A second app on the same scheduler: an API key, no task admin, a short read timeout.

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded(server):
    from mtl.serving.http_app import HttpSettings

    other = serving.Server(server.scheduler, server.tokenizer)
    with served_over_http(other, HttpSettings(api_key=KEY, task_admin=False, read_timeout=1.0)):
        yield other


def call_with(server, method, path, body=None, headers=()):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **dict(headers)})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read() or b"null")
    finally:
        connection.close()


def test_an_api_key_guards_every_v1_route_and_leaves_health_and_metrics_open(guarded):
    body = {"id": "k", "task": "spell", "input": "a", "max_new_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        status, sent, answer = call_with(guarded, "POST", "/v1/infer", body, headers)
        assert status == 401 and sent["WWW-Authenticate"] == "Bearer", (headers, status)
        assert answer == {"id": None, "error": "this server needs an API key: send Authorization: Bearer KEY"}
    status, _, answer = call_with(guarded, "POST", "/v1/infer", body, {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and answer["tokens"] == 2
    status, _, answer = call_with(guarded, "GET", "/v1/models")
    assert status == 401 and answer["error"]["type"] == "invalid_request_error"  # OpenAI's shape on its routes
    for path in ("/health", "/openapi.json"):
        assert call_with(guarded, "GET", path)[0] == 200
    assert call(guarded, "GET", "/metrics")[0] == 200
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{guarded.port}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["echo", "lang", "spell"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{guarded.port}/v1", api_key="no", max_retries=0).models.list()


def test_without_task_admin_the_admin_routes_are_not_served(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    status, _, answer = call_with(guarded, "POST", "/v1/tasks", {"run": "x", "task": "y"}, auth)
    assert status == 404 and answer == {"id": None, "error": "POST /v1/tasks: Not Found"}
    assert call_with(guarded, "DELETE", "/v1/tasks/spell", None, auth)[0] in (404, 405)
    assert "/v1/tasks" not in call_with(guarded, "GET", "/openapi.json")[2]["paths"]


def test_a_body_that_stalls_is_answered_408_and_its_connection_closed(guarded):
    scheduler = guarded.scheduler
    with socket.create_connection(("127.0.0.1", guarded.port)) as client:
        client.settimeout(30)
        t0 = time.monotonic()
        client.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n".encode()
            + b'{"id": "slow", "task": "spell", '
        )
        received = client.recv(4096)
        answered = time.monotonic() - t0
        while chunk := client.recv(4096):  # the server closes the connection
            received += chunk
        closed = time.monotonic() - t0
    assert received.startswith(b"HTTP/1.1 408") and b"did not arrive within 1s" in received, received
    assert 1.0 <= answered < 5 and closed < answered + 5 and not scheduler.busy(), (answered, closed)


def test_openapi_describes_every_route_and_its_bodies(server):
    status, document = call(server, "GET", "/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/infer",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/tasks",
        "/v1/tasks/{name}",
    }
    infer = document["components"]["schemas"]["InferRequest"]
    assert infer["required"] == ["id", "task", "input"] and infer["additionalProperties"] is False
    assert infer["properties"]["top_p"]["exclusiveMinimum"] == 0
