"""``--init model.gguf``: tiny GGUF files written here (f32, f16, Q8_0, Q4_1) import as transformers reads them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import hf_import, trainer
from mtl.config import UsageError
from sharding import make_mesh
from tasks import load_tokenizer
from tests import hf_fixtures

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TOKENS = np.random.default_rng(0).integers(4, 320, (2, 11))
TOKENS[:, 0] = 1  # BOS first, as every prompt starts


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "cache"))


def mtl_logits(folder):
    cfg = hf_import.read_config(folder)
    graphdef, state = hf_import.load(folder, cfg, make_mesh("data=1", jax.devices()[:1]))
    model = nnx.merge(graphdef, state)
    return np.asarray(model.lm_logits(model(jnp.asarray(TOKENS), jnp.zeros(len(TOKENS), jnp.int32))))


def hf_logits(folder, **kwargs):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize(
    "family, qtype, tolerance",
    [("llama", "F32", 1e-4), ("qwen2", "F16", 2e-2), ("qwen3", "Q8_0", 5e-2), ("qwen2", "Q4_1", 0.5)],
)
def test_a_gguf_file_imports_as_its_source_model(tmp_path, family, qtype, tolerance):
    # Llama's GGUF carries no llama3 rope scaling tensor here: the source uses plain rotary positions.
    changes = {"rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0}} if family == "llama" else {}
    source = hf_fixtures.tiny_model(family, str(tmp_path / "hf"), **changes)
    path = hf_fixtures.write_gguf(source, str(tmp_path / f"tiny.{qtype}.gguf"), family, qtype)

    kind, folder = hf_import.resolve_source(path)
    assert kind == "hf" and hf_import.resolve_source(path)[1] == folder  # converted once, then found in the cache
    cfg = hf_import.read_config(folder)
    assert cfg.head_dim == (24 if family == "qwen3" else 16)  # Qwen3's head size from the file, not transformers' 128
    got = mtl_logits(folder)
    # Exactly the model transformers' own GGUF loader makes of the file (the same dequantised weights) ...
    config = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file=path)
    config.head_dim = cfg.head_dim
    direct = hf_logits(str(tmp_path), gguf_file=path, config=config)
    np.testing.assert_allclose(got, direct, atol=1e-4, rtol=1e-4)
    # ... and, up to the quantisation, the model it was written from.
    assert np.abs(got - hf_logits(source)).max() < tolerance
    assert load_tokenizer(folder).encode("the cat sat") == load_tokenizer(source).encode("the cat sat")


def test_train_init_gguf_runs_from_the_file(tmp_path):
    plain_rope = {"rope_type": "default", "rope_theta": 10_000.0}
    source = hf_fixtures.tiny_model("llama", str(tmp_path / "hf"), rope_parameters=plain_rope)
    path = hf_fixtures.write_gguf(source, str(tmp_path / "tiny.gguf"), "llama", "Q8_0")
    data = tmp_path / "echo.jsonl"
    data.write_text("".join(json.dumps({"input": w, "target": w[::-1]}) + "\n" for w in hf_fixtures.WORDS))
    cfg = trainer.configure("tiny", tasks=[f"echo={data}"], steps=0, init=path, overrides=["train.eval_examples=2"])
    assert (cfg.model.d_model, cfg.model.head_dim, cfg.model.tie_embeddings) == (64, 16, False)
    trainer.run(trainer.prepare(cfg, log=lambda *_: None), tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").exists()


def test_what_cannot_be_imported_is_one_line(tmp_path):
    source = hf_fixtures.tiny_model("qwen2", str(tmp_path / "hf"))
    bad_arch = hf_fixtures.write_gguf(source, str(tmp_path / "phi.gguf"), "qwen2", arch="phi3")
    ternary = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    bad_type = hf_fixtures.write_gguf(
        source, str(tmp_path / "tq.gguf"), "qwen2", extra={"blk.0.extra.weight": (ternary, "TQ2_0")}
    )
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF\x03\x00\x00\x00not really")
    expected = {
        bad_arch: "GGUF architecture 'phi3' cannot be imported; supported: llama (Llama, Mistral)",
        bad_type: "tensor blk.0.extra.weight is TQ2_0, a GGUF type mtl cannot dequantise; supported: F32",
        str(garbage): "not a readable GGUF file",
        str(tmp_path / "missing.gguf"): "no such GGUF file",
    }
    for path, message in expected.items():
        with pytest.raises(UsageError) as e:
            trainer.configure("tiny", tasks=["g2p"], init=path)
        assert message in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "cache").glob("gguf/*/config.json"))  # nothing converted
