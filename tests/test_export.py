"""``mtl.export`` is the model mtl serves: a trained task's logits on its prompts and on multi-turn chats rendered
by the exported tokenizer's own template, where the first token comes back at every turn (as ChatML's does)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import config as C
from mtl import trainer
from mtl.checkpoint import Checkpoints
from mtl.export import main as export_main
from mtl.model import MultiTaskModel
from mtl.partition import abstract_state
from sharding import make_mesh
from tasks import load_tokenizer
from tests import hf_fixtures

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

# BOS (<s>) opens every turn, as <|im_start|> does in ChatML models such as SmolLM2.
BOS_EVERY_TURN = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}\n"
)
# A first marker that is not BOS (<eot>), as Qwen's templates open with <|im_start|> and BOS is another token.
OTHER_FIRST = BOS_EVERY_TURN.replace("<s>", "<eot>")
CHATS = [
    [{"role": "user", "content": "the cat sat"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "tiny models"},
        {"role": "user", "content": "lazy fox jumped"},
    ],
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    source = hf_fixtures.tiny_model("llama", str(tmp / "hf"))  # untied, llama3 rope scaling
    (tmp / "hf" / "chat_template.jinja").write_text(BOS_EVERY_TURN)
    data = tmp / "echo.jsonl"
    data.write_text("".join(json.dumps({"input": w, "target": w[::-1]}) + "\n" for w in hf_fixtures.WORDS))
    fast = ["train.warmup_steps=0", "train.learning_rate=0.05", "train.eval_examples=2", "train.batch_size=4"]
    cfg = trainer.configure("tiny", tasks=[f"echo={data}"], steps=2, init=source, overrides=fast)
    trainer.run(trainer.prepare(cfg, log=lambda *_: None), tmp / "run")
    return tmp / "run"


def mtl_logits(run, tokens):
    cfg = C.from_dict(json.loads((run / "config.json").read_text()))
    graphdef, params, _ = abstract_state(
        lambda: MultiTaskModel(cfg.model, rngs=nnx.Rngs(0)), make_mesh("data=1", jax.devices()[:1])
    )
    checkpoints = Checkpoints(run / "checkpoints", read_only=True)
    checkpoints.restore(checkpoints.latest_step(), params)
    model = nnx.merge(graphdef, params)
    return np.asarray(model.lm_logits(model(jnp.asarray([tokens]), jnp.zeros(1, jnp.int32))))[0]


@pytest.mark.parametrize("template", [BOS_EVERY_TURN, OTHER_FIRST], ids=["bos-every-turn", "other-first"])
def test_the_export_equals_mtl_on_task_prompts_and_chats(run, tmp_path, template):
    from mtl.serving.chat import ChatTemplate

    (run / "chat_template.jinja").write_text(template)  # the run's template, as its tokenizer keeps it
    out = tmp_path / "export"
    assert export_main(["--ckpt", str(run), "--out", str(out)]) == 0  # the default: the first generation task
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    served = load_tokenizer(run)
    chat = ChatTemplate.from_tokenizer(served)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["max_position_embeddings"] == 128  # the source's
    assert config["rope_parameters"]["rope_type"] == "llama3"
    task_token = config["mtl_task_tokens"]["<|mtl:echo|>"]

    cases = [(served.prompt_ids(w), tokenizer(served.template.format(input=w)).input_ids) for w in ("cat", "lazy fox")]
    cases += [(chat.prompt_ids(m), tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in CHATS]
    for mtl_ids, their_ids in cases:
        if not isinstance(their_ids, list):
            their_ids = their_ids["input_ids"]
        assert their_ids[1:] == mtl_ids[1:] and their_ids[0] in config["mtl_task_tokens"].values()
        assert mtl_ids.count(mtl_ids[0]) > 1 or len(mtl_ids) < 8  # the first token comes back in chats
        want = mtl_logits(run, mtl_ids)
        with torch.no_grad():
            got = exported(input_ids=torch.tensor([their_ids])).logits.numpy()[0]
        np.testing.assert_allclose(got[:, : want.shape[-1]], want, atol=1e-4, rtol=1e-4)
    assert cases[0][1][0] == task_token


def test_a_steps_0_export_is_the_source_again(tmp_path):
    source = hf_fixtures.tiny_model("qwen2", str(tmp_path / "hf"), vocab_size=384)  # tied
    cfg = trainer.configure("tiny", tasks=["langid"], steps=0, init=source, overrides=["train.eval_examples=2"])
    trainer.run(trainer.prepare(cfg, log=lambda *_: None), tmp_path / "run")
    assert export_main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--task", "langid"]) == 0
    size = (tmp_path / "out" / "model.safetensors").stat().st_size
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "mtl_task_tokens" not in config
    # A classifier: the backbone plus its score head ([C, D], C=10 languages); nothing else grew.
    assert abs(size - (tmp_path / "hf" / "model.safetensors").stat().st_size - 10 * 64 * 4) < 0.01 * size


def test_export_without_task_on_a_run_without_generation_lists_the_tasks(tmp_path, capsys):
    source = hf_fixtures.tiny_model("qwen2", str(tmp_path / "hf"), vocab_size=384)
    cfg = trainer.configure(
        "tiny", tasks=["langid", "valence"], steps=0, init=source, overrides=["train.eval_examples=2"]
    )
    trainer.run(trainer.prepare(cfg, log=lambda *_: None), tmp_path / "run")
    capsys.readouterr()
    assert export_main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mtl.export: error: --task is needed: this run has no generation task; choose one of langid, valence"
    assert not (tmp_path / "out").exists()
