"""Presets build, dotted overrides parse, configs survive config.json, validation."""

import dataclasses
import json
import re

import pytest
from flax import nnx

from mtl import config
from mtl.config import Config, HeadConfig, ModelConfig, override, validate
from mtl.model import MultiTaskModel, count_params
from tests.helpers import HEADS


def backbone_params(cfg: ModelConfig) -> int:
    """Counts parameters of the model built abstractly: shapes only, no memory."""
    model = nnx.eval_shape(lambda: MultiTaskModel(cfg, rngs=nnx.Rngs(0)))
    return count_params(nnx.state(model, nnx.Param))


def manual_backbone_params(m: ModelConfig) -> int:
    """The same count written out from the architecture, one term per weight."""
    attention = m.d_model * m.n_heads * m.head_dim * 2 + m.d_model * m.n_kv_heads * m.head_dim * 2
    mlp = 3 * m.d_model * m.d_ff
    norms = 2 * m.d_model
    embeddings = m.vocab_size * m.d_model + m.d_model  # tokens, and one task row
    untied = 0 if m.tie_embeddings else m.d_model * m.vocab_size
    task_log_var = 1  # one task's loss scale (uncertainty weighting)
    return embeddings + m.n_layers * (attention + mlp + norms) + m.d_model + untied + task_log_var


@pytest.mark.parametrize("name", sorted(config.PRESETS))
def test_preset_builds_and_matches_its_docstring(name):
    cfg = config.preset(name)
    validate(cfg)
    assert cfg.model.heads == ()  # so every parameter counted is the backbone's
    count = backbone_params(cfg.model)
    assert count == manual_backbone_params(cfg.model)
    docstring = config.PRESETS[name].__doc__
    found = re.search(r"(\d+\.\d\d)M backbone parameters", docstring)
    assert found, f"the {name} preset's docstring does not state its parameter count"
    assert round(count / 1e6, 2) == float(found.group(1)), f"{name} has {count / 1e6:.2f}M backbone parameters"


def test_heads_add_only_their_classifiers():
    cfg = dataclasses.replace(config.tiny().model, heads=HEADS)
    task_rows = (len(HEADS) - 1) * (cfg.d_model + 1)  # a task embedding row and a loss scale per task
    classifiers = sum(cfg.d_model * h.num_classes + h.num_classes for h in HEADS if h.kind == "classify")
    assert backbone_params(cfg) == manual_backbone_params(cfg) + task_rows + classifiers


def test_preset_unknown_name():
    with pytest.raises(ValueError, match=r"'huge'.*tiny, small, base"):
        config.preset("huge")


# --- override ---------------------------------------------------------------


def test_override_parses_each_field_type():
    cfg = config.tiny()
    cfg = override(cfg, "model.d_model=256")
    cfg = override(cfg, "train.learning_rate=1e-4")
    cfg = override(cfg, "model.tie_embeddings=false")
    cfg = override(cfg, "model.dtype=bfloat16")
    cfg = override(cfg, "train.mesh=data=2,fsdp=4")  # the value may hold '=' and ','
    cfg = override(cfg, "train.tasks=g2p,langid,echo")
    cfg = override(cfg, " train.steps = 7 ")
    assert cfg.model.d_model == 256 and isinstance(cfg.model.d_model, int)
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.model.tie_embeddings is False
    assert cfg.model.dtype == "bfloat16"
    assert cfg.train.mesh == "data=2,fsdp=4"
    assert cfg.train.tasks == ("g2p", "langid", "echo")
    assert cfg.train.steps == 7
    # Everything else is untouched, and the original is not modified.
    assert cfg.model.n_layers == config.tiny().model.n_layers
    assert config.tiny().model.d_model == 64


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("On", True), ("no", False), ("0", False)])
def test_override_bool_spellings(text, value):
    assert override(config.tiny(), f"model.tie_embeddings={text}").model.tie_embeddings is value


@pytest.mark.parametrize(
    "assignment, fragments",
    [
        ("optim.learning_rate=1", ["'optim'", "unknown section", "model, serve, train"]),
        ("model.width=1", ["'width'", "model has no field", "d_model"]),
        ("model.heads=x", ["'heads'", "no field"]),  # heads come from the tasks, not the command line
        ("model.d_model=wide", ["'wide'", "model.d_model", "int"]),
        ("model.d_model=2.5", ["'2.5'", "int"]),
        ("train.learning_rate=fast", ["'fast'", "float"]),
        ("model.tie_embeddings=maybe", ["'maybe'", "bool"]),
        ("model.d_model", ["'model.d_model'", "section.field=value"]),  # no '='
        ("d_model=4", ["'d_model=4'", "section.field=value"]),  # no section
        ("model.attention.heads=4", ["'model.attention.heads=4'", "section.field=value"]),
    ],
)
def test_override_errors_name_the_bad_thing(assignment, fragments):
    with pytest.raises(ValueError) as error:
        override(config.tiny(), assignment)
    for fragment in fragments:
        assert fragment in str(error.value)


