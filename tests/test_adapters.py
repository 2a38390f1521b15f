"""Per-task LoRA adapters (mtl.adapters): selection per row, the zero start, merging, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import adapters
from mtl.config import Config, validate
from mtl.model import MultiTaskModel, count_params
from tests.helpers import randomise_adapters, tiny_model_config, write_run

_call = nnx.jit(lambda model, tokens, ids: model(tokens, ids))


def _with_random_adapters(cfg, seed=1) -> MultiTaskModel:
    return randomise_adapters(MultiTaskModel(cfg, rngs=nnx.Rngs(0)), seed)


def test_rank_zero_adds_no_parameter_and_zero_b_is_the_base_model():
    base = MultiTaskModel(tiny_model_config(), rngs=nnx.Rngs(0))
    adapted = MultiTaskModel(tiny_model_config(adapter_rank=4), rngs=nnx.Rngs(0))
    assert not any(adapters.is_adapter_path(p) for p, _ in nnx.to_flat_state(nnx.state(base)))
    n_adapter = count_params(nnx.state(adapted, nnx.Param)) - count_params(nnx.state(base, nnx.Param))
    cfg = tiny_model_config()
    d, f, nh, kh = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_task_layer = 4 * ((d + nh) + 2 * (d + kh) + (nh + d) + 2 * (d + f) + (f + d))
    assert n_adapter == cfg.n_layers * len(cfg.heads) * per_task_layer
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 3, 300)
    ids = jnp.array([0, 1, 2])
    # Same seed, same backbone; B = 0: exactly the base model.
    np.testing.assert_array_equal(np.asarray(_call(adapted, tokens, ids)), np.asarray(_call(base, tokens, ids)))


@pytest.mark.parametrize("targets", ["q,k,v,o,gate,up,down", "v,down"])
def test_each_row_computes_its_own_tasks_merged_model(targets):
    """A mixed batch equals, row by row, the backbone with that row's task adapter folded in (f32, 1e-5)."""
    cfg = tiny_model_config(adapter_rank=4, adapter_targets=targets, adapter_alpha=8.0)
    model = _with_random_adapters(cfg)
    tokens = jax.random.randint(jax.random.key(2), (4, 10), 3, 300)
    ids = jnp.array([2, 0, 1, 0])
    mixed = np.asarray(_call(model, tokens, ids))
    for row, j in enumerate(np.asarray(ids)):
        merged = nnx.clone(model)
        adapters.merge(merged.blocks, cfg, int(j))
        for path, variable in nnx.to_flat_state(nnx.state(merged, nnx.Param)):
            if str(path[-1]).startswith("lora_b_"):
                variable[...] = jnp.zeros_like(variable[...])
        alone = np.asarray(_call(merged, tokens, ids))[row]
        np.testing.assert_allclose(mixed[row], alone, rtol=1e-5, atol=1e-5)
    # The adapters matter: the model without them answers otherwise.
    base = MultiTaskModel(dataclasses.replace(cfg, adapter_rank=0), rngs=nnx.Rngs(0))
    assert np.abs(mixed - np.asarray(_call(base, tokens, ids))).max() > 1e-2


