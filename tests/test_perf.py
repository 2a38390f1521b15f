"""Model FLOPs counted from the model's own weights, and the peak an MFU divides by."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mtl import perf, training
from mtl.config import TrainConfig
from mtl.model import MultiTaskModel
from sharding import make_mesh
from tests.helpers import tiny_model_config


def test_train_flops_follow_the_models_weight_matrices():
    # 6 FLOPs a weight of every layer's matrices (norm scales excluded), 6 for the tied logits (the
    # embedding look-up is a gather), and the whole T x S attention square (scores and mixing, forward and backward).
    cfg = tiny_model_config()
    model = MultiTaskModel(cfg, rngs=nnx.Rngs(0))
    matrices = sum(x.size for x in jax.tree.leaves(nnx.state(model.blocks, nnx.Param)) if x.ndim >= 3)
    vd = cfg.vocab_size * cfg.d_model
    t = 48
    attention = 12 * cfg.n_layers * t * cfg.n_heads * cfg.head_dim
    assert perf.train_flops_per_token(cfg, t) == 6 * matrices + 6 * vd + attention
    assert perf.train_flops_per_token(cfg, t, kind="classify") == 6 * matrices + attention  # no LM head
    conservative = perf.train_flops_per_token(cfg, t, conservative=True)
    assert conservative == 6 * matrices + 6 * vd + attention // 2


def test_the_peak_counts_accelerators_but_not_virtual_cpu_devices():
    assert perf.peak_multiplier("gpu", devices=8, processes=1) == 8
    assert perf.peak_multiplier("tpu", devices=32, processes=4) == 32
    assert perf.peak_multiplier("cpu", devices=8, processes=1) == 1  # 8 virtual devices share one host's cores
    assert perf.peak_multiplier("cpu", devices=8, processes=2) == 2


def test_mesh_peak_on_virtual_cpu_devices_is_one_hosts(monkeypatch):
    monkeypatch.setattr(perf, "matmul_peak", lambda dtype, size: 100.0 + size)
    assert perf.mesh_peak(make_mesh("data=2,fsdp=2,tensor=2")) == 100.0 + 2048


@pytest.mark.parametrize("trainable", ["all", "adapters"])
def test_counted_flops_are_done_and_a_frozen_backbone_computes_no_weight_gradients(trainable):
    """The count is at most what XLA compiles for the step (so MFU counts no FLOP not done), within 25%; a frozen
    backbone's step is cheaper by about its weight gradients (2 FLOPs a frozen weight a token)."""
    layers = 2
    cfg = tiny_model_config(n_layers=layers, scan_unroll=layers, adapter_rank=4)  # unrolled: XLA counts each layer
    b, t = 4, 32
    batch = {
        "tokens": np.ones((b, t), np.int32),
        "targets": np.ones((b, t), np.int32),
        "loss_mask": np.ones((b, t), np.float32),
        "task_id": np.zeros(b, np.int32),
    }
    mesh = make_mesh("data=1", devices=jax.devices()[:1])

    def compiled_flops(trainable):
        train = dataclasses.replace(TrainConfig(), trainable=trainable)
        graphdef, state, shardings = training.create_train_state(cfg, train, mesh)
        with jax.set_mesh(mesh):
            step = training.compile_train_step(graphdef, shardings, mesh, batch, task="spell", kind="generate")
            return step.lower(state, training.put_batch(batch, mesh)).compile().cost_analysis()["flops"]

    done = compiled_flops(trainable)
    counted = perf.train_flops_per_token(cfg, t, trainable=trainable) * b * t
    assert counted <= done <= 1.25 * counted
    if trainable == "adapters":
        model = MultiTaskModel(cfg, rngs=nnx.Rngs(0))
        weights = nnx.to_flat_state(nnx.state(model.blocks, nnx.Param))
        frozen = sum(v.size for path, v in weights if v.ndim >= 3 and not str(path[-1]).startswith("lora_"))
        frozen += cfg.vocab_size * cfg.d_model  # the tied head
        assert compiled_flops("all") - done >= 0.9 * 2 * frozen * b * t
