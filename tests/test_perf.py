"""Model FLOPs counted from the model's own weights, and the peak an MFU divides by."""

import jax
from flax import nnx

from mtl import perf
from mtl.model import MultiTaskModel
from sharding import make_mesh
from tests.helpers import tiny_model_config


def test_train_flops_follow_the_models_weight_matrices():
    # 6 FLOPs a weight of every layer's matrices (norm scales excluded), 6 for the tied logits, 4 for
    # the one-hot embedding, and the whole T x S attention square (scores and mixing, forward and backward).
    cfg = tiny_model_config()
    model = MultiTaskModel(cfg, rngs=nnx.Rngs(0))
    matrices = sum(x.size for x in jax.tree.leaves(nnx.state(model.blocks, nnx.Param)) if x.ndim >= 3)
    vd = cfg.vocab_size * cfg.d_model
    t = 48
    attention = 12 * cfg.n_layers * t * cfg.n_heads * cfg.head_dim
    assert perf.train_flops_per_token(cfg, t) == 6 * matrices + 10 * vd + attention
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