def test_gather_and_one_hot_agree():
    k = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(k[0], (5, 3, 16))
    a, b = jax.random.normal(k[1], (4, 16, 2)), jax.random.normal(k[2], (4, 2, 8))
    ids = jnp.array([3, 0, 0, 2, 1])
    reference = np.stack([np.asarray(x[i] @ a[t] @ b[t]) * 0.5 for i, t in enumerate(np.asarray(ids))])
    np.testing.assert_allclose(adapters.delta(x, a, b, ids, 0.5), reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adapters.delta_one_hot(x, a, b, ids, 0.5), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "model, train, message",
    [
        ({"adapter_rank": -1}, {}, "model.adapter_rank=-1 must be at least 0"),
        ({"adapter_rank": 4, "adapter_targets": "q,proj"}, {}, "model.adapter_targets names 'proj'"),
        ({"adapter_rank": 4, "adapter_targets": ""}, {}, "names no projection"),
        ({"adapter_rank": 4, "adapter_alpha": 0.0}, {}, "model.adapter_alpha=0.0 must be positive"),
        ({}, {"trainable": "heads"}, "train.trainable='heads' must be all or adapters"),
        ({}, {"trainable": "adapters"}, "needs adapters"),
    ],
)
def test_config_errors_are_one_line(model, train, message):
    cfg = Config()
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, **model), train=dataclasses.replace(cfg.train, **train)
    )
    with pytest.raises(ValueError, match=message) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_trainable_adapters_freezes_the_backbone_and_shards_like_one_device():
    """One step of train.trainable=adapters on a 2x2x2 mesh and on one device: only adapters, heads and task
    embeddings move, Adam keeps moments for those alone, and the two meshes agree (f32; 1e-5 as in test_training)."""
    from mtl import training
    from mtl.config import tiny
    from sharding import make_mesh

    model_cfg = tiny_model_config(adapter_rank=4)
    train_cfg = dataclasses.replace(tiny().train, trainable="adapters", warmup_steps=0, steps=4)
    tokens = np.random.default_rng(0).integers(4, 200, (8, 10)).astype(np.int32)
    ids = np.array([0, 2] * 4, np.int32)  # two tasks' adapters in one batch
    batch = {"tokens": tokens, "targets": tokens, "loss_mask": np.ones((8, 10), np.float32), "task_id": ids}
    results = []
    for mesh in (make_mesh("data=2,fsdp=2,tensor=2", jax.devices()), make_mesh("data=1", jax.devices()[:1])):
        with jax.set_mesh(mesh):
            graphdef, state, shardings = training.create_train_state(model_cfg, train_cfg, mesh)
            before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state["model"])}
            step = training.compile_train_step(graphdef, shardings, mesh, batch, task="spell", kind="generate")
            state, _ = step(state, training.put_batch(batch, mesh))
        results.append(({p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state["model"])}, state["optimizer"]))
    (after, optimizer), (one_device, _) = results
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert ("blocks", "mlp", "lora_b_down") in changed and ("task_embed",) in changed
    assert all(adapters.is_adapter_path(p) or p[0] in ("heads", "task_embed") for p in changed), changed
    trained = sum(v.size for p, v in before.items() if adapters.Trainable()(p, None))
    moments = sum(x.size for x in jax.tree.leaves(optimizer) if x.ndim > 0)
    assert moments == 2 * trained < count_params(before) / 2
    for path in after:
        np.testing.assert_allclose(after[path], one_device[path], rtol=1e-4, atol=1e-5)  # Adam amplifies f32 noise


def test_a_warm_start_carries_the_adapters_of_the_tasks_it_shares(tmp_path):
    from mtl import trainer
    from mtl.config import HeadConfig, tiny
    from sharding import make_mesh

    heads = (HeadConfig("g2p", "generate"), HeadConfig("langid", "classify", 8))
    source_cfg = tiny_model_config(heads=heads, adapter_rank=2, adapter_targets="q,down")
    source = randomise_adapters(MultiTaskModel(source_cfg, rngs=nnx.Rngs(0)))
    run = write_run(tmp_path / "first", dataclasses.replace(tiny(), model=source_cfg), source)
    trained = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(source))}
    # This run: the tasks in another order, langid with other labels (not shared), and a new task.
    heads = (HeadConfig("new", "generate"), HeadConfig("langid", "classify", 3), HeadConfig("g2p", "generate"))
    cfg = trainer.configure("tiny", tasks="g2p", init=str(run))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, heads=heads))
    assert (cfg.model.adapter_rank, cfg.model.adapter_targets) == (2, "q,down")
    with jax.set_mesh(mesh := make_mesh("data=1", jax.devices()[:1])):
        warm = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(trainer.initial_params(cfg, mesh))}
    for path in [("blocks", "mlp", "lora_b_down"), ("blocks", "attention", "lora_a_q")]:
        np.testing.assert_array_equal(warm[path][:, 2], trained[path][:, 0])  # g2p's rows
    np.testing.assert_array_equal(warm[("blocks", "mlp", "lora_b_down")][:, :2], 0)  # fresh: B zero
    np.testing.assert_array_equal(warm[("blocks", "mlp", "w_fd")], trained[("blocks", "mlp", "w_fd")])


