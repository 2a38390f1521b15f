"""Multi-process training: 2 processes x 4 CPU devices (gloo) against 1 process x 8 devices.

The slow test starts ``train.py`` as two processes on localhost joined by
``jax.distributed``, kills both from outside (SIGKILL) as soon as their first
checkpoint is complete, starts them again and preempts them (SIGTERM to one
process only; both must save the same step and stop), starts them a third time,
and checks that the run's per-step losses match a single-process run on the same
8-device mesh, and that its checkpoints and final evaluation are there. The
fast tests check how ``train.py`` reads the cluster from flags and variables.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mtl import distributed
from mtl.checkpoint import find
from mtl.cli.train import build_parser, main
from mtl.distributed import Cluster
from sharding import make_mesh
from sharding.mesh import process_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "MTL_", "JAX_COORDINATOR"))}
ENV = {**BASE_ENV, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
STEPS = 6
TRAIN = [
    "--preset",
    "tiny",
    "--tasks",
    "g2p,langid",  # seed 0 draws both: g2p at steps 1-4, langid at 5-6
    "--mesh",
    "data=8",  # each process holds one half of the data axis
    "--steps",
    str(STEPS),
    "--batch-size",
    "8",
    "--set",
    "model.max_len=32",  # one batch width, so one compilation per task
    "--set",
    "train.log_every=1",
    "--set",
    "train.checkpoint_every=2",
    "--set",
    "train.eval_examples=4",
]
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(*args, devices: int, log: pathlib.Path, env=None) -> subprocess.Popen:
    """Starts train.py, its stdout and stderr to ``log``.out and ``log``.err (files: no pipe fills while we poll)."""
    with open(f"{log}.out", "w") as stdout, open(f"{log}.err", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *TRAIN, *args],
            stdout=stdout,
            stderr=stderr,
            env={**ENV, "JAX_NUM_CPU_DEVICES": str(devices), **(env or {})},
        )
    proc.log = log
    return proc


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """Waits for every process; if one fails or hangs, the others are killed rather than left waiting for it."""
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, read(f"{p.log}.out"), read(f"{p.log}.err")) for p in procs]


def read(path: str) -> str:
    return pathlib.Path(path).read_text()


def newest_checkpoint(folder) -> int | None:
    """The step of the newest complete checkpoint in run ``folder`` (the one a resumed run starts from)."""
    try:
        return find(folder)[1]
    except ValueError:
        return None


def kill_at_first_checkpoint(procs: list[subprocess.Popen], out) -> list[tuple[int, str, str]]:
    """SIGKILLs every process from outside as soon as run ``out`` has a complete checkpoint: a crash mid-run."""
    deadline = time.monotonic() + TIMEOUT
    while newest_checkpoint(out) is None and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    return finish(procs)


def sigterm_one_after(procs: list[subprocess.Popen], out, step: int) -> list[tuple[int, str, str]]:
    """Sends SIGTERM to the last process alone once the resumed run ``out`` logged ``step``: a preemption notice.

    The other process hears of it through JAX's preemption service, so both stop after the same step.
    """
    deadline = time.monotonic() + TIMEOUT
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        resumed = "resumed from step" in read(f"{procs[0].log}.err")  # the stale lines are dropped by then
        if resumed and max((r["step"] for r in records(out) if "split" not in r), default=0) >= step:
            break
        time.sleep(0.02)
    procs[-1].send_signal(signal.SIGTERM)
    return finish(procs)


def two_processes(out: pathlib.Path, env=None) -> list[subprocess.Popen]:
    cluster = ["--out", str(out), "--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
    logs = [out.with_name(f"{out.name}-{i}") for i in range(2)]
    return [start(*cluster, "--process-id", str(i), devices=4, log=logs[i], env=env) for i in range(2)]


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def losses(folder):
    return {(r["step"], r["task"]): r["loss"] for r in records(folder) if "split" not in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # The resumed pair loads the killed pair's programs instead of compiling them again.
    cache = {"JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    single, multi = root / "single", root / "multi"
    # The reference runs beside the killed pair, to use the cores while they wait on each other.
    reference = start("--out", str(single), "--num-processes", "1", devices=8, log=root / "single", env=cache)
    killed = kill_at_first_checkpoint(two_processes(multi, env=cache), multi)
    (code, _, err), *_ = finish([reference])
    assert code == 0, err[-3000:]
    # Both killed mid-run by the signal, neither finished nor failed on its own.
    assert [c for c, _, _ in killed] == [-signal.SIGKILL] * 2, [e[-3000:] for _, _, e in killed]
    killed_at = newest_checkpoint(multi)
    assert killed_at is not None and killed_at < STEPS, killed_at
    stopped = sigterm_one_after(two_processes(multi, env=cache), multi, killed_at + 1)
    # Both saved the same step and stopped as a process ended by SIGTERM does (128 + 15).
    assert [c for c, _, _ in stopped] == [143] * 2, [e[-3000:] for _, _, e in stopped]
    stopped_at = newest_checkpoint(multi)
    assert killed_at < stopped_at <= STEPS
    assert f"stopped by SIGTERM after step {stopped_at}" in stopped[0][2], stopped[0][2][-3000:]
    resumed = finish(two_processes(multi, env=cache))
    for code, _, err in resumed:
        assert code == 0, err[-3000:]
    return single, multi, resumed, stopped_at


@pytest.mark.slow
def test_two_processes_resume_and_match_one(runs):
    single, multi, resumed, stopped_at = runs
    (_, out0, err0), (_, out1, err1) = resumed
    # Killed, then stopped by SIGTERM, it resumes each time from the newest complete checkpoint.
    assert f"resumed from step {stopped_at}" in err0, err0[-3000:]
    a, b = losses(single), losses(multi)
    assert sorted(a) == sorted(b) and len(a) == STEPS
    assert len([r for r in records(multi) if "split" not in r]) == STEPS  # each step logged once
    assert {task for _, task in a} == {"g2p", "langid"}
    for key in a:
        # Measured: equal, or 1 apart in the 6th logged decimal (1.3e-7 relative): gloo sums the
        # cross-process all-reduces in another order than one process's collectives do.
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    evals = [r for r in records(multi) if r.get("split") == "test"]
    assert {r["task"] for r in evals} == {"g2p", "langid"}
    saved = sorted({2, 4, 6, stopped_at})[-3:]  # every 2 steps and where SIGTERM stopped it; the newest 3 kept
    assert sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == saved
    # Process 0 reports; process 1 only computes.
    report = [line for line in out0.splitlines() if line.startswith("{")]
    assert json.loads(report[-1])["test"].keys() == {"g2p", "langid"}
    assert not [line for line in out1.splitlines() if line.startswith("{")]
    assert "eval test" in err0 and "eval test" not in err1


def test_one_process_loads_every_row():
    # With one process every device is its own; tensor=8 leaves the batch whole on each device.
    for spec in ("data=2,fsdp=2,tensor=2", "tensor=8"):
        np.testing.assert_array_equal(process_rows(8, make_mesh(spec)), np.arange(8))


# Reading the cluster: flags, then MTL_ variables, then a launcher's environment.


def settings(argv, environ=None):
    args = build_parser().parse_args(argv)
    return distributed.settings(args.coordinator, args.num_processes, args.process_id, environ or {})


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}


def test_no_cluster_runs_alone():
    assert settings([]) is None
    assert settings([], {"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert settings(["--num-processes", "1"], SLURM) is None


def test_flags_win_over_variables():
    flags = ["--coordinator", "10.0.0.1:8476", "--num-processes", "4", "--process-id", "3"]
    assert settings(flags) == Cluster("10.0.0.1:8476", 4, 3)
    env = {"MTL_COORDINATOR": "h:1", "MTL_NUM_PROCESSES": "2", "MTL_PROCESS_ID": "1"}
    assert settings([], env) == Cluster("h:1", 2, 1)
    assert settings(["--process-id", "0"], env) == Cluster("h:1", 2, 0)
    assert settings(["--num-processes", "2", "--process-id", "0"], {"JAX_COORDINATOR_ADDRESS": "h:2"}) == (
        Cluster("h:2", 2, 0)
    )


def test_a_launcher_fills_in_what_is_not_given():
    assert settings([], SLURM) == Cluster(None, None, None)
    assert settings(["--coordinator", "node1:9000"], SLURM) == Cluster("node1:9000", None, None)
    assert settings([], {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}) == Cluster(None, None, None)


@pytest.mark.parametrize(
    "argv, environ, named",
    [
        (["--coordinator", "localhost"], {}, "--coordinator 'localhost'"),
        (["--coordinator", "localhost:port"], {}, "--coordinator 'localhost:port'"),
        (["--coordinator", ":8476"], {}, "--coordinator ':8476'"),
        (["--coordinator", "h:70000"], {}, "--coordinator 'h:70000'"),
        ([], {"MTL_COORDINATOR": "h"}, "MTL_COORDINATOR='h'"),
        (["--num-processes", "0"], {}, "--num-processes '0'"),
        (["--num-processes", "two"], {}, "--num-processes 'two'"),
        (["--process-id", "-1"], {}, "--process-id '-1'"),
        (["--num-processes", "2", "--process-id", "2"], {}, "--process-id '2' must be below --num-processes '2'"),
        ([], {"MTL_NUM_PROCESSES": "2", "MTL_PROCESS_ID": "5"}, "MTL_PROCESS_ID='5'"),
        (["--num-processes", "2", "--process-id", "0"], {}, "--coordinator"),
        (["--coordinator", "h:1"], {}, "--num-processes and --process-id"),
    ],
)
def test_bad_cluster_values_are_named(argv, environ, named):
    with pytest.raises(ValueError) as e:
        settings(argv, environ)
    assert named in str(e.value)


def test_bad_cluster_flags_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "MTL_", "JAX_COORDINATOR")):
            monkeypatch.delenv(name)
    out = tmp_path / "run"
    argv = ["--out", str(out), "--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: error: --process-id '2'"), err
    assert not out.exists()
