"""Fault injection: signals at any moment, damaged checkpoints, divergence, two runs on one folder.

Each case asserts that nothing is lost (every training step logged exactly
once, a checkpoint of the step a signal stopped at, no non-finite checkpoint)
and that the message is one line. The runs are tiny (one classify task, 2
devices) and share a persistent compilation cache, so the file stays near two
minutes on 2 cores.
"""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import sharding
from mtl import config as C
from mtl import training
from mtl.checkpoint import Checkpoints, complete_steps, missing_files, restore_newest
from mtl.config import UsageError
from mtl.run_folder import RunFolder
from tests.test_checkpoint import trained_state
from tests.test_sharding import MODEL, TRAIN

ROOT = pathlib.Path(__file__).resolve().parents[1]
ONE_DEVICE = lambda: sharding.make_mesh("", jax.devices()[:1])  # noqa: E731  (in-process checks: compile fast)
STEPS = 10
COMMAND = [
    "--preset",
    "tiny",
    "--tasks",
    "langid",
    "--steps",
    str(STEPS),
    "--batch-size",
    "8",
    "--set",
    "train.log_every=1",
    "--set",
    "train.checkpoint_every=2",
    "--set",
    "train.eval_examples=4",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")
    return {
        **os.environ,
        "JAX_NUM_CPU_DEVICES": "2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
        # Every run compiles the same programs: the second one reads them from disk.
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


class Train:
    """One ``train.py`` process, its stderr in a file (nobody reads a pipe while the test polls)."""

    def __init__(self, out: pathlib.Path, env: dict, *extra: str):
        out.parent.mkdir(parents=True, exist_ok=True)
        self.log = out.parent / f"{out.name}.{time.monotonic_ns()}.stderr"
        self.stdout = self.log.with_suffix(".stdout")
        with self.log.open("w") as err, self.stdout.open("w") as std:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), *COMMAND, *extra, "--out", str(out)],
                stdout=std,
                stderr=err,
                env=env,
            )

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.proc.poll() is None, f"the run ended first:\n{self.stderr()[-3000:]}"

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def logged_steps(out: pathlib.Path) -> list[int]:
    """``training_steps`` while the run may be writing a line: [] rather than a half line's error."""
    try:
        return training_steps(out)
    except (OSError, ValueError):
        return []


