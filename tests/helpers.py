"""Small builders shared by the tests."""

import asyncio
import contextlib
import dataclasses
import threading

from mtl.config import HeadConfig, ModelConfig, tiny

HEADS = (HeadConfig("spell", "generate"), HeadConfig("lang", "classify", 5), HeadConfig("echo", "generate"))
ALL_KINDS = HEADS + (HeadConfig("score", "regress", 0, 2.0, 3.0), HeadConfig("pos", "tag", 4))


def tiny_model_config(**changes) -> ModelConfig:
    return dataclasses.replace(tiny().model, **{"heads": HEADS, **changes})


def randomise_adapters(model, seed: int = 1, std: float = 0.05):
    """Draws every adapter's B (zero at initialisation) at random, as a trained adapter would be: returns ``model``."""
    import jax
    from flax import nnx

    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if str(path[-1]).startswith("lora_b_"):
            variable[...] = std * jax.random.normal(next(keys), variable.shape)
    return model


def write_run(folder, config, model, step: int = 1):
    """A run folder as training leaves it (``config.json``, one checkpoint of ``model``), without training.

    Args:
      config: the run's ``mtl.config.Config`` (its model config is ``model.cfg``).
    """
    import json
    import pathlib

    import jax.numpy as jnp
    from flax import nnx

    from mtl import config as C
    from mtl.checkpoint import Checkpoints

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(C.dumps(config))
    checkpoints = Checkpoints(folder / "checkpoints")
    optimizer = nnx.State({"step": nnx.Variable(jnp.zeros((), jnp.int32))})
    tasks = [
        {"name": h.task, "kind": h.kind, "labels": [f"l{i}" for i in range(h.num_classes)], "max_new_tokens": 8}
        for h in config.model.heads
    ]
    meta = {"config": json.loads(C.dumps(config)), "step": step, "tasks": tasks}
    checkpoints.save(step, nnx.state(model), optimizer, meta)
    checkpoints.close()
    return folder


def scheduler_over(model, mesh, *, max_queue=1024, batching="continuous", scheduler="fair", **engine_args):
    """A scheduler over an engine for ``model`` on ``mesh`` (``engine_args``: :class:`Engine`'s), its own tasks."""
    from mtl.serving.engine import Engine
    from mtl.serving.scheduler import Scheduler

    engine = Engine(model, mesh, **engine_args)
    return Scheduler(engine, max_queue=max_queue, batching=batching, scheduler=scheduler)


@contextlib.contextmanager
def served_over_http(server, settings=None):
    """Serves ``server`` (an ``mtl.serving.server.Server``) on a free localhost port during the block; sets
    ``server.port``. ``settings``: an ``mtl.serving.http_app.HttpSettings`` (default: its defaults)."""
    from mtl.serving import http_app

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, server.port = asyncio.run_coroutine_threadsafe(
        http_app.start_http(server, "127.0.0.1", 0, settings or http_app.HttpSettings()), loop
    ).result(60)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
