"""Tests for mtl.hf_import: tiny Llama, Qwen2, Qwen3 and Gemma 3 models made by transformers, imported with parity."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import hf_import
from mtl.config import HeadConfig
from sharding import make_mesh
from tests import hf_fixtures

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HEADS = (HeadConfig("echo", "generate"), HeadConfig("lang", "classify", 3))
LENGTHS = (12, 7, 3)  # a right-padded batch: rows of 12, 7 and 3 real tokens


@pytest.fixture(scope="module", params=hf_fixtures.FAMILIES)
def folder(request, tmp_path_factory):
    return hf_fixtures.tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))


def padded_batch(vocab_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab_size, (len(LENGTHS), max(LENGTHS))).astype(np.int32)
    mask = np.arange(max(LENGTHS))[None, :] < np.array(LENGTHS)[:, None]
    return np.where(mask, tokens, 0), mask


def reference_logits(folder, tokens, mask):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)
        )
    return out.logits.numpy()


@functools.lru_cache(maxsize=8)  # the one-device logits serve two tests of each family: imported and compiled once
def mtl_logits(folder, mesh_spec="data=1", **overrides):
    cfg = dataclasses.replace(hf_import.read_config(folder), heads=HEADS, **overrides)
    size = int(np.prod([int(part.split("=")[1]) for part in mesh_spec.split(",")]))
    mesh = make_mesh(mesh_spec, jax.devices()[:size])
    graphdef, state = hf_import.load(folder, cfg, mesh)
    model = nnx.merge(graphdef, state)
    tokens, _ = padded_batch(cfg.vocab_size)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda m, t: m.lm_logits(m(t, jnp.zeros(len(t), jnp.int32))))(model, jnp.asarray(tokens))
    return np.asarray(logits), state


def test_logits_match_transformers_on_a_padded_batch(folder):
    with open(f"{folder}/config.json") as f:
        vocab = json.load(f)["vocab_size"]
    tokens, mask = padded_batch(vocab)
    expected = reference_logits(folder, tokens, mask)
    got, _ = mtl_logits(folder)
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4, rtol=1e-4)


def test_same_logits_on_a_2x2x2_mesh(folder):
    one, _ = mtl_logits(folder)
    eight, state = mtl_logits(folder, "data=2,fsdp=2,tensor=2")
    w = state["blocks"]["attention"]["w_dnh"][...]
    assert len(w.sharding.device_set) == 8 and not w.sharding.is_fully_replicated  # read shard by shard
    np.testing.assert_allclose(eight, one, atol=2e-5, rtol=2e-5)


def test_decode_steps_match_the_whole_sequence(folder):
    """Prefill and one-token decode steps over the cache (sliding windows included) give the sequence's logits."""
    from mtl import decode

    cfg = dataclasses.replace(hf_import.read_config(folder), heads=HEADS)
    graphdef, state = hf_import.load(folder, cfg, make_mesh("data=1", jax.devices()[:1]))
    model = nnx.merge(graphdef, state)
    tokens, _ = padded_batch(cfg.vocab_size, seed=1)
    task_ids = jnp.zeros(len(tokens), jnp.int32)
    whole = np.asarray(model.lm_logits(model(jnp.asarray(tokens), task_ids)))
    weights = decode.decode_weights(model)
    prompt = 5
    prefill = jax.jit(decode.prefill, static_argnums=5)
    _, cache, logits = prefill(model, weights, jnp.asarray(tokens[:, :prompt]), jnp.full(3, prompt), task_ids, 32)
    np.testing.assert_allclose(logits, whole[:, prompt - 1], atol=1e-4, rtol=1e-4)
    step = jax.jit(lambda m, w, t, p, c: decode.forward(m, w, t, task_ids, p, c))
    for pos in range(prompt, tokens.shape[1]):
        positions = jnp.full((len(tokens), 1), pos, jnp.int32)
        hidden, cache = step(model, weights, jnp.asarray(tokens[:, pos : pos + 1]), positions, cache)
        np.testing.assert_allclose(model.lm_logits(hidden, weights.w_dv)[:, 0], whole[:, pos], atol=1e-4, rtol=1e-4)


