"""The server library: a checkpoint loaded with its serving config and overrides, batch answers, bad requests."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest
from flax import nnx

from mtl import config as C
from mtl.checkpoint import Checkpoints
from mtl.config import UsageError
from mtl.model import MultiTaskModel
from mtl.serving.server import Server, finite_or_error, read_requests, serving_config, to_json
from tests.helpers import tiny_model_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

TASKS = [
    {"name": "spell", "kind": "generate", "description": "", "labels": [], "max_new_tokens": 6},
    {
        "name": "lang",
        "kind": "classify",
        "description": "",
        "labels": ["de", "en", "es", "fr", "it"],
        "max_new_tokens": 0,
    },
    {"name": "echo", "kind": "generate", "description": "", "labels": [], "max_new_tokens": 6},
]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder with one checkpoint of a tiny random model, serving 4 slots by its own config.

    The server reads only the parameters; the optimizer item holds a copy of them.
    """
    folder = tmp_path_factory.mktemp("run")
    cfg = C.Config(model=tiny_model_config(max_len=64), serve=C.ServeConfig(max_batch=4, steps_per_call=3))
    model = MultiTaskModel(cfg.model, rngs=nnx.Rngs(0))
    checkpoints = Checkpoints(folder / "checkpoints")
    checkpoints.save(5, nnx.state(model), nnx.state(model), {"config": C.to_dict(cfg), "tasks": TASKS, "step": 5})
    checkpoints.wait()
    checkpoints.close()
    return folder


