"""Tasks added and removed over HTTP while serving (mtl.serving.task_loader): rows written, nothing recompiled,
the other tasks' answers unchanged, running requests finished, incompatible runs refused in one line."""

import dataclasses
import time

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


# Every kind live, the runs root, and DELETE/POST of one name under traffic.

KIND_HEADS = (
    HeadConfig("rev", "generate"),
    HeadConfig("score", "regress", 0, 3.0, 2.0),
    HeadConfig("pos", "tag", 3),
    HeadConfig("size", "classify", 3),
)


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """Run A served from ROOT/a with spare rows of every head kind; run B (ROOT/b) on its backbone with a task
    of each kind; a copy of B outside the root, and a symlink to it inside."""
    root, outside = tmp_path_factory.mktemp("root"), tmp_path_factory.mktemp("outside")
    served = randomise_adapters(MultiTaskModel(CFG, rngs=nnx.Rngs(0)), seed=1)
    other_cfg = dataclasses.replace(CFG, heads=KIND_HEADS)
    other = randomise_adapters(MultiTaskModel(other_cfg, rngs=nnx.Rngs(0)), seed=4, std=0.3)
    other.task_embed[...] = 0.3 * jax.random.normal(jax.random.key(5), other.task_embed.shape)
    other.heads["score"].w_d[...] = 0.5 * jax.random.normal(jax.random.key(6), other.heads["score"].w_d.shape)
    other.heads["score"].b[...] = jnp.asarray(0.25)
    other.heads["pos"].b_c[...] = jnp.array([0.3, -0.1, 0.0])
    run_of(root / "a", CFG, served)
    run_of(root / "b", other_cfg, other)
    run_of(outside / "c", other_cfg, other)
    (root / "link").symlink_to(outside / "c")
    settings = ["serve.max_tasks=7", "serve.max_classes=4", "serve.spare_kinds=classify,regress,tag,generate"]
    server = serving.Server.load(str(root / "a"), [*settings, "serve.max_batch=4"])
    with served_over_http(server):
        yield server, root, outside, other


def test_tasks_of_every_kind_are_added_live_and_answer_as_their_run(kinds):
    server, root, _, other = kinds
    traces = dict(server.scheduler.engine.traces)
    for task in ("score", "pos", "size", "rev"):
        status, body = call(server, "POST", "/v1/tasks", {"run": "b", "task": task})  # relative: under the root
        assert status == 200 and body["run"] == "b", body
    tokenizer = tasks.ByteTokenizer()
    text = "the cat sat"
    prompt = jnp.array([tokenizer.prompt_ids(text)])
    lengths = jnp.array([prompt.shape[1]])
    want = {
        name: np.asarray(other.head_outputs(other(prompt, jnp.array([row])), lengths)[name])[0]
        for row, name in ((1, "score"), (2, "pos"), (3, "size"))
    }
    status, answer = call(server, "POST", "/v1/infer", {"id": 1, "task": "score", "input": text})
    assert status == 200 and answer["value"] == pytest.approx(float(want["score"]), abs=1e-4), answer
    status, answer = call(server, "POST", "/v1/infer", {"id": 2, "task": "pos", "input": text})
    assert answer["tags"] == [f"l{i}" for i in tasks.tags_at_word_ends(want["pos"], text, tokenizer)], answer
    status, answer = call(server, "POST", "/v1/infer", {"id": 3, "task": "size", "input": text})
    np.testing.assert_allclose([answer["scores"][f"l{i}"] for i in range(3)], want["size"], atol=2e-6)
    assert call(server, "POST", "/v1/infer", {"id": 4, "task": "rev", "input": text})[0] == 200
    assert server.scheduler.engine.traces == traces  # rows written, nothing compiled again
    for task in ("score", "pos", "size", "rev"):
        assert call(server, "DELETE", f"/v1/tasks/{task}") == (200, {"task": task, "removed": True})
    status, body = call(server, "POST", "/v1/infer", {"id": 5, "task": "score", "input": text})
    assert status == 404 and body == {"id": 5, "error": "unknown task 'score'; this model serves echo, lang, spell"}


def test_runs_are_added_only_from_under_the_runs_root(kinds):
    server, root, outside, _ = kinds
    refusals = {
        str(outside / "c"): True,  # exists, outside
        str(outside / "nothing"): False,  # does not exist, outside
        "../" + outside.name + "/c": True,  # climbs out with ..
        "b/../../" + outside.name + "/c": True,
        "link": True,  # a symlink inside the root to a run outside
        "/etc": True,
    }
    for run, exists in refusals.items():
        status, body = call(server, "POST", "/v1/tasks", {"run": run, "task": "rev"})
        assert status == 403, (run, body)
        assert body == {
            "id": None,
            "error": f"run {run!r} is not under the server's runs root; only runs there can be added",
        }
    status, body = call(server, "POST", "/v1/tasks", {"run": "nothing-here", "task": "rev"})
    assert status == 400 and "holds no" in body["error"]  # inside the root: said plainly
    assert "rev" not in server.table


def test_delete_then_post_of_one_name_under_four_client_threads(kinds):
    import concurrent.futures
    import threading

    server, *_ = kinds
    assert call(server, "POST", "/v1/tasks", {"run": "b", "task": "rev"})[0] == 200
    expected = infer(server, "rev", "abc", 5)
    stop, seen = threading.Event(), []

    def client(task):
        while not stop.is_set():
            status, body = call(
                server, "POST", "/v1/infer", {"id": 1, "task": task, "input": "abc", "max_new_tokens": 5}
            )
            seen.append((task, status, body.get("output") if isinstance(body, dict) else body))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, task) for task in ("rev", "rev", "spell", "lang")]
        for _ in range(4):
            assert call(server, "DELETE", "/v1/tasks/rev")[0] == 200
            status, body = call(server, "POST", "/v1/tasks", {"run": "b", "task": "rev"})
            assert status == 200, body
            assert infer(server, "rev", "abc", 5) == expected  # served fully again at once
        stop.set()
        for f in futures:
            f.result(60)
    statuses = {(task, status) for task, status, _ in seen}
    assert statuses <= {("rev", 200), ("rev", 404), ("spell", 200), ("lang", 200)}, statuses
    assert all(out == expected["output"] for task, status, out in seen if task == "rev" and status == 200)
    assert ("rev", 200) in statuses and sum(t == "spell" for t, _, _ in seen) > 4
    time.sleep(0.2)
    table = server.table
    assert all(table.in_use(row) == 0 for row in range(len(table.heads))), "a finished request still holds its row"
