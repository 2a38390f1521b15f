"""The train step's memory estimate against XLA's compiled figure, and the run that cannot fit stopping first."""

import dataclasses

import jax
import numpy as np
import pytest

from mtl import config as C
from mtl import memory, trainer, training
from mtl.config import UsageError
from sharding import make_mesh


@pytest.mark.parametrize(
    "preset, rows, width, vocab",
    [("small", 64, 96, 384), ("tiny", 16, 128, 151_936)],  # activations first; a large vocabulary's head and loss
)
def test_the_estimate_is_close_above_what_xla_compiles(preset, rows, width, vocab):
    cfg = C.preset(preset)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab, heads=(C.HeadConfig("lm", "generate"),))
    )
    mesh = make_mesh("data=1", jax.devices()[:1])
    batch = {
        "tokens": np.ones((rows, width), np.int32),
        "targets": np.ones((rows, width), np.int32),
        "loss_mask": np.ones((rows, width), np.float32),
        "task_id": np.zeros(rows, np.int32),
    }
    graphdef, state, shardings = training.create_train_state(cfg.model, cfg.train, mesh)
    with jax.set_mesh(mesh):
        step = training.compile_train_step(graphdef, shardings, mesh, batch, task="lm", kind="generate")
        compiled = step.lower(state, training.put_batch(batch, mesh)).compile().memory_analysis()
    xla = (
        compiled.argument_size_in_bytes
        + compiled.temp_size_in_bytes
        + compiled.output_size_in_bytes
        - compiled.alias_size_in_bytes
    )
    estimated = memory.estimate(cfg, rows, width, mesh).total
    assert xla <= estimated <= 1.5 * xla, (estimated, xla)  # measured 1.17x for both


def test_a_batch_that_cannot_fit_stops_with_one_line_naming_the_largest_that_does(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available", lambda mesh: (2 * memory.GIB, "a test's budget"))
    cfg = trainer.configure("small", tasks="langid", steps=1, batch_size=1_000_000)
    with pytest.raises(UsageError) as e:
        trainer.prepare(cfg, log=lambda _: None)
    message = str(e.value)
    assert "train.batch_size=1000000" in message and "a test's budget" in message and "\n" not in message
    fits = int(message.split("the largest that fits is ")[1].split()[0])
    mesh = make_mesh("")
    width = 128  # the small preset packs rows of max(128, max_len=96)
    plan = trainer.prepare(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=fits)))
    step = mesh.shape["data"] * mesh.shape["fsdp"]
    assert memory.estimate(plan.config, fits, width, mesh).total <= 2 * memory.GIB
    assert memory.estimate(plan.config, fits + step, width, mesh).total > 2 * memory.GIB


def test_train_py_stops_before_writing_anything(tmp_path, monkeypatch, capsys):
    from mtl.cli.train import main

    monkeypatch.setattr(memory, "available", lambda mesh: (memory.GIB // 4, "a test's budget"))
    out = tmp_path / "run"
    assert main(["--preset", "small", "--tasks", "langid", "--batch-size", "100000", "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("train.py: error: train.batch_size=100000") and "the largest that fits is" in line
    assert not out.exists()  # nothing written
