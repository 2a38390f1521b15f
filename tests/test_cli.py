"""End to end: train.py on a 2x2x2 mesh, killed and resumed, then serve.py on its checkpoint."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from mtl.checkpoint import find

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
TRAIN = [
    "--preset",
    "tiny",
    "--tasks",
    "g2p,langid",
    "--mesh",
    "data=2,fsdp=2,tensor=2",
    "--steps",
    "12",
    "--batch-size",
    "8",
    "--set",
    "train.checkpoint_every=4",
    "--set",
    "train.eval_every=4",  # the kill at the first checkpoint lands in (or just before) an evaluation
    "--set",
    "train.log_every=1",
    "--set",
    "train.eval_examples=8",
]


def run(script, *args, env=None, stdin=None):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        env=env or ENV,
        input=stdin,
        timeout=600,
    )


def training_losses(folder):
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r["task"]): r["loss"] for r in lines if "split" not in r}


def newest_checkpoint(folder) -> int | None:
    """The step of the newest complete checkpoint in run ``folder`` (the one a resumed run starts from)."""
    try:
        return find(folder)[1]
    except ValueError:
        return None


def kill_at_first_checkpoint(out) -> tuple[int, str]:
    """Starts train.py and SIGKILLs it from outside as soon as a checkpoint is complete: a crash mid-run.

    Returns the killed process's exit status (``-SIGKILL`` unless it ended first) and its stderr.
    """
    log = out.parent / f"{out.name}.stderr"  # a file, not a pipe: nobody reads a pipe while we poll
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *TRAIN, "--out", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=ENV,
        )
        try:
            deadline = time.monotonic() + 600
            while newest_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, log.read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    whole, resumed = root / "whole", root / "resumed"
    done = run("train.py", *TRAIN, "--out", str(whole))
    assert done.returncode == 0, done.stderr[-3000:]
    code, err = kill_at_first_checkpoint(resumed)
    assert code == -signal.SIGKILL, err[-3000:]  # killed mid-run, not finished on its own
    killed_at = newest_checkpoint(resumed)
    assert killed_at is not None and killed_at < 12, killed_at
    again = run("train.py", *TRAIN, "--out", str(resumed))
    assert again.returncode == 0, again.stderr[-3000:]
    return whole, resumed, again, killed_at


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_one(runs):
    whole, resumed, again, killed_at = runs
    assert f"resumed from step {killed_at}" in again.stderr
    a, b = training_losses(whole), training_losses(resumed)
    assert sorted(a) == sorted(b) and len(a) == 12
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "task", "loss", "tokens_per_s"} <= set(records[0])
    evals = [r for r in records if r.get("split") == "test"]
    assert {r["task"] for r in evals} == {"g2p", "langid"}
    assert "exact_match" in next(r for r in evals if r["task"] == "g2p")
    whole_records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    whole_test = {r["task"]: r for r in whole_records if r.get("split") == "test"}
    for r in evals:  # the resumed run scores as the uninterrupted one (the metrics are rounded to 1e-5)
        assert r.keys() == whole_test[r["task"]].keys()
        for key in r.keys() - {"step", "task", "split"}:
            assert r[key] == pytest.approx(whole_test[r["task"]][key], abs=1.1e-5), (r, key)
    assert sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8, 12]
    rates = [r["mfu"] for r in records if "split" not in r]  # None where every step of a line compiled
    assert any(rates) and all(rate is None or 0 < rate < 1 for rate in rates), rates
    assert list((resumed / "tensorboard").glob("events.out.tfevents.*"))
    # The evaluation the kill interrupted (or never began) is done again: the same lines as the whole run's.
    whole_evals = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "split" in r] == [r for r in whole_evals if "split" in r]
    assert {r["step"] for r in records if r.get("split") == "validation"} == {4, 8, 12}
    assert [p.name for p in (resumed / "best").iterdir()] == [p.name for p in (whole / "best").iterdir()]


@pytest.mark.slow
def test_eval_only_on_a_finished_run(runs):
    whole, *_ = runs
    before = (whole / "metrics.jsonl").read_text().splitlines()
    result = run("train.py", "--eval-only", "--out", str(whole), "--set", "train.eval_examples=4", "--mesh", "fsdp=8")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.splitlines()[-1])
    assert set(scores) == {"validation", "test"} and set(scores["test"]) == {"g2p", "langid"}
    added = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()[len(before) :]]
    assert {(r["split"], r["task"], r["step"]) for r in added} == {
        (s, t, 12) for s in ("validation", "test") for t in ("g2p", "langid")
    }


REQUESTS = [
    {"id": "g1", "task": "g2p", "input": "hello"},
    {"id": "l1", "task": "langid", "input": "Allemagne"},
    "this line is not json",
    {"id": "bad-task", "task": "nope", "input": "x"},
    {
        "id": "g2",
        "task": "g2p",
        "input": "world",
        "temperature": 0.9,
        "top_k": 20,
        "top_p": 0.9,
        "seed": 4,
        "max_new_tokens": 5,
    },
    {"task": "g2p", "input": "no id"},
    {"id": "bad-temp", "task": "g2p", "input": "cat", "temperature": -1},
    {"id": "long", "task": "g2p", "input": "x" * 500},
    {"id": 7, "task": "langid", "input": "Deutschland", "stop": ["\n"]},
    {"id": "g3", "task": "g2p", "input": "dog", "max_new_tokens": 1},
]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data=4,tensor=2", "fsdp=8"])
def test_serve_answers_mixed_and_bad_requests_on_another_mesh(runs, mesh, tmp_path):
    _, resumed, *_ = runs
    lines = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in REQUESTS) + "\n"
    (tmp_path / "requests.jsonl").write_text(lines)
    out = tmp_path / "responses.jsonl"
    served = run(
        "serve.py",
        "--ckpt",
        str(resumed),
        "--requests",
        str(tmp_path / "requests.jsonl"),
        "--out",
        str(out),
        "--mesh",
        mesh,
        "--max-batch",
        "4",
    )
    assert served.returncode == 0, served.stderr[-3000:]
    responses = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in responses] == ["g1", "l1", None, "bad-task", "g2", None, "bad-temp", "long", 7, "g3"]
    by_id = {r["id"]: r for r in responses if r["id"] is not None}
    for rid in ("g1", "g2", "g3"):
        r = by_id[rid]
        assert set(r) == {"id", "task", "output", "tokens", "finish_reason", "ttft_ms", "latency_ms"}
        assert r["finish_reason"] in ("stop", "length") and isinstance(r["output"], str)
    assert by_id["g2"]["tokens"] <= 5 and by_id["g3"]["tokens"] <= 1
    for rid in ("l1", 7):
        r = by_id[rid]
        assert set(r) == {"id", "task", "label", "scores", "latency_ms"}
        labels = json.loads((resumed / "tasks.json").read_text())[1]["labels"]
        assert sorted(r["scores"]) == sorted(labels) and r["label"] in labels
        assert sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert "not valid JSON" in responses[2]["error"]
    assert "unknown task 'nope'" in by_id["bad-task"]["error"]
    assert "'id'" in responses[5]["error"]
    assert "temperature -1" in by_id["bad-temp"]["error"]
    assert "tokens" in by_id["long"]["error"]


@pytest.mark.slow
def test_serve_same_greedy_answers_on_any_mesh(runs, tmp_path):
    _, resumed, *_ = runs
    requests = "".join(
        json.dumps({"id": i, "task": "g2p", "input": w}) + "\n" for i, w in enumerate(["tree", "stone", "a"])
    )
    outputs = []
    for mesh in ("data=8", "data=2,fsdp=2,tensor=2"):
        served = run("serve.py", "--ckpt", str(resumed / "checkpoints" / "12"), "--mesh", mesh, stdin=requests)
        assert served.returncode == 0, served.stderr[-3000:]
        outputs.append([json.loads(line)["output"] for line in served.stdout.splitlines()])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mesh", "data=3"], "covers 3 devices"),
        (["--mesh", "model=8"], "'model=8'"),
        (["--tasks", "g2p,klingon"], "klingon"),
        (["--mixture", "temperature:zero"], "temperature:zero"),
        (["--set", "model.d_modle=4"], "d_modle"),
        (["--set", "model.n_heads=3"], "n_heads=3"),
        (["--preset", "huge"], "huge"),
        (["--set", "train.best_metric=g2p/accuracy"], "g2p/accuracy"),
        (["--set", "train.loss_weights=g2p=-1"], "g2p=-1"),
        (["--set", "train.loss_weights=klingon=2"], "klingon"),
        (["--eval-only"], "holds no mtl run to evaluate"),
        (["--seed", "-1"], "seed"),  # it used to leave config.json behind, refusing the retry
        (["--set", "train.learning_rate=nan"], "learning_rate"),
    ],
)
def test_train_usage_errors_are_one_line_and_write_nothing(args, message, tmp_path, capsys):
    from mtl.cli.train import main  # in this process: the command line's own code, without a Python start each

    out = tmp_path / "run"
    assert main(["--steps", "2", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert not out.exists()


def test_a_usage_error_from_a_piped_terminal_is_one_line_and_no_traceback(tmp_path):
    out = tmp_path / "run"
    result = run("train.py", "--steps", "2", "--out", str(out), "--seed", "-1")
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if "error" in line]
    assert line.startswith("train.py: error: train.seed=-1") and "Traceback" not in result.stderr, result.stderr
    assert not out.exists()


def test_out_naming_a_file_is_refused_before_the_data_is_read(tmp_path, capsys):
    from mtl.cli.train import main

    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert main(["--tasks", "mine=/no/such/file.jsonl", "--out", str(out)]) == 2  # the --out check comes first
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"train.py: error: --out {str(out)!r} must be a folder"), line
    assert (tmp_path / "file").read_text() == "mine"


def test_a_shape_that_cannot_be_allocated_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """What the memory estimate does not foresee: XLA's RESOURCE_EXHAUSTED at compile or run time (issue 26)."""
    import jax

    from mtl import trainer
    from mtl.cli.train import main

    def exhausted(plan, out):
        try:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1.21TiB\nmore detail")
        except jax.errors.JaxRuntimeError as e:
            raise RuntimeError("the step failed") from e

    monkeypatch.setattr(trainer, "run", exhausted)
    assert main(["--tasks", "langid", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("train.py:") or "Traceback" in x]
    assert line == (
        "train.py: error: the run does not fit in the devices' memory (RESOURCE_EXHAUSTED: Out of memory "
        "allocating 1.21TiB); lower train.batch_size or the model"
    )


def test_help_lists_the_set_fields_with_their_defaults():
    result = run("train.py", "--help")
    assert result.returncode == 0
    for line in (
        "  train.learning_rate=0.003",
        "  model.d_model=64",
        "  serve.max_batch=32",
        "  train.tasks=g2p,langid",
    ):
        assert line in result.stdout.splitlines(), line


def test_installs_packages_and_console_scripts_not_top_level_modules():
    """``train``, ``serve`` and ``evaluate`` are other projects' names (Hugging Face's ``evaluate``, say)."""
    import importlib
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py-modules" not in project["tool"]["setuptools"]
    assert set(project["tool"]["setuptools"]["packages"]) == {"mtl", "mtl.cli", "sharding", "tasks"}
    scripts = project["project"]["scripts"]
    assert set(scripts) == {"mtl-train", "mtl-serve"}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_serve_usage_errors(tmp_path):
    missing = run("serve.py", "--ckpt", str(tmp_path / "nothing"), stdin="")
    assert missing.returncode == 2 and "no complete checkpoint" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_served_requests_never_wait_for_a_compilation(runs):
    """Server.load compiles every shape; answering a mixed file afterwards compiles nothing."""
    import jax

    from mtl.serving.server import Server

    _, resumed, *_ = runs
    server = Server.load(str(resumed), ["serve.mesh=data=2,fsdp=2,tensor=2", "serve.max_batch=8"])
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if name.endswith("backend_compile_duration") else None
    )
    responses = server.respond([r for r in REQUESTS if isinstance(r, dict)])
    assert len(responses) == 9 and sum("error" in r for r in responses) == 4
    assert compiles == []
