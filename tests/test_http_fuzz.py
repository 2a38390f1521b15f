"""Fuzzing every HTTP route from the server's own OpenAPI document (schemathesis): bodies that fit the
schema and bodies that do not, and never a 500. Bounded to a few examples a route (a few seconds)."""

import jax
import numpy as np
import pytest
from flax import nnx

import tasks
from mtl.model import MultiTaskModel
from mtl.serving import schemas
from mtl.serving import server as serving
from mtl.serving.engine import Engine
from mtl.serving.scheduler import Scheduler
from mtl.serving.task_table import TaskTable
from sharding import make_mesh
from tests.helpers import served_over_http, tiny_model_config

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("aiohttp")
from hypothesis import HealthCheck, settings  # noqa: E402  (schemathesis brings hypothesis)

CFG = tiny_model_config(max_len=64)
DOCUMENT = schemas.openapi(admin=True)
# The served tasks' names as hints, so that fitting bodies reach the scheduler and the engine, not only 404.
for name, field in (("InferRequest", "task"), ("CompletionRequest", "model"), ("ChatCompletionRequest", "model")):
    DOCUMENT["components"]["schemas"][name]["properties"][field]["enum"] = ["spell", "echo", "lang"]
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def base_url():
    """A tiny random model behind the HTTP app (no task admin behind its routes: this server has no run)."""
    model = MultiTaskModel(CFG, rngs=nnx.Rngs(5))
    ids = np.arange(CFG.vocab_size)
    engine = Engine(
        model,
        make_mesh("data=1", jax.devices()[:1]),
        max_batch=4,
        allowed_tokens=(ids >= 4) & (ids < 132),
        eos_id=2,
        pad_id=0,
    )
    scheduler = Scheduler(engine, TaskTable(CFG.heads, {"lang": {"labels": ["a", "b", "c", "d", "e"]}}))
    scheduler.warmup()
    server = serving.Server(scheduler, tasks.ByteTokenizer())
    with served_over_http(server):
        yield f"http://127.0.0.1:{server.port}"


@SCHEMA.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_route_answers_500(case, base_url):
    response = case.call(base_url=base_url, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    content_type = response.headers.get("content-type", [""])[0]  # schemathesis: lower-case names, lists
    assert content_type.startswith(("application/json", "text/")), content_type