def test_unsupported_sources_name_what_is_wrong(tmp_path):
    def config(**fields):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4}
        base.update(vocab_size=320, num_hidden_layers=2, intermediate_size=96, hidden_act="silu")
        (folder / "config.json").write_text(json.dumps({**base, **fields}))
        return folder

    with pytest.raises(ValueError, match="no config.json"):
        hf_import.read_config(tmp_path / "missing")
    with pytest.raises(ValueError, match="architecture GPT2LMHeadModel cannot be imported"):
        hf_import.read_config(config(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="attention_bias=True is not supported"):
        hf_import.read_config(config(attention_bias=True))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        hf_import.read_config(config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        hf_import.read_config(config(hidden_act="gelu"))
    assert hf_import.read_config(config()).n_kv_heads == 4  # absent fields take transformers' defaults
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        hf_import.load(config(), hf_import.read_config(config()), make_mesh("data=1", jax.devices()[:1]))


@pytest.mark.parametrize("window", [None, 1, 4])
def test_windowed_attention_matches_dot_product_attention(window):
    from mtl import layers

    keys = jax.random.split(jax.random.key(0), 4)
    query = jax.random.normal(keys[0], (2, 10, 4, 8))
    key, value = (jax.random.normal(k, (2, 10, 2, 8)) for k in keys[1:3])
    cotangent = jax.random.normal(keys[3], query.shape)
    local = None if window is None else (window - 1, 0)

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=0.3, is_causal=True, local_window_size=local)

    def ours(q, k, v):  # the window traced, as a scan over mixed layers passes it
        return layers.causal_attention(q, k, v, None if window is None else jnp.int32(window), 0.3)

    for f in (jax.jit(ours),):
        np.testing.assert_allclose(f(query, key, value), reference(query, key, value), atol=1e-5)
        got = jax.grad(lambda *a: jnp.sum(f(*a) * cotangent), (0, 1, 2))(query, key, value)
        want = jax.grad(lambda *a: jnp.sum(reference(*a) * cotangent), (0, 1, 2))(query, key, value)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)
    cache = layers.KVCache.of_sequence(key, value).padded(16)
    positions = jnp.array([9, 5])
    rows = jnp.take_along_axis(query, positions[:, None, None, None], axis=1)  # each row's query at its position
    want = reference(query, key, value)[jnp.arange(2), positions][:, None]
    np.testing.assert_allclose(layers.cached_attention(rows, cache, positions, window, 0.3), want, atol=1e-5)


def test_export_round_trip_with_the_task_folded_in(folder, tmp_path):
    """mtl.export's tensors and config load in transformers and give mtl's logits for a task: the task's own
    token first (a row appended to the table) in place of BOS, which stays the plain BOS everywhere else."""
    from safetensors.numpy import save_file

    from mtl import export

    cfg = dataclasses.replace(hf_import.read_config(folder), heads=HEADS)
    graphdef, state = hf_import.load(folder, cfg, make_mesh("data=1", jax.devices()[:1]))
    model = nnx.merge(graphdef, state)
    model.task_embed[...] = 0.1 * jax.random.normal(jax.random.key(0), model.task_embed.shape)  # a trained task
    v = cfg.vocab_size
    save_file(export._tensors(model, cfg, "echo", {1: v}), str(tmp_path / "model.safetensors"))
    hf = export.hf_config(cfg, {"bos": 1, "eos": 2, "pad": 0})
    (tmp_path / "config.json").write_text(json.dumps({**hf, "vocab_size": v + 1}))
    assert hf["max_position_embeddings"] == 128 and hf["tie_word_embeddings"] == cfg.tie_embeddings  # the source's
    tokens, _ = padded_batch(cfg.vocab_size)
    tokens[:, 0], tokens[:, 3] = 1, 1  # BOS first, and again later
    want = np.asarray(model.lm_logits(model(jnp.asarray(tokens), jnp.zeros(len(tokens), jnp.int32))))
    tokens[:, 0] = v  # the task's token where mtl has BOS
    got = reference_logits(str(tmp_path), tokens, np.ones_like(tokens))
    np.testing.assert_allclose(got[..., :v], want, atol=1e-4, rtol=1e-4)


