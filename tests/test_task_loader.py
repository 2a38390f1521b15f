"""Tasks added and removed over HTTP while serving (mtl.serving.task_loader): rows written, nothing recompiled,
the other tasks' answers unchanged, running requests finished, incompatible runs refused in one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tasks
from mtl.config import HeadConfig, UsageError, tiny
from mtl.model import MultiTaskModel
from mtl.serving import server as serving
from mtl.serving import task_loader
from mtl.serving.requests import Request
from tests.helpers import randomise_adapters, served_over_http, tiny_model_config, write_run
from tests.test_http import call

pytest.importorskip("aiohttp")

CFG = tiny_model_config(max_len=64, adapter_rank=4, adapter_targets="q,v,down")
OTHER_HEADS = (
    HeadConfig("rev", "generate"),
    HeadConfig("spell", "generate"),
    HeadConfig("rev2", "generate"),
    HeadConfig("size", "classify", 3),
    HeadConfig("rev3", "generate"),
)


def run_of(folder, cfg, model):
    return str(write_run(folder, dataclasses.replace(tiny(), model=cfg), model))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Run A served with room for three more tasks (classifiers of 4 labels), B's rev2 added at start-up; run B on
    A's backbone with its own tasks, adapters and classifier."""
    tmp = tmp_path_factory.mktemp("runs")
    served = randomise_adapters(MultiTaskModel(CFG, rngs=nnx.Rngs(0)), seed=1)
    other_cfg = dataclasses.replace(CFG, heads=OTHER_HEADS)
    other = randomise_adapters(MultiTaskModel(other_cfg, rngs=nnx.Rngs(0)), seed=2, std=0.3)  # same backbone
    other.task_embed[...] = 0.3 * jax.random.normal(jax.random.key(3), other.task_embed.shape)
    other.heads["size"].b_c[...] = jnp.array([0.5, -0.2, 0.1])
    runs = {"a": run_of(tmp / "a", CFG, served), "b": run_of(tmp / "b", other_cfg, other)}
    wide = dataclasses.replace(other_cfg, d_ff=128)
    runs["wide"] = run_of(tmp / "wide", wide, MultiTaskModel(wide, rngs=nnx.Rngs(0)))
    runs["retrained"] = run_of(tmp / "retrained", other_cfg, MultiTaskModel(other_cfg, rngs=nnx.Rngs(9)))
    settings = ["serve.max_tasks=6", "serve.max_classes=4", "serve.max_batch=4", f"serve.add_tasks={runs['b']}:rev2"]
    server = serving.Server.load(runs["a"], settings)
    for spec, message in [
        ("/nowhere:rev", "serve.add_tasks '/nowhere:rev': run '/nowhere' holds no"),
        ("x", "RUN:TASK"),
    ]:
        with pytest.raises(UsageError, match=message):
            task_loader.add_at_start(server.loader, spec)
    with served_over_http(server):
        yield server, runs, other


def infer(server, task, text="hello", n=6):
    status, body = call(server, "POST", "/v1/infer", {"id": text, "task": task, "input": text, "max_new_tokens": n})
    assert status == 200, body
    return {k: body[k] for k in ("output", "label", "scores") if k in body}  # what the model answers


def greedy(model, task_id, prompt, n, allowed, eos):
    """Greedy tokens by recomputing the whole sequence (padded to a fixed length: one compilation)."""
    forward = nnx.jit(lambda m, tokens, ids: m.lm_logits(m(tokens, ids)))
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.array([seq + [0] * (CFG.max_len - len(seq))])
        logits = np.where(allowed, np.asarray(forward(model, padded, jnp.array([task_id])))[0, len(seq) - 1], -np.inf)
        seq.append(int(logits.argmax()))
        if seq[-1] == eos:
            break
    return seq[len(prompt) :]


