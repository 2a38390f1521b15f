"""``train.py --init``: a tiny Hugging Face model as a run's start (its step-0 checkpoint), warm starts, bad sources."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import config as C
from mtl import trainer
from mtl.checkpoint import Checkpoints
from mtl.model import MultiTaskModel
from mtl.partition import abstract_state
from sharding import make_mesh
from tasks import load_tokenizer
from tasks.hf_tokenizer import HFTokenizer
from tests import hf_fixtures

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

QUIET = dict(log=lambda *_: None)


def task_files(folder):
    words = hf_fixtures.WORDS
    gen = folder / "echo.jsonl"
    gen.write_text("".join(json.dumps({"input": w, "target": w[::-1]}) + "\n" for w in words))
    cls = folder / "size.jsonl"
    cls.write_text("".join(json.dumps({"input": w, "label": "long" if len(w) > 4 else "short"}) + "\n" for w in words))
    return f"echo={gen}", f"size={cls}"


def head_task_files(folder):
    """A tag task and a regression task, for the export of heads."""
    pairs = [" ".join(hf_fixtures.WORDS[i : i + 3]) for i in range(len(hf_fixtures.WORDS) - 3)]
    tag = folder / "caps.jsonl"
    tag.write_text(
        "".join(json.dumps({"input": p, "tags": ["A" if "a" in w else "O" for w in p.split()]}) + "\n" for p in pairs)
    )
    value = folder / "chars.jsonl"
    value.write_text("".join(json.dumps({"input": p, "value": 3.0 + len(p)}) + "\n" for p in pairs))
    return f"caps={tag}", f"chars={value}"


def restored_model(run):
    cfg = C.from_dict(json.loads((run / "config.json").read_text()))
    mesh = make_mesh("data=1", jax.devices()[:1])
    graphdef, params, _ = abstract_state(lambda: MultiTaskModel(cfg.model, rngs=nnx.Rngs(0)), mesh)
    checkpoints = Checkpoints(run / "checkpoints", read_only=True)
    checkpoints.restore(checkpoints.latest_step(), params)
    return nnx.merge(graphdef, params)


def restored_logits(run, tokens, task_id=0):
    model = restored_model(run)
    return np.asarray(model.lm_logits(model(jnp.asarray(tokens), jnp.full(len(tokens), task_id, jnp.int32))))


def test_steps_0_checkpoint_is_the_pretrained_model_and_warm_starts(tmp_path):
    source = hf_fixtures.tiny_model("qwen3", str(tmp_path / "hf"))
    echo, size = task_files(tmp_path)
    run = tmp_path / "run"
    settings = ["train.eval_examples=4", "train.batch_size=8"]
    cfg = trainer.configure("small", tasks=[echo, size], steps=0, init=source, overrides=settings)
    assert (cfg.model.d_model, cfg.model.qk_norm, cfg.model.head_dim, cfg.train.learning_rate) == (64, True, 24, 2e-3)
    assert cfg.train.fit_max_len and cfg.model.max_len == 128  # the fixture's max_position_embeddings, until prepare
    assert cfg.model.param_dtype == "float32"  # master weights in f32 whatever the checkpoint's dtype
    chosen = trainer.configure("small", tasks=[echo, size], steps=0, init=source, overrides=["model.max_len=64"])
    assert not chosen.train.fit_max_len and chosen.model.max_len == 64  # a length the user sets is kept
    plan = trainer.prepare(cfg, **QUIET)
    rows = [int(s.arrays["tokens"].shape[1]) for d in plan.data for s in d.splits.values()]
    assert max(rows) < plan.config.model.max_len <= max(rows) + 32 < 128  # the tasks' length, not the model's
    assert plan.config.model.max_len % 32 == 0
    assert trainer.run(plan, run) == {}  # --steps 0 evaluates nothing unless asked
    assert not (run / "metrics.jsonl").exists() or '"split"' not in (run / "metrics.jsonl").read_text()

    tokens = np.random.default_rng(0).integers(4, 320, (2, 9))
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(restored_logits(run, tokens), expected, atol=1e-4, rtol=1e-4)
    served = load_tokenizer(run)  # the run folder carries the tokenizer, its ids and prompt template
    assert isinstance(served, HFTokenizer) and served.prompt_ids("the cat") == HFTokenizer.from_folder(
        source
    ).prompt_ids("the cat")

    warm = tmp_path / "warm"
    fast = [*settings, "train.warmup_steps=0", "train.learning_rate=0.05"]  # a task embedding far from zero
    caps, chars = head_task_files(tmp_path)
    every = dict(mixture="uniform", seed=17)  # each task trains once in 4 steps (its head and bias move)
    cfg = trainer.configure("tiny", tasks=[size, echo, caps, chars], steps=4, init=str(run), overrides=fast, **every)
    assert dataclasses_equal(cfg.model, C.from_dict(json.loads((run / "config.json").read_text())).model)
    trainer.run(trainer.prepare(cfg, **QUIET), warm)
    assert Checkpoints(warm / "checkpoints", read_only=True).latest_step() == 4
    assert isinstance(load_tokenizer(warm), HFTokenizer)

    # Export for task echo (index 1 here): transformers computes what mtl does for it, on prompts that start with BOS.
    from mtl.export import main as export_main

    assert export_main(["--ckpt", str(warm), "--out", str(tmp_path / "export"), "--task", "echo"]) == 0
    tokens[:, 0] = served.bos_id
    tokens[:, 4] = served.bos_id  # BOS again later: the plain token there
    mtl_echo = restored_logits(warm, tokens, task_id=1)
    assert np.abs(mtl_echo - restored_logits(warm, tokens, task_id=0)).max() > 1e-3  # the task embedding matters
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    task_token = json.loads((tmp_path / "export" / "config.json").read_text())["mtl_task_tokens"]["<|mtl:echo|>"]
    tokens[:, 0] = task_token
    with torch.no_grad():
        got = exported(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got[..., : mtl_echo.shape[-1]], mtl_echo, atol=1e-4, rtol=1e-4)
    # The exported tokenizer puts the task's token where mtl's prompt has BOS.
    prompt = served.prompt_ids("the cat")
    exported_ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")(
        served.template.format(input="the cat")
    )
    assert exported_ids.input_ids == [task_token, *prompt[1:]]
    exported_heads_match(warm, served, tmp_path)


def exported_heads_match(run, tokenizer, tmp_path):
    """classify, tag and regress heads exported to transformers' classes give mtl's answers on a right-padded batch."""
    from mtl.export import main as export_main

    model = restored_model(run)
    prompts = [tokenizer.prompt_ids(text) for text in ("the cat sat", "hello", "dogs ran past quickly , and")]
    lengths = np.array([len(p) for p in prompts])
    tokens = np.full((len(prompts), lengths.max()), tokenizer.pad_id)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
    real = np.arange(tokens.shape[1])[None] < lengths[:, None]
    for task, index in (("size", 0), ("caps", 2), ("chars", 3)):
        out = tmp_path / f"export-{task}"
        assert export_main(["--ckpt", str(run), "--out", str(out), "--task", task]) == 0
        config = json.loads((out / "config.json").read_text())
        hidden = model(jnp.asarray(tokens), jnp.full(len(tokens), index, jnp.int32))
        theirs = (
            transformers.AutoModelForSequenceClassification
            if task != "caps"
            else transformers.AutoModelForTokenClassification
        )
        loaded = theirs.from_pretrained(out, dtype=torch.float32).eval()
        theirs_tokens = tokens.copy()
        # The task's token in BOS's place; none where the task's vector never moved (the regressor starts at zero).
        theirs_tokens[:, 0] = config.get("mtl_task_tokens", {}).get(f"<|mtl:{task}|>", tokens[0, 0])
        with torch.no_grad():
            got = loaded(
                input_ids=torch.tensor(theirs_tokens), attention_mask=torch.tensor(real.astype(np.int64))
            ).logits.numpy()
        if task == "size":
            assert config["architectures"] == ["Qwen3ForSequenceClassification"]
            assert set(config["id2label"].values()) == {"long", "short"}
            bias = np.array(config["mtl_score_bias"])
            assert np.abs(bias).max() > 1e-3  # trained away from zero: it must be added, as documented
            expected = np.asarray(model.classify_logits(task, hidden, jnp.asarray(lengths)))
            np.testing.assert_allclose(got + bias, expected, atol=1e-4, rtol=1e-4)
        elif task == "caps":
            assert config["architectures"] == ["Qwen3ForTokenClassification"]
            expected = np.asarray(model.tag_logits(task, hidden))
            np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=1e-4)
        else:
            assert (config["problem_type"], config["num_labels"]) == ("regression", 1)
            expected = np.asarray(model.head_outputs(hidden, jnp.asarray(lengths))[task])
            np.testing.assert_allclose(got[:, 0] + config["mtl_score_bias"][0], expected, atol=1e-3, rtol=1e-4)


def dataclasses_equal(a, b):
    import dataclasses

    return dataclasses.replace(a, heads=()) == dataclasses.replace(b, heads=())


@pytest.mark.parametrize(
    "config, message",
    [
        (None, "is not a folder"),
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture GPT2LMHeadModel cannot be imported"),
        (
            {
                **{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4},
                **{"vocab_size": 320, "num_hidden_layers": 2, "intermediate_size": 96, "hidden_act": "relu"},
            },
            "hidden_act='relu' is not supported",
        ),
    ],
)
def test_bad_init_source_is_one_line_and_writes_nothing(config, message, tmp_path, capsys):
    from mtl.cli.train import main

    source = tmp_path / "model"
    if config is not None:
        source.mkdir()
        (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["--init", str(source), "--tasks", "g2p", "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("train.py: error: ") and message in line, line
    assert not out.exists()