def training_steps(out: pathlib.Path) -> list[int]:
    """The steps of the training lines in ``metrics.jsonl`` (strict JSON: NaN would fail here)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=_refuse) for line in lines]
    return [r["step"] for r in records if "split" not in r]


def _refuse(name):
    raise AssertionError(f"metrics.jsonl holds a bare {name}")


def error_lines(text: str) -> list[str]:
    """The lines train.py itself wrote about how it ended (its messages start with ``train.py:``)."""
    return [line for line in text.splitlines() if line.startswith("train.py:") or "Traceback" in line]


def newest(out: pathlib.Path) -> int | None:
    steps = complete_steps(out / "checkpoints")
    return steps[-1] if steps else None


# ---------------------------------------------------------------------------
# One run, stopped again and again: SIGTERM while compiling, mid-step (saves in flight),
# a second run on its folder, SIGKILL at a random moment, SIGTERM during the final
# evaluation; each time the same command resumes, and nothing is lost.


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("faults") / "run"
    results = {}

    first = Train(out, env)  # SIGTERM during the first compilation
    first.wait_for(lambda: "compiling the train step" in first.stderr())
    first.proc.send_signal(signal.SIGTERM)
    results["compile"] = (first.finish(), first.stderr(), newest(out))

    second = Train(out, env)  # SIGTERM mid-run: a checkpoint every 2 steps, so saves are in flight
    second.wait_for(lambda: max(logged_steps(out), default=0) >= 3)
    second.proc.send_signal(signal.SIGSTOP)  # holding the folder's lock: a second train.py must stop
    try:
        other = Train(out, env)
        results["second_run"] = (other.finish(), other.stderr(), second.proc.pid)
    finally:
        second.proc.send_signal(signal.SIGCONT)
    second.proc.send_signal(signal.SIGTERM)
    results["mid_run"] = (second.finish(), second.stderr(), newest(out), max(training_steps(out)))

    # SIGKILL (a crash: no message) at a seeded moment, up to half a second after the next run trains again:
    # mid-step, mid-save or in the final evaluation, which alone takes longer than that to compile.
    third = Train(out, env)
    started = newest(out)
    third.wait_for(lambda: max(logged_steps(out), default=0) > started)
    time.sleep(random.Random(26).uniform(0, 0.5))
    third.proc.send_signal(signal.SIGKILL)
    results["kill"] = (third.finish(), started, newest(out))

    fourth = Train(out, env)  # SIGTERM during the final evaluation
    fourth.wait_for(lambda: "resumed from step" in fourth.stderr() and newest(out) == STEPS)
    fourth.proc.send_signal(signal.SIGTERM)
    results["eval"] = (fourth.finish(), fourth.stderr())

    last = Train(out, env)
    results["last"] = (last.finish(), last.stderr(), last.stdout.read_text())
    return out, results


def test_sigterm_while_compiling_saves_the_first_step_and_says_so(stopped_run):
    out, results = stopped_run
    code, stderr, saved = results["compile"]
    assert code == 143, stderr[-3000:]
    assert saved == 1
    assert error_lines(stderr) == [
        f"train.py: stopped by SIGTERM after step 1; checkpoint 1 is saved in {out}; run the same command to resume"
    ]


def test_sigterm_mid_run_saves_the_step_it_stopped_at(stopped_run):
    _, results = stopped_run
    code, stderr, saved, logged = results["mid_run"]
    assert code == 143, stderr[-3000:]
    assert "resumed from step 1" in stderr
    assert saved == logged  # the step it stopped after is saved, and nothing after it was logged
    (line,) = error_lines(stderr)
    assert f"stopped by SIGTERM after step {saved}; checkpoint {saved} is saved" in line


def test_a_second_run_on_the_folder_stops_naming_the_first(stopped_run):
    _, results = stopped_run
    code, stderr, pid = results["second_run"]
    assert code == 2, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert "is being trained by" in line and f"pid {pid}" in line


def test_sigterm_during_the_final_evaluation_leaves_it_to_the_same_command(stopped_run):
    out, results = stopped_run
    code, stderr = results["eval"]
    if code == 143:  # the signal came before the test split's evaluation
        assert error_lines(stderr) == [
            f"train.py: stopped by SIGTERM after step {STEPS}; checkpoint {STEPS} is saved in {out}; "
            "run the same command to resume"
        ]
    else:  # it came too late to stop anything: the run finished
        assert code == 0, stderr[-3000:]


def test_after_every_fault_the_same_command_finishes_with_nothing_lost(stopped_run):
    out, results = stopped_run
    code, started, saved = results["kill"]
    assert code == -signal.SIGKILL  # killed, not finished
    assert started is not None and saved >= started  # a kill mid-save leaves the previous checkpoint
    code, stderr, stdout = results["last"]
    assert code == 0, stderr[-3000:]
    assert training_steps(out) == list(range(1, STEPS + 1))  # every step logged once, none lost or repeated
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = sorted((r["split"], r["step"]) for r in records if "split" in r)
    assert evals == [("test", STEPS), ("validation", STEPS)]
    (test,) = [r for r in records if r.get("split") == "test"]
    printed = json.loads(stdout.splitlines()[-1])["test"]["langid"]  # the result printed is the one logged
    assert printed == pytest.approx({k: v for k, v in test.items() if k not in ("step", "task", "split")}, abs=1e-5)


def flip_a_bit(path: pathlib.Path) -> None:
    """Flips one bit in the middle of a file: a bad sector, a copy gone wrong; the file still reads."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def largest_data_file(item: pathlib.Path) -> pathlib.Path:
    return max(item.rglob("d/*"), key=lambda p: p.stat().st_size)


def test_a_damaged_newest_checkpoint_is_set_aside_and_redone(stopped_run, env):
    out, _ = stopped_run
    steps = complete_steps(out / "checkpoints")
    # One flipped bit in the weights (issue 26: it restored silently, then "diverged"); a truncated file is
    # covered in process by test_restore_walks_back_past_each_kind_of_damage.
    flip_a_bit(largest_data_file(out / "checkpoints" / str(steps[-1]) / "model"))
    run = Train(out, env)
    code = run.finish()
    stderr = run.stderr()
    assert code == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if "cannot be restored" in line]
    assert len(warnings) == 1 and f"checkpoints/{steps[-1]}" in warnings[0], stderr[-3000:]
    assert f"falling back to step {steps[-2]}" in warnings[0]
    assert f"resumed from step {steps[-2]}" in stderr
    assert complete_steps(out / "checkpoints")[-1] == steps[-1]  # saved afresh
    assert (out / "checkpoints" / f"damaged-{steps[-1]}").is_dir()
    assert training_steps(out) == list(range(1, STEPS + 1))


def test_serving_falls_back_past_a_damaged_newest_checkpoint(stopped_run, tmp_path):
    from mtl.serving.server import Server

    out, _ = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("damaged-*"))
    steps = complete_steps(copy / "checkpoints")
    (copy / "checkpoints" / str(steps[-1]) / "model" / "manifest.ocdbt").unlink()
    logged = []
    server = Server.load(str(copy), overrides=["serve.max_batch=4"], log=logged.append)
    warnings = [line for line in logged if "cannot be restored" in line]
    assert len(warnings) == 1 and "model/manifest.ocdbt is missing" in warnings[0]
    assert any(f"restored step {steps[-2]}" in line for line in logged)
    (answer,) = server.respond([{"id": 1, "task": "langid", "input": "Deutschland"}])
    assert "label" in answer, answer


