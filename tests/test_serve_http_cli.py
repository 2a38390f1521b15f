"""serve.py's HTTP flags: checked before anything loads (one line, exit 2), and a graceful stop on a real
SIGTERM: new requests get 503 (and /health), the requests in flight finish (or, with --shutdown-timeout 0, are
cancelled at once), and it exits 0."""

import concurrent.futures
import dataclasses
import http.client
import json
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
from flax import nnx

from mtl.config import tiny
from mtl.model import MultiTaskModel
from tests.helpers import tiny_model_config, write_run

pytest.importorskip("aiohttp")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = tiny_model_config(max_len=512)
LONG = 400  # new tokens: long enough to be in flight when the signal comes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = dataclasses.replace(tiny(), model=CFG)
    return write_run(tmp_path_factory.mktemp("stop") / "run", config, MultiTaskModel(CFG, rngs=nnx.Rngs(0)))


def start(run, timeout: float):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, str(ROOT / "serve.py"), "--ckpt", str(run), "--http", f"127.0.0.1:{port}"]
    args += ["--shutdown-timeout", str(timeout), "--set", "serve.max_batch=4", "--set", "serve.steps_per_call=1"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        try:
            if request(port, "GET", "/health")[0] == 200:
                return process, port
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError("serve.py did not answer /health")


def request(port, method, path, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body).encode())
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def streamed_until_first_token(port, i):
    """Starts a long streamed generation; returns the open response once its first event arrived."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"id": i, "task": "spell", "input": f"word {i}", "max_new_tokens": LONG, "stream": True}
    connection.request("POST", "/v1/infer", body=json.dumps(body).encode())
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")
    return connection, response


def last_event(response):
    events = [json.loads(line[6:]) for line in response.read().splitlines() if line.startswith(b"data: ")]
    return events[-1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--api-key", "k"], "--api-key applies to HTTP mode only: add --http HOST:PORT"),
        (["--no-task-admin"], "--no-task-admin applies to HTTP mode only"),
        (["--http", "127.0.0.1:0", "--shutdown-timeout", "-1"], "--shutdown-timeout -1 must be a number of seconds"),
        (["--http", "127.0.0.1:0", "--read-timeout", "0"], "--read-timeout 0 must be a number of seconds, positive"),
        (["--http", "127.0.0.1:0", "--runs-root", "/no/such/dir"], "--runs-root '/no/such/dir' is not a folder"),
        (["--http", "127.0.0.1:0", "--api-key", " "], "--api-key (or MTL_API_KEY) is empty"),
    ],
)
def test_http_flags_are_checked_before_anything_loads(flags, message, capsys):
    from mtl.cli.serve import main

    assert main(["--ckpt", "/no/such/run", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("serve.py: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_sigterm_finishes_what_is_in_flight_and_refuses_the_rest(run):
    process, port = start(run, timeout=60)
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            opened = list(pool.map(lambda i: streamed_until_first_token(port, i), range(3)))
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            status, body = request(port, "POST", "/v1/infer", {"id": "late", "task": "spell", "input": "x"})
            assert status == 503 and body == {
                "id": None,
                "error": "the server is shutting down and takes no new requests",
            }
            assert request(port, "GET", "/health")[0] == 503
            finals = [last_event(response) for _, response in opened]
        assert all("error" not in f and f["tokens"] > 0 for f in finals), finals
        assert process.wait(60) == 0
        log = process.stderr.read().decode()
        assert "stopping: no new requests" in log and "stopped" in log and "Traceback" not in log
    finally:
        process.kill()


@pytest.mark.slow
def test_a_zero_shutdown_timeout_cancels_what_is_in_flight(run):
    process, port = start(run, timeout=0)
    try:
        connection, response = streamed_until_first_token(port, 0)
        t0 = time.monotonic()
        process.send_signal(signal.SIGTERM)
        final = last_event(response)
        assert "the server shut down before the request finished" in final["error"], final
        assert process.wait(60) == 0 and time.monotonic() - t0 < 30
    finally:
        process.kill()