def test_load_serves_with_the_runs_serving_config(run_folder):
    server = Server.load(str(run_folder))
    scheduler = server.scheduler
    assert (scheduler.max_batch, scheduler.steps_per_call, scheduler.prefill_batch) == (4, 3, 4)
    assert scheduler.scheduler == "fair"
    assert dict(scheduler.engine.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_load_applies_overrides(run_folder):
    overrides = ["serve.max_batch=2", "serve.prefill_batch=1", "serve.steps_per_call=5", "serve.mesh=data=1,fsdp=2"]
    with pytest.raises(UsageError, match="covers 2 devices"):  # 8 devices here: the mesh must use them all
        Server.load(str(run_folder), overrides)
    server = Server.load(str(run_folder), overrides[:3] + ["serve.mesh=data=2,tensor=4", "serve.scheduler=fifo"])
    scheduler = server.scheduler
    assert scheduler.scheduler == "fifo"
    assert (scheduler.max_batch, scheduler.prefill_batch, scheduler.steps_per_call) == (2, 1, 5)
    assert dict(scheduler.engine.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    lines = [
        '{"id": "a", "task": "spell", "input": "cat", "max_new_tokens": 4}',
        '{"id": "b", "task": "lang", "input": "hallo"}',
        "{not json",
        '{"id": "c", "task": "nope", "input": "x"}',
        '{"id": "d", "task": "echo", "input": "dog", "max_new_tokens": 2, "temperature": 0.5, "seed": 3}',
        '{"id": "e", "task": "echo", "input": "dog", "max_new_tokens": 60, "deadline_ms": 0.001}',
    ]
    responses = server.respond(read_requests(lines))
    assert [r["id"] for r in responses] == ["a", "b", None, "c", "d", "e"]
    assert responses[0]["tokens"] <= 4 and responses[0]["finish_reason"] in ("stop", "length")
    assert responses[1]["label"] in TASKS[1]["labels"]
    assert sum(responses[1]["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert "line 3 is not valid JSON" in responses[2]["error"]
    assert "unknown task 'nope'" in responses[3]["error"]
    assert responses[4]["tokens"] <= 2
    assert responses[5] == {"id": "e", "error": responses[5]["error"]}
    assert responses[5]["error"].startswith("the request passed its deadline_ms of 0.001 (")


@pytest.mark.parametrize(
    "assignment, fragment",
    [
        ("serve.max_batch=0", "serve.max_batch=0 must be positive"),
        ("serve.prefill_batch=-1", "serve.prefill_batch=-1"),
        ("serve.steps_per_call=x", "serve.steps_per_call='x'"),
        ("serve.slots=4", "serve has no field 'slots'"),
        ("serve.scheduler=lifo", "serve.scheduler='lifo' must be fair or fifo"),
        ("model.d_model=8", "only serve.* fields"),
    ],
)
def test_serving_overrides_are_checked(assignment, fragment):
    with pytest.raises(UsageError, match=None) as info:
        serving_config(C.Config(), [assignment])
    assert fragment in str(info.value)


def test_old_run_configs_get_the_default_serving_config():
    saved = C.to_dict(C.Config(serve=C.ServeConfig(max_batch=7)))
    assert C.from_dict(saved).serve.max_batch == 7
    del saved["serve"]  # written before the section existed
    assert C.from_dict(saved).serve == C.ServeConfig()
    assert dataclasses.replace(C.Config(), serve=C.ServeConfig()) == C.from_dict(C.to_dict(C.Config()))


def test_each_bad_line_gets_its_own_error(run_folder):
    server = Server.load(str(run_folder))
    lines = [
        b'{"id": "ok1", "task": "lang", "input": "hallo"}',
        b'{"id": "bytes", "task": "lang", "input": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"id": "sur", "task": "lang", "input": "a\\ud800b"}',
        b'{"id": "x\\udfff", "task": "lang", "input": "a"}',
        b'{"id": "nan", "task": "spell", "input": "a", "temperature": NaN}',
        b"",
        b'{"id": "ok2", "task": "spell", "input": "dog", "max_new_tokens": 2}',
    ]
    responses = server.respond(read_requests(lines))
    assert [r["id"] for r in responses] == ["ok1", None, "sur", None, None, "ok2"]
    assert "label" in responses[0] and responses[-1]["tokens"] <= 2
    assert responses[1]["error"] == f"line 2 is not UTF-8: byte 0xe9 at byte {lines[1].index(0xE9) + 1}"
    assert responses[2]["error"] == "input holds a lone surrogate \\ud800 at character 1, which is not text"
    assert "id holds a lone surrogate" in responses[3]["error"]
    assert responses[4]["error"] == "line 5 is not valid JSON: NaN is not a JSON number"
    for r in responses:
        json.loads(to_json(r))  # every line is strict JSON


def test_a_non_finite_answer_becomes_an_error_not_bare_nan():
    response = {"id": "r", "task": "lang", "label": "de", "scores": {"de": float("nan")}, "latency_ms": 1.0}
    error = finite_or_error(response)
    assert error == {"id": "r", "error": "the model's scores is not a finite number; its checkpoint may have diverged"}
    assert finite_or_error({"id": "v", "value": 1.5}) == {"id": "v", "value": 1.5}
    with pytest.raises(ValueError):
        to_json(response)


def serve_cli(*args, stdin: bytes = b""):
    return subprocess.run(
        [sys.executable, str(ROOT / "serve.py"), *args], input=stdin, capture_output=True, cwd=ROOT, timeout=600
    )


@pytest.mark.slow
def test_batch_mode_keeps_every_good_line(run_folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(
        b'{"id": 1, "task": "lang", "input": "hallo"}\n\xff\xfe\n{"id": "\\ud800", "task": "lang", "input": "a"}\n'
        b'{"id": 2, "task": "spell", "input": "tree", "max_new_tokens": 3}\n'
    )
    out = tmp_path / "responses.jsonl"
    served = serve_cli("--ckpt", str(run_folder), "--requests", str(requests), "--out", str(out))
    assert served.returncode == 0, served.stderr.decode()[-2000:]
    responses = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in responses] == [1, None, None, 2]
    assert "not UTF-8" in responses[1]["error"] and "lone surrogate" in responses[2]["error"]
    assert not list(tmp_path.glob(".responses.jsonl.*"))  # the temporary file was renamed
    assert " slots of " in served.stderr.decode() and "KV cache: " in served.stderr.decode()


@pytest.mark.parametrize(
    "setting, message",
    [
        ("serve.kv_memory=1KiB", "serve.kv_memory=0.0MiB holds no decode slot: one of"),
        ("serve.kv_memory=lots", "serve.kv_memory='lots' must be a positive size"),
        ("serve.kv_dtype=int4", "serve.kv_dtype='int4' must be empty (model.dtype) or one of"),
    ],
)
def test_a_kv_cache_that_cannot_be_made_is_one_line(run_folder, setting, message):
    served = serve_cli("--ckpt", str(run_folder), "--set", setting, stdin=b'{"id": 1}\n')
    stderr = served.stderr.decode()
    assert served.returncode == 2 and message in stderr and "Traceback" not in stderr, stderr[-2000:]


@pytest.mark.parametrize("out, message", [("{tmp}", "is a directory"), ("{tmp}/no/such/file", "cannot be written")])
def test_a_bad_out_is_refused_before_serving(run_folder, tmp_path, out, message):
    served = serve_cli("--ckpt", str(run_folder), "--out", out.format(tmp=tmp_path), stdin=b'{"id": 1}\n')
    stderr = served.stderr.decode()
    assert served.returncode == 2 and message in stderr and "Traceback" not in stderr
    assert "restored" not in stderr  # refused before the checkpoint was read