# ---------------------------------------------------------------------------
# Divergence


def test_a_diverging_run_stops_with_one_line_and_no_non_finite_checkpoint(tmp_path, env):
    out = tmp_path / "diverged"
    run = Train(out, env, "--set", "train.learning_rate=1e30")
    code = run.finish()
    stderr = run.stderr()
    assert code == 3, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert line.startswith("train.py: error: the run diverged") and "non-finite at step" in line
    assert "warning" not in stderr.lower() and " nan" not in stderr.lower()
    training_steps(out)  # strict JSON: a non-finite metric is null
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["loss"] is None or r.get("skipped_steps") for r in records)
    assert not (out / "best").exists() or not list((out / "best").iterdir())
    cfg = C.from_dict(json.loads((out / "config.json").read_text()))
    _, target, _ = training.abstract_train_state(cfg.model, cfg.train, sharding.make_mesh("data=8"))
    checkpoints = Checkpoints(out / "checkpoints", read_only=True)
    assert checkpoints.all_steps(), "the steps before the divergence were saved"
    for step in checkpoints.all_steps():  # every checkpoint written is finite
        checkpoints.restore(step, target["model"], target["optimizer"])
        assert bool(training.all_finite(target)), step
    checkpoints.close()


def test_the_train_step_skips_a_non_finite_update_on_the_device():
    mesh = ONE_DEVICE()
    state = trained_state(mesh)
    graphdef, _, shardings = training.abstract_train_state(MODEL, TRAIN, mesh)
    from tests.test_sharding import fixed_batches

    batch = fixed_batches()["generate"]
    with jax.set_mesh(mesh):
        step = training.compile_train_step(graphdef, shardings, mesh, batch, task="spell", kind="generate")
        before = jax.tree.map(np.asarray, state)
        state, metrics = step(state, training.put_batch(batch, mesh))
        assert float(metrics["skipped"]) == 0.0
        state["model"] = jax.tree.map(lambda x: x * np.inf, state["model"])  # weights gone infinite
        kept = jax.tree.map(np.asarray, state)
        state, metrics = step(state, training.put_batch(batch, mesh))
    assert float(metrics["skipped"]) == 1.0
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(jax.tree.map(np.asarray, state))):
        np.testing.assert_array_equal(a, b)  # nothing moved: not the weights, not the moments, not the count
    assert not bool(training.all_finite(state)) and bool(training.all_finite(before))


# ---------------------------------------------------------------------------
# Damaged checkpoints of each kind, the lock, strict metrics (in process: fast)


@pytest.fixture(scope="module")
def saved_steps(tmp_path_factory):
    """Checkpoints 1, 2, 3 of a tiny model, saved once; each test damages a copy."""
    path = tmp_path_factory.mktemp("ckpts")
    state = trained_state(ONE_DEVICE())
    checkpoints = Checkpoints(path)
    for step in (1, 2, 3):
        checkpoints.save(step, state["model"], state["optimizer"], {"step": step})
        checkpoints.wait()
    checkpoints.close()
    return path