def test_a_151936_token_vocabulary_decodes_and_scores_as_transformers(tmp_path):
    """Qwen's real vocabulary (V = 151,936) at a tiny width, the vocabulary split over tensor=2: the training
    loss (vocabulary-parallel cross-entropy, gather look-up) and a prefill plus decode step equal transformers'."""
    from mtl import decode
    from mtl.training import generate_loss

    vocab = 151_936
    folder = hf_fixtures.tiny_model("qwen2", str(tmp_path / "qwen2"), vocab_size=vocab)
    cfg = dataclasses.replace(hf_import.read_config(folder), heads=HEADS)
    assert cfg.vocab_size == vocab
    mesh = make_mesh("data=1,tensor=2", jax.devices()[:2])
    graphdef, state = hf_import.load(folder, cfg, mesh)
    assert not state["embed_vd"][...].sharding.is_fully_replicated  # the table is split over the vocabulary
    model = nnx.merge(graphdef, state)
    tokens, mask = padded_batch(vocab, seed=2)
    assert tokens.max() > 100_000  # ids far past a small vocabulary's
    expected = reference_logits(folder, tokens, mask)  # [B, T, V]

    targets, loss_mask = np.roll(tokens, -1, axis=1), np.roll(mask, -1, axis=1) & mask
    logp = torch.log_softmax(torch.tensor(expected), -1).numpy()
    expected_loss = -np.take_along_axis(logp, targets[..., None], -1)[..., 0][loss_mask].mean()
    batch = {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(targets),
        "loss_mask": jnp.asarray(loss_mask, jnp.float32),
        "task_id": jnp.zeros(len(tokens), jnp.int32),
    }
    with jax.set_mesh(mesh):
        loss, _ = jax.jit(lambda m, b: generate_loss(m, "echo", b, loss_mask.sum()))(model, batch)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)

    task_ids = jnp.zeros(len(tokens), jnp.int32)
    prompt = 3  # the shortest row's length: every row's prefill is real tokens
    with jax.set_mesh(mesh):
        weights = jax.jit(decode.decode_weights)(model)
        prefill = jax.jit(decode.prefill, static_argnums=5)
        _, cache, logits = prefill(model, weights, jnp.asarray(tokens[:, :prompt]), jnp.full(3, prompt), task_ids, 16)
        positions = jnp.full((len(tokens), 1), prompt, jnp.int32)
        step = jax.jit(lambda m, w, t, p, c: decode.forward(m, w, t, task_ids, p, c))
        hidden, _ = step(model, weights, jnp.asarray(tokens[:, prompt : prompt + 1]), positions, cache)
        stepped = model.lm_logits(hidden, weights.w_dv)[:, 0]
    rows = np.array(LENGTHS) > prompt  # rows whose next token is real
    np.testing.assert_allclose(np.asarray(logits), expected[:, prompt - 1], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(stepped)[rows], expected[rows, prompt], atol=1e-4, rtol=1e-4)
    assert (np.asarray(stepped).argmax(-1)[rows] == expected[rows, prompt].argmax(-1)).all()


def test_a_gemma3_tag_task_exports_the_backbone_with_its_head_beside_it(tmp_path):
    """transformers has no Gemma 3 token classifier: AutoModel's hidden states times mtl_head.safetensors are mtl's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    from mtl.config import tiny
    from mtl.export import main as export_main
    from mtl.model import MultiTaskModel
    from tests.helpers import write_run

    folder = hf_fixtures.tiny_model("gemma3", str(tmp_path / "hf"))
    cfg = dataclasses.replace(hf_import.read_config(folder), heads=(HeadConfig("pos", "tag", 5),), dtype="float32")
    model = MultiTaskModel(cfg, rngs=nnx.Rngs(3))
    model.task_embed[...] = 0.1 * jax.random.normal(jax.random.key(4), model.task_embed.shape)
    run = write_run(tmp_path / "run", dataclasses.replace(tiny(), model=cfg), model)
    assert export_main(["--ckpt", str(run), "--out", str(tmp_path / "out"), "--task", "pos"]) == 0

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Gemma3TextModel"] and config["mtl_head"]["kind"] == "tag"
    head = load_file(str(tmp_path / "out" / config["mtl_head"]["file"]))
    backbone = transformers.AutoModel.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(4, cfg.vocab_size, (2, 9))
    tokens[:, 0] = 1  # BOS (the byte tokenizer's id: the run has no tokenizer)
    their_tokens = tokens.copy()
    their_tokens[:, 0] = config["mtl_task_tokens"]["<|mtl:pos|>"]  # the task's own token in BOS's place
    with torch.no_grad():
        hidden = backbone(input_ids=torch.tensor(their_tokens)).last_hidden_state.numpy()
    got = hidden @ head["score.weight"].T + head["score.bias"]
    want = np.asarray(model.tag_logits("pos", model(jnp.asarray(tokens), jnp.zeros(2, jnp.int32))))
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