def test_export_writes_peft_adapters_that_peft_loads_with_mtls_logits(tmp_path):
    """transformers + peft on the export give mtl's logits for the task (f32, 1e-4); so does --merge-adapter."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from mtl.config import tiny
    from mtl.export import main as export_main

    cfg = tiny_model_config(adapter_rank=4, adapter_targets="q,k,v,o,gate,up,down", adapter_alpha=8.0)
    model = randomise_adapters(MultiTaskModel(cfg, rngs=nnx.Rngs(0)), std=0.2)
    model.task_embed[...] = 0.1 * jax.random.normal(jax.random.key(5), model.task_embed.shape)
    run = write_run(tmp_path / "run", dataclasses.replace(tiny(), model=cfg), model)
    tokens = np.random.default_rng(0).integers(4, 300, (2, 11))
    tokens[:, 0] = 1  # BOS, where the task is folded in
    want = np.asarray(model.lm_logits(_call(model, jnp.asarray(tokens), jnp.full(2, 2))))  # task "echo"
    without = np.asarray(model.lm_logits(_call(model, jnp.asarray(tokens), jnp.full(2, 0))))
    assert np.abs(want - without).max() > 1e-2  # the adapter matters

    def logits(hf):
        their_tokens = tokens.copy()
        their_tokens[:, 0] = hf.config.mtl_task_tokens["<|mtl:echo|>"]  # the task's own token in BOS's place
        with torch.no_grad():
            return hf(input_ids=torch.tensor(their_tokens)).logits.numpy()

    assert export_main(["--ckpt", str(run), "--out", str(tmp_path / "hf"), "--task", "echo"]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "hf" / "adapter")).eval()
    np.testing.assert_allclose(logits(with_adapter), want, atol=1e-4, rtol=1e-4)

    # A classify task's adapter is not written for PEFT (its score head would be missing): one line, nothing written.
    assert export_main(["--ckpt", str(run), "--out", str(tmp_path / "lang"), "--task", "lang"]) == 2
    assert not (tmp_path / "lang").exists()

    assert export_main(["--ckpt", str(run), "--out", str(tmp_path / "merged"), "--merge-adapter", "echo"]) == 0
    assert not (tmp_path / "merged" / "adapter").exists()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    np.testing.assert_allclose(logits(merged), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3"])
def test_peft_export_of_each_pretrained_family(tmp_path, family):
    """The PEFT adapter of a Qwen2, Qwen3 or Gemma 3 backbone (biases, q/k norms, Gemma's norms and GELU) loads
    back in peft on the exported model and gives mtl's logits (f32, 1e-4)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from mtl import hf_import
    from mtl.config import tiny
    from mtl.export import main as export_main
    from tests import hf_fixtures

    source = hf_fixtures.tiny_model(family, str(tmp_path / "src"))
    adapters_on = dict(adapter_rank=4, adapter_targets="q,k,v,o,gate,up,down", adapter_alpha=8.0)
    cfg = dataclasses.replace(hf_import.read_config(source), heads=tiny_model_config().heads, **adapters_on)
    model = randomise_adapters(MultiTaskModel(cfg, rngs=nnx.Rngs(0)), std=0.2)
    tokens = np.random.default_rng(0).integers(4, 300, (2, 11))
    tokens[:, 0] = 1
    model.task_embed[...] = jnp.zeros_like(model.task_embed[...])  # as imported: no task token needed
    run = write_run(tmp_path / "run", dataclasses.replace(tiny(), model=cfg), model)
    want = np.asarray(model.lm_logits(_call(model, jnp.asarray(tokens), jnp.full(2, 2))))  # task "echo"
    assert export_main(["--ckpt", str(run), "--out", str(tmp_path / "hf"), "--task", "echo"]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(input_ids=torch.tensor(tokens)).logits.numpy()
        with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "hf" / "adapter")).eval()
        got = with_adapter(input_ids=torch.tensor(tokens)).logits.numpy()
    assert np.abs(plain - want).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