def _largest(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


DAMAGE = {
    "truncated data file": lambda d: _largest(d / "model").write_bytes(_largest(d / "model").read_bytes()[:64]),
    "missing manifest.ocdbt": lambda d: (d / "model" / "manifest.ocdbt").unlink(),
    "missing _METADATA": lambda d: (d / "optimizer" / "_METADATA").unlink(),
    "missing meta": lambda d: (d / "meta" / "metadata").unlink(),
    "missing checkpoint metadata": lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
    "flipped bit in a data file": lambda d: flip_a_bit(largest_data_file(d / "model")),
    "edited metadata": lambda d: edit_step(d / "meta" / "metadata"),
}


def edit_step(path: pathlib.Path) -> None:
    """A metadata file that still parses, with another step in it."""
    meta = json.loads(path.read_text())
    meta["step"] += 27
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_restore_walks_back_past_each_kind_of_damage(saved_steps, tmp_path, damage):
    path = tmp_path / "checkpoints"
    shutil.copytree(saved_steps, path)
    DAMAGE[damage](path / "3")
    mesh = ONE_DEVICE()
    _, target, _ = training.abstract_train_state(MODEL, TRAIN, mesh)
    checkpoints = Checkpoints(path, read_only=True)
    warnings = []

    def restore(step):
        return checkpoints.restore(step, target["model"], target["optimizer"])[2]

    step, meta, skipped = restore_newest(path, [1, 2, 3], restore, warnings.append, optimizer=True)
    checkpoints.close()
    assert (step, meta["step"], skipped) == (2, 2, [3])
    (line,) = warnings
    assert f"{path / '3'} cannot be restored" in line and "falling back to step 2" in line and "\n" not in line
    if damage.startswith("missing"):
        assert missing_files(path / "3", optimizer=True) in line
    if damage == "edited metadata":
        assert "(meta does not match the checksum saved with it)" in line


def test_a_corrupt_checkpoint_is_refused_by_serve_and_export_in_one_line(stopped_run, tmp_path, capsys):
    from mtl import export
    from mtl.cli import serve

    out, _ = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("damaged-*"))
    newest_dir = copy / "checkpoints" / str(complete_steps(copy / "checkpoints")[-1])
    flip_a_bit(largest_data_file(newest_dir / "model"))
    capsys.readouterr()

    assert serve.main(["--ckpt", str(newest_dir), "--requests", os.devnull, "--out", str(tmp_path / "r")]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert line.startswith(f"serve.py: error: checkpoint {str(newest_dir)!r} cannot be restored (")
    assert not (tmp_path / "r").exists()

    assert export.main(["--ckpt", str(copy), "--out", str(tmp_path / "hf"), "--task", "langid"]) == 2  # no fallback
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert line.startswith(f"mtl.export: error: checkpoint {str(newest_dir)!r} cannot be restored (")
    assert not (tmp_path / "hf").exists()


def test_restore_refuses_when_no_checkpoint_restores_and_passes_usage_errors_on(tmp_path):
    from mtl.checkpoint import REQUIRED_FILES

    for step in (1, 2):  # the files are all there; the restore itself fails
        for item, names in REQUIRED_FILES.items():
            for name in names:
                (tmp_path / str(step) / item).mkdir(parents=True, exist_ok=True)
                (tmp_path / str(step) / item / name).write_text("")

    def broken(step):
        raise ValueError(f"shape mismatch at {step}")

    with pytest.raises(ValueError, match=r"no checkpoint .* restores \(step 2: .*; step 1: .*\)"):
        restore_newest(tmp_path, [1, 2], broken, lambda _: None)

    def misfit(step):
        raise UsageError("the mesh does not fit")

    with pytest.raises(UsageError):
        restore_newest(tmp_path, [1, 2], misfit, lambda _: None)


def test_the_lock_names_the_holder_and_goes_with_it(tmp_path):
    first = RunFolder(tmp_path / "run")
    first.lock()
    with pytest.raises(UsageError, match=rf"is being trained by train.py pid {os.getpid()} on "):
        RunFolder(tmp_path / "run").lock()
    first.close()
    RunFolder(tmp_path / "run").lock()  # released
    RunFolder(tmp_path / "run").check_resumable(C.tiny())  # the lock file alone is no run in the way


def test_metrics_are_strict_json(tmp_path):
    folder = RunFolder(tmp_path)
    with pytest.raises(ValueError):
        folder.log({"step": 1, "task": "t", "loss": float("nan")})
    folder.log({"step": 1, "task": "t", "loss": None})
    folder.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "task": "t", "loss": None}


def test_a_checkpoint_of_another_shape_is_one_line_and_changes_nothing(stopped_run, tmp_path, capsys):
    from mtl.cli.train import main

    out, _ = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    saved = json.loads((copy / "config.json").read_text())
    saved["model"]["d_model"] = 32  # the folder claims another width than its checkpoints hold
    (copy / "config.json").write_text(json.dumps(saved))
    before = sorted(p.name for p in (copy / "checkpoints").iterdir())
    code = main([*COMMAND, "--set", "model.d_model=32", "--out", str(copy)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py:")]
    assert code == 2
    (line,) = errors
    assert f"--out {str(copy)!r} cannot be resumed: no checkpoint in" in line
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before  # nothing set aside
    assert json.loads((copy / "config.json").read_text()) == saved


def test_the_best_checkpoint_leaves_out_tasks_without_validation_scores():
    from mtl.evaluator import selection_score

    kinds = {"a": "classify", "b": "classify"}
    assert selection_score("mean", kinds, {"a": {"accuracy": 0.5}}) == 0.5
    assert np.isnan(selection_score("mean", kinds, {}))
    assert np.isnan(selection_score("b/accuracy", kinds, {"a": {"accuracy": 0.5}}))


def test_resuming_with_fewer_steps_than_done_is_one_line_and_rewrites_nothing(stopped_run, tmp_path, capsys):
    from mtl.cli.train import main

    out, _ = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    command = [a if a != str(STEPS) else str(STEPS - 4) for a in COMMAND]  # --steps 6 of a run at step 10
    capsys.readouterr()
    assert main([*command, "--out", str(copy)]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("train.py:")]
    assert f"already at step {STEPS}, past --steps {STEPS - 4}" in line
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before  # config, metrics, checkpoints