# --- config.json ------------------------------------------------------------


def test_dict_round_trip_keeps_heads_and_tuples():
    cfg = override(config.small(), "train.tasks=spell,lang,echo")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, heads=HEADS))
    # Through JSON text, as config.json is written and read: tuples become lists.
    back = config.from_dict(json.loads(config.dumps(cfg)))
    assert back == cfg
    assert isinstance(back.model.heads, tuple) and isinstance(back.model.heads[1], HeadConfig)
    assert isinstance(back.train.tasks, tuple)
    assert back.model.head("lang").num_classes == 5
    assert config.from_dict(config.to_dict(config.tiny())) == config.tiny()


# --- validate ---------------------------------------------------------------


def with_model(**changes) -> Config:
    cfg = config.tiny()
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))


@pytest.mark.parametrize(
    "cfg, fragments",
    [
        (with_model(n_heads=6, n_kv_heads=4), ["model.n_heads=6", "model.n_kv_heads=4", "multiple"]),
        (with_model(head_dim=15), ["model.head_dim=15", "even"]),
        (with_model(dtype="float64"), ["model.dtype='float64'", "bfloat16"]),
        (with_model(param_dtype="int8"), ["model.param_dtype='int8'"]),
        (with_model(d_model=0), ["model.d_model=0", "positive"]),
        (with_model(n_layers=-1), ["model.n_layers=-1", "positive"]),
        (with_model(vocab_size=0), ["model.vocab_size=0"]),
        (with_model(n_kv_heads=0), ["model.n_kv_heads=0", "positive"]),
        (override(config.tiny(), "train.batch_size=0"), ["train.batch_size=0", "positive"]),
        (override(config.tiny(), "train.learning_rate=-1e-3"), ["train.learning_rate=-0.001", "positive"]),
        (with_model(heads=(HeadConfig("x", "rank"),)), ["'x'", "'rank'", "classify"]),
        (with_model(remat="layer"), ["model.remat='layer'", "none, dots, full"]),
        (override(config.tiny(), "train.grad_accum=0"), ["train.grad_accum=0", "positive"]),
        (override(config.tiny(), "train.grad_accum=3"), ["train.batch_size=16", "train.grad_accum=3", "multiple"]),
        (override(config.tiny(), "train.learning_rate=nan"), ["train.learning_rate=nan", "finite"]),
        (override(config.tiny(), "train.learning_rate=inf"), ["train.learning_rate=inf", "finite"]),
        (override(config.tiny(), "train.weight_decay=nan"), ["train.weight_decay=nan", "finite"]),
        (override(config.tiny(), "train.weight_decay=-0.1"), ["train.weight_decay=-0.1", "at least 0"]),
        (override(config.tiny(), "train.grad_clip=-1"), ["train.grad_clip=-1.0", "positive"]),
        (override(config.tiny(), "train.warmup_steps=-5"), ["train.warmup_steps=-5", "at least 0"]),
        (override(config.tiny(), "train.eval_every=-1"), ["train.eval_every=-1", "at least 0"]),
        (override(config.tiny(), "train.eval_examples=-3"), ["train.eval_examples=-3", "at least 0"]),
        (override(config.tiny(), "train.seed=-1"), ["train.seed=-1", "at least 0"]),
        (override(config.tiny(), f"train.seed={2**64}"), [f"train.seed={2**64}", "below 2**32"]),
        (override(config.tiny(), "model.rope_theta=0"), ["model.rope_theta=0.0", "positive"]),
        (override(config.tiny(), "model.norm_eps=-inf"), ["model.norm_eps=-inf", "finite"]),
        (override(config.tiny(), "train.loss_weights=g2p=nan"), ["g2p=nan", "finite weight"]),
        (override(config.tiny(), "serve.max_batch=0"), ["serve.max_batch=0", "positive"]),
        (override(config.tiny(), "serve.prefill_batch=-2"), ["serve.prefill_batch=-2", "at least 0"]),
        (override(config.tiny(), "serve.kv_dtype=int4"), ["serve.kv_dtype='int4'", "bfloat16", "int8"]),
    ],
)
def test_validate_rejects(cfg, fragments):
    with pytest.raises(ValueError) as error:
        validate(cfg)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_validate_accepts_grouped_and_multi_query_attention():
    validate(with_model(n_heads=8, n_kv_heads=1))
    validate(with_model(n_heads=8, n_kv_heads=8, dtype="bfloat16", param_dtype="float16", heads=HEADS))


# --- heads ------------------------------------------------------------------


def test_head_lookup():
    cfg = with_model(heads=HEADS).model
    assert cfg.head("lang") == HeadConfig("lang", "classify", 5)
    assert cfg.task_names == ("spell", "lang", "echo")
    with pytest.raises(KeyError, match=r"'poetry'.*spell, lang, echo"):
        cfg.head("poetry")
    with pytest.raises(KeyError, match=r"'poetry'.*serves: none"):
        config.tiny().model.head("poetry")
