"""mtl.evaluator: metrics through the serving engine, the best-checkpoint score, and the evaluation records.

The references are built from the engine's own answers, so each metric has a
known value computed here by hand: a wrong pick of examples, a wrong label
index or a stale engine gives another number.
"""

import dataclasses

import datasets
import jax
import numpy as np
import pytest
from flax import nnx

import tasks
from mtl import config as C
from mtl.evaluator import Evaluator, check_selection, evaluate, selection_score
from mtl.model import MultiTaskModel
from mtl.serving.requests import Request
from mtl.serving.server import make_scheduler
from mtl.trainer import TaskData
from sharding import make_mesh

TOKENIZER = tasks.ByteTokenizer()
HEADS = (
    C.HeadConfig("spell", "generate"),
    C.HeadConfig("lang", "classify", 3),
    C.HeadConfig("score", "regress", 0, 2.0, 3.0),
    C.HeadConfig("pos", "tag", 2),
)
CFG = dataclasses.replace(C.tiny().model, heads=HEADS, max_len=32)
LABELS = ("de", "en", "fr")
TAGS = ("B", "I")
WORDS = ["cat", "stone", "tree", "a", "river"]  # five test examples a task
PICKS = [0, 2, 4]  # limit 3 of 5: evenly spaced
VALUES = [0.0, 1.0, 2.0, 3.0, 4.0]
SENTENCES = [f"{w} {w}" for w in WORDS]
SENTENCE_TAGS = [["B", "I"], ["I", "I"], ["B", "B"], ["I", "B"], ["B", "I"]]
MAX_NEW = 6
SETTINGS = C.ServeConfig(max_batch=4)
HEAD_KIND = {h.task: h.kind for h in HEADS}


@pytest.fixture(scope="module")
def mesh():
    return make_mesh("data=1", jax.devices()[:1])