def test_add_and_remove_tasks_over_http_while_serving(setup):
    server, runs, other = setup
    texts = ["hello", "spam and eggs"]
    before = {(task, t): infer(server, task, t) for task in ("spell", "echo", "lang") for t in texts}
    traces = dict(server.scheduler.engine.traces)
    tokenizer = tasks.ByteTokenizer()
    allowed = serving.allowed_tokens(tokenizer, CFG.vocab_size)

    def generated(task_id):
        """What run B's model generates greedily for task row ``task_id`` of B (EOS dropped)."""
        expected = greedy(other, task_id, tokenizer.prompt_ids("hello"), 6, allowed, tokenizer.eos_id)
        return tokenizer.decode([t for t in expected if t != tokenizer.eos_id])

    assert infer(server, "rev2")["output"] == generated(2)  # added at start-up
    status, body = call(server, "POST", "/v1/tasks", {"run": runs["b"], "task": "rev"})
    assert status == 200 and body["task"] == "rev", body
    assert infer(server, "rev")["output"] == generated(0)
    assert infer(server, "rev") != infer(server, "spell")  # its own adapter and task embedding
    assert {(task, t): infer(server, task, t) for task, t in before} == before  # the others unchanged
    # A classify task: its classifier in a spare row's, answering what run B's model does.
    status, body = call(server, "POST", "/v1/tasks", {"run": runs["b"], "task": "size"})
    assert status == 200 and body["row"] == 5, body
    status, answer = call(server, "POST", "/v1/infer", {"id": 1, "task": "size", "input": "hello"})
    prompt = jnp.array([tokenizer.prompt_ids("hello")])
    hidden = other(prompt, jnp.array([3]))
    want = np.asarray(jax.nn.softmax(other.classify_logits("size", hidden, jnp.array([prompt.shape[1]]))))[0]
    assert answer["label"] == ["l0", "l1", "l2"][int(want.argmax())]
    np.testing.assert_allclose([answer["scores"][f"l{i}"] for i in range(3)], want, atol=2e-6)
    assert call(server, "GET", "/health")[1]["tasks"] == ["echo", "lang", "rev", "rev2", "size", "spell"]

    refusals = {
        ("b", "spell"): "task 'spell' is served already",
        ("b", "rev3"): "no room for another task: serve.max_tasks=6",
        ("b", "nope"): "has no task 'nope'",
        ("wide", "rev3"): "has another backbone: model.d_ff=128",
    }
    for (run, task), message in refusals.items():
        status, body = call(server, "POST", "/v1/tasks", {"run": runs[run], "task": task})
        assert status == 400 and message in body["error"] and "\n" not in body["error"], body
    assert call(server, "POST", "/v1/tasks", {"run": 3})[0] == 400
    assert call(server, "DELETE", "/v1/tasks/nope")[0] == 404

    # A request running when its task is removed finishes; new ones are refused; the row is reused after.
    running = server.scheduler.submit(Request("rev", tokenizer.prompt_ids("long one"), 40))
    assert call(server, "DELETE", "/v1/tasks/rev") == (200, {"task": "rev", "removed": True})
    assert len(running.wait(60).tokens) == 40
    status, body = call(server, "POST", "/v1/infer", {"id": 1, "task": "rev", "input": "x"})
    assert status == 404 and "unknown task 'rev'" in body["error"] and "\n" not in body["error"]
    status, body = call(server, "POST", "/v1/tasks", {"run": runs["retrained"], "task": "rev3"})
    assert status == 400 and "has other backbone weights" in body["error"], body
    status, body = call(server, "POST", "/v1/tasks", {"run": runs["b"], "task": "rev3"})
    assert status == 200 and body["row"] == 4, body  # rev's row, free again
    assert infer(server, "rev3")["output"] == generated(4)
    assert 'task="rev3"' in call(server, "GET", "/metrics")[1]  # an added task has its own metrics
    assert {(task, t): infer(server, task, t) for task, t in before} == before
    assert server.scheduler.engine.traces == traces  # no program compiled again