@pytest.fixture(scope="module")
def model():
    return MultiTaskModel(CFG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def engine(model, mesh):
    return make_scheduler(model, mesh, SETTINGS, TOKENIZER)


REFERENCE = {"generate": "target", "classify": "label", "regress": "value", "tag": "tags"}


def split(kind, inputs, references, labels=None, task_id=0):
    """An encoded split of ``inputs`` with ``references`` in the kind's column (docs/contract.md's task files)."""
    dataset = datasets.Dataset.from_dict({"input": inputs, REFERENCE[kind]: references})
    return tasks.encode_split(kind, dataset, TOKENIZER, CFG.max_len, labels, task_id)


def request(task, text, **fields):
    return Request(task, tasks.prompt_ids(TOKENIZER, text), **fields)


def task_data(engine):
    """One task of each kind. The generate and classify references agree with the engine's answers
    on picks 0 and 4 only: not on pick 2, nor on the examples a limit of 3 leaves out (1 and 3)."""
    gens = engine.generate([request("spell", w, max_new_tokens=MAX_NEW) for w in WORDS])
    outputs = [TOKENIZER.decode(g.tokens) for g in gens]
    targets = [o if i in (0, 4) else o + " xx" for i, o in enumerate(outputs)]
    classes = [int(a.values.argmax()) for a in engine.score([request("lang", w) for w in WORDS])]
    labels = [LABELS[c] if i in (0, 4) else LABELS[(c + 1) % 3] for i, c in enumerate(classes)]
    return [
        TaskData("spell", "generate", "", (), splits(split("generate", WORDS, targets), ["x"], ["y"]), MAX_NEW),
        TaskData("lang", "classify", "", LABELS, splits(split("classify", WORDS, labels, LABELS, 1), ["x"], ["de"]), 0),
        TaskData("score", "regress", "", (), splits(split("regress", WORDS, VALUES, None, 2), ["x"], [1.0]), 0),
        # No validation example at all.
        TaskData("pos", "tag", "", TAGS, splits(split("tag", SENTENCES, SENTENCE_TAGS, TAGS, 3), [], []), 0),
    ]


def splits(test, validation_inputs, validation_references):
    """``test`` and a validation split of the same task."""
    validation = split(test.kind, validation_inputs, validation_references, test.labels or None, test.task_id)
    return {"test": test, "validation": validation}


@pytest.fixture(scope="module")
def data(engine):
    return task_data(engine)


def test_metrics_match_the_engines_answers_on_evenly_spaced_examples(engine, data):
    scores = evaluate(engine, data, "test", limit=3)
    assert set(scores) == {"spell", "lang", "score", "pos"}
    for d in data:
        assert set(scores[d.name]) == set(tasks.metrics.metrics_for(d.kind)), d.name
    # References agree with the engine on picks 0 and 4 and disagree on pick 2.
    assert scores["spell"]["exact_match"] == pytest.approx(2 / 3)
    assert scores["lang"]["accuracy"] == pytest.approx(2 / 3)
    # Regression and tags, by hand from the engine's answers on the picks.
    predicted = [float(engine.score([request("score", WORDS[i])])[0].values) for i in PICKS]
    expected = np.mean([(p - VALUES[i]) ** 2 for p, i in zip(predicted, PICKS)])
    assert scores["score"]["mse"] == pytest.approx(expected, rel=1e-6)
    hits = []
    for i in PICKS:
        probs = engine.score([request("pos", SENTENCES[i])])[0].values  # [T, C]: a tag distribution a position
        ends = [len(WORDS[i]), len(SENTENCES[i])]  # each word's last byte: "cat cat" -> 3, 7 (the BOS is 0)
        hits += [TAGS[int(probs[e].argmax())] == tag for e, tag in zip(ends, SENTENCE_TAGS[i])]
    assert scores["pos"]["tag_accuracy"] == pytest.approx(np.mean(hits))


def test_limit_zero_takes_every_example(engine, data):
    scores = evaluate(engine, data, "test", limit=0)
    assert scores["spell"]["exact_match"] == pytest.approx(2 / 5)
    assert scores["lang"]["accuracy"] == pytest.approx(2 / 5)
    assert evaluate(engine, data, "test", limit=99) == scores  # a limit above the split's size: all of it


def test_a_task_without_examples_in_the_split_is_left_out(engine, data):
    assert set(evaluate(engine, data, "validation", limit=0)) == {"spell", "lang", "score"}


class Console:
    def __init__(self):
        self.lines = []

    def log(self, line):
        self.lines.append(line)


def test_evaluator_logs_one_record_a_task_and_follows_the_model(model, mesh, engine, data):
    records, console = [], Console()
    evaluator = Evaluator(data, mesh, SETTINGS, limit=3, log=records.append)
    scores = evaluator(model, "test", 7, console)
    assert scores == evaluate(engine, data, "test", 3)
    assert [r["task"] for r in records] == ["spell", "lang", "score", "pos"]
    for r in records:
        assert r["step"] == 7 and r["split"] == "test"
        assert set(r) == {"step", "task", "split", *tasks.metrics.metrics_for(HEAD_KIND[r["task"]])}
        for metric, value in scores[r["task"]].items():
            assert r[metric] == round(value, 5)
    assert any(line.startswith("eval test step 7 lang: accuracy 0.6667") for line in console.lines), console.lines

    # New parameters (as after train steps): the same engine, compiled once, answers with them.
    built = evaluator.scheduler
    other = MultiTaskModel(CFG, rngs=nnx.Rngs(4))
    again = evaluator(other, "test", 8, console)
    assert evaluator.scheduler is built
    assert again == evaluate(make_scheduler(other, mesh, SETTINGS, TOKENIZER), data, "test", 3)
    assert again != scores


def test_selection_score_mean_of_main_metrics_and_one_metric_with_its_sign():
    kinds = {"spell": "generate", "lang": "classify", "pos": "tag"}
    scores = {
        "spell": {"exact_match": 0.5, "char_error_rate": 0.25},
        "lang": {"accuracy": 0.75, "macro_f1": 0.125},
        "pos": {"tag_accuracy": 0.9, "tag_f1": 0.375},
    }
    assert selection_score("mean", kinds, scores) == pytest.approx((0.5 + 0.75 + 0.375) / 3)
    assert selection_score("lang/macro_f1", kinds, scores) == 0.125
    # Lower is better for an error rate: negated, so that higher still ranks first.
    assert selection_score("spell/char_error_rate", kinds, scores) == -0.25
    better = {**scores, "spell": {"exact_match": 0.5, "char_error_rate": 0.1}}
    assert selection_score("spell/char_error_rate", kinds, better) > selection_score(
        "spell/char_error_rate", kinds, scores
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("accuracy", "train.best_metric='accuracy' must be mean or TASK/METRIC with TASK one of spell, lang"),
        ("poetry/accuracy", "train.best_metric='poetry/accuracy' must be mean or TASK/METRIC"),
        ("lang/exact_match", "train.best_metric='lang/exact_match': lang has the metrics accuracy, macro_f1"),
    ],
)
def test_check_selection_names_the_bad_value_and_what_is_accepted(spec, message):
    with pytest.raises(ValueError) as e:
        check_selection(spec, {"spell": "generate", "lang": "classify"})
    assert str(e.value).startswith(message), str(e.value)


def test_check_selection_accepts_mean_and_every_known_metric():
    kinds = {"spell": "generate", "lang": "classify", "score": "regress", "pos": "tag"}
    check_selection("mean", kinds)
    for task, kind in kinds.items():
        for metric in tasks.metrics.metrics_for(kind):
            check_selection(f"{task}/{metric}", kinds)
