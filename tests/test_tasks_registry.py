"""Tests for tasks.registry, tasks.user_files and the built-in tasks."""

import collections
import csv
import json
import pathlib
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks
from tasks.schema import COLUMNS, SPLITS, split_of

# --- registry -----------------------------------------------------------------


def test_builtin_tasks_are_registered():
    assert {"g2p", "langid", "valence", "hyphenate"} <= set(tasks.names())
    kinds = {name: tasks.get(name).kind for name in ("g2p", "langid", "valence", "hyphenate")}
    assert kinds == {"g2p": "generate", "langid": "classify", "valence": "regress", "hyphenate": "tag"}


def test_valence():
    dd = tasks.get("valence").load()
    rows = {text: value for split in SPLITS for text, value in zip(dd[split]["input"], dd[split]["value"])}
    assert len(rows) > 7000
    assert rows["good"] == pytest.approx(1.9) and rows[":("] == pytest.approx(-1.9)
    assert min(rows.values()) >= -4 and max(rows.values()) <= 4
    assert not set(dd["train"]["input"]) & set(dd["test"]["input"])


def test_hyphenate():
    dd = tasks.get("hyphenate").load()
    rows = {text: tags for split in SPLITS for text, tags in zip(dd[split]["input"], dd[split]["tags"])}
    assert 15_000 < len(rows) < 40_000
    for text, tags in list(rows.items())[:500]:
        assert len(text.split()) == len(tags) >= 5 and set(tags) <= {"B", "I"} and tags[0] == "I"
    assert rows["r e m e m b e r"] == ["I", "I", "B", "I", "I", "B", "I", "I"]  # re-mem-ber


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="'nope'.*g2p.*langid"):
        tasks.get("nope")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="'g2p'"):
        tasks.register(tasks.Task("g2p", "generate", "again", lambda: None))


def test_task_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'translate'.*generate, classify, regress, tag"):
        tasks.Task("x", "translate", "bad kind", lambda: None)


def test_split_of_is_a_stable_hash():
    # Pinned values: a switch to Python's salted hash() or a new digest fails here.
    assert [split_of(w) for w in ["hello", "world", "phoneme", "zebra", "tree"]] == [
        "train",
        "train",
        "validation",
        "validation",
        "train",
    ]


# --- built-in tasks -----------------------------------------------------------


def _check_splits(dd, kind):
    assert set(dd) == set(SPLITS)
    for split in SPLITS:
        assert dd[split].column_names == list(COLUMNS[kind])
    inputs = {split: set(dd[split]["input"]) for split in SPLITS}
    assert not inputs["train"] & inputs["validation"]
    assert not inputs["train"] & inputs["test"]
    assert not inputs["validation"] & inputs["test"]
    total = sum(dd[s].num_rows for s in SPLITS)
    assert 0.88 < dd["train"].num_rows / total < 0.92
    for split in ("validation", "test"):
        assert 0.04 < dd[split].num_rows / total < 0.06
    # Deterministic: every example sits where the hash of its input says.
    for split in SPLITS:
        assert all(split_of(text) == split for text in dd[split]["input"][:500])


def test_g2p():
    dd = tasks.get("g2p").load()
    _check_splits(dd, "generate")
    total = sum(dd[s].num_rows for s in SPLITS)
    assert total > 100_000
    pairs = dict(zip(dd["train"]["input"], dd["train"]["target"]))
    assert pairs["hello"] == "HH AH0 L OW1"
    assert all(w.isalpha() and w.islower() and w.isascii() for w in pairs)
    assert tasks.get("g2p").load() is dd  # cached in-process


def test_langid():
    dd = tasks.get("langid").load()
    _check_splits(dd, "classify")
    labels = tasks.labels_of(dd)
    assert len(labels) >= 8
    by_text = collections.defaultdict(set)
    for split in SPLITS:
        for text, label in zip(dd[split]["input"], dd[split]["label"]):
            by_text[text].add(label)
    assert all(len(langs) == 1 for langs in by_text.values())
    assert "Afghanistan" not in by_text  # shared by several languages
    assert by_text["Vereinigte Staaten"] == {"de"}
    assert all(text and text == " ".join(text.split()) for text in by_text)
    counts = collections.Counter(label for s in SPLITS for label in dd[s]["label"])
    assert min(counts.values()) > 500


# --- user files ---------------------------------------------------------------

ROWS = {
    "generate": [{"input": f"word{i}", "target": f"W {i}"} for i in range(40)],
    "classify": [{"input": f"text {i}", "label": "pos" if i % 3 else "neg"} for i in range(40)],
    "regress": [{"input": f"text {i}", "value": i / 4} for i in range(40)],
    "tag": [{"input": f"a b{i}", "tags": ["X", "Y"]} for i in range(40)],
}


def _write(path, rows):
    """Writes rows as .jsonl, .csv (lists as space-joined text) or .parquet."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: " ".join(v) if isinstance(v, list) else v for k, v in r.items()})
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize("kind", ["generate", "classify", "regress", "tag"])
def test_user_file_kind_is_detected(tmp_path, kind, ext):
    path = _write(tmp_path / f"mine.{ext}", ROWS[kind])
    (task,) = tasks.resolve([f"mine={path}"])
    assert (task.name, task.kind) == ("mine", kind)
    dd = task.load()
    assert set(dd) == set(SPLITS)
    assert sum(dd[s].num_rows for s in SPLITS) == 40
    for split in SPLITS:
        assert dd[split].column_names == list(COLUMNS[kind])
        assert all(split_of(text) == split for text in dd[split]["input"])
    example = dd["train"][0]
    assert isinstance(example["input"], str)
    if kind == "tag":
        assert example["tags"] == ["X", "Y"]
    if kind == "regress":
        assert isinstance(example["value"], float)


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_split_column_is_honoured(tmp_path, ext):
    rows = [dict(r, split=SPLITS[i % 3]) for i, r in enumerate(ROWS["classify"])]
    path = _write(tmp_path / f"fixed.{ext}", rows)
    dd = tasks.resolve([f"fixed={path}"])[0].load()
    for i, split in enumerate(SPLITS):
        assert dd[split]["input"] == [r["input"] for r in rows[i::3]]
        assert dd[split].column_names == ["input", "label"]


def test_extra_columns_are_ignored(tmp_path):
    rows = [dict(r, id=i, notes="x") for i, r in enumerate(ROWS["generate"])]
    (task,) = tasks.resolve([f"extra={_write(tmp_path / 'extra.parquet', rows)}"])
    assert task.kind == "generate"
    assert task.load()["train"].column_names == ["input", "target"]


def test_numeric_labels_become_text(tmp_path):
    path = _write(tmp_path / "n.csv", [{"input": f"t{i}", "label": i % 2} for i in range(10)])
    dd = tasks.resolve([f"n={path}"])[0].load()
    assert tasks.labels_of(dd) == ("0", "1")


def test_resolve_mixes_builtins_and_files_in_order(tmp_path):
    path = _write(tmp_path / "g.jsonl", ROWS["generate"])
    assert [t.name for t in tasks.resolve(["langid", f"g={path}", "g2p"])] == ["langid", "g", "g2p"]


def test_resolve_rejects_a_name_twice(tmp_path):
    path = _write(tmp_path / "g.jsonl", ROWS["generate"])
    with pytest.raises(ValueError, match="'g2p'"):
        tasks.resolve(["g2p", "g2p"])
    with pytest.raises(ValueError, match="'g2p'"):
        tasks.resolve(["g2p", f"g2p={path}"])


def test_resolve_unknown_builtin():
    with pytest.raises(ValueError, match="'nope'.*g2p"):
        tasks.resolve(["nope"])


def _bad_file_cases(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    header_only = tmp_path / "header.csv"
    header_only.write_text("input,target\n")
    return [
        (missing, "does not exist"),
        (str(empty), "is empty"),
        (str(header_only), "has no rows"),
        (str(tmp_path / "x.txt"), "extension '.txt'"),
        (_write(tmp_path / "none.jsonl", [{"input": "a", "answer": "b"}]), r"columns \['answer', 'input'\].*no kind"),
        (
            _write(tmp_path / "two.jsonl", [{"input": "a", "target": "b", "label": "c"}]),
            r"more than one kind \(generate, classify\)",
        ),
        (_write(tmp_path / "split.jsonl", [{"input": "a", "target": "b", "split": "dev"}]), "split 'dev' on line 1"),
        (
            _write(tmp_path / "null.jsonl", [{"input": "a", "target": "b"}, {"input": None, "target": "c"}]),
            "empty 'input' on line 2",
        ),
        (_write(tmp_path / "tags.jsonl", [{"input": "a b c", "tags": ["X"]}]), "1 tags for 3 tokens on line 1"),
        (_write(tmp_path / "value.csv", [{"input": "a", "value": "high"}]), "value 'high' on line 2"),
    ]


def _read(spec: str) -> datasets.DatasetDict:
    """Resolves one task and reads all its rows: a file's start is read at resolve, every row at load."""
    return tasks.resolve([spec])[0].load()


def test_bad_files_get_one_sentence_naming_the_file(tmp_path):
    (tmp_path / "x.txt").write_text("input,target\na,b\n")
    for path, message in _bad_file_cases(tmp_path):
        with pytest.raises(ValueError) as info:
            _read(f"bad={path}")
        text = str(info.value)
        assert repr(path) in text, text
        assert re.search(message, text), text
        assert "\n" not in text and text.endswith("."), text


def test_bad_spec():
    with pytest.raises(ValueError, match="'=x.csv'"):
        tasks.resolve(["=x.csv"])


# --- hub datasets (a local folder stands in for the hub: tests never go online) ---


def test_hub_spec_reads_a_dataset_with_a_column_mapping(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(
        pa.table({"sentence": [f"w{i}" for i in range(40)], "mood": ["up", "down"] * 20}), folder / "train.parquet"
    )
    pq.write_table(pa.table({"sentence": ["t1", "t2"], "mood": ["up", "down"]}), folder / "test.parquet")
    (task,) = tasks.resolve([f"moods=hf:{folder}?input=sentence&label=mood"])
    assert task.kind == "classify"
    dd = task.load()
    assert len(dd["test"]) == 2 and dd["test"]["input"] == ["t1", "t2"]  # the dataset's own test split
    assert len(dd["train"]) + len(dd["validation"]) == 40  # validation cut from train by hash
    assert set(dd["train"]["label"]) == {"up", "down"}


def test_hub_spec_errors(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(pa.table({"sentence": ["a"], "mood": ["up"]}), folder / "train.parquet")
    with pytest.raises(ValueError, match="'colour=mood'"):
        tasks.resolve([f"m=hf:{folder}?colour=mood"])
    with pytest.raises(ValueError, match="'nothere'"):
        tasks.resolve([f"m=hf:{folder}?input=nothere"])
    with pytest.raises(ValueError, match="names no dataset"):
        tasks.resolve(["m=hf:"])
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(ValueError, match="could not be loaded.*cached"):
        tasks.resolve(["m=hf:no-such-org/no-such-dataset"])


def test_file_without_train_rows_is_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"input": "a", "label": "x", "split": "test"}\n')
    with pytest.raises(ValueError, match=f"{path}.*no rows in its train split"):
        _read(f"t={path}")


def test_package_docstring_names_every_builtin_task():
    import tasks as package

    missing = [name for name in package.names() if f"``{name}``" not in package.__doc__]
    assert not missing, f"tasks/__init__.py's docstring does not name {missing}"


# --- checked values: the file and the line of a bad one (issue 26) ---


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e38])
def test_a_regress_value_float32_cannot_hold_stops_with_its_file_and_line(tmp_path, bad):
    rows = [{"input": f"t{i}", "value": float(i)} for i in range(6)]
    rows[4]["value"] = bad
    jsonl = tmp_path / "v.jsonl"  # a blank line moves row 4 to line 6
    lines = [json.dumps(r) + "\n" for r in rows]
    jsonl.write_text("".join(lines[:2]) + "\n" + "".join(lines[2:]))
    csv_path = tmp_path / "v.csv"  # a quoted input over two lines moves row 4 to line 7
    records = [f'"{r["input"]}{chr(10) if i == 1 else ""}",{r["value"]!r}\n' for i, r in enumerate(rows)]
    csv_path.write_text("input,value\n" + "".join(records))
    parquet = _write(tmp_path / "v.parquet", rows)
    for path, place in ((str(jsonl), "on line 6"), (str(csv_path), "on line 7"), (parquet, "in row 5")):
        with pytest.raises(ValueError) as info:
            _read(f"v={path}")
        text = str(info.value)
        assert text.startswith(f"Task file {path!r} has ") and re.search(rf"value\b.*{place}[,;]", text), text


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_a_classify_file_of_one_label_is_refused_in_one_line(tmp_path, ext):
    path = _write(tmp_path / f"one.{ext}", [{"input": f"t{i}", "label": "pos"} for i in range(20)])
    with pytest.raises(ValueError, match=rf"^Task file {re.escape(repr(path))} has only the label 'pos'; [^\n]*\.$"):
        _read(f"one={path}")


def test_a_hub_classify_dataset_of_one_label_is_refused(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(pa.table({"sentence": [f"w{i}" for i in range(10)], "mood": ["up"] * 10}), folder / "train.parquet")
    with pytest.raises(ValueError, match="only the label 'up'"):
        tasks.resolve([f"m=hf:{folder}?input=sentence&label=mood"])


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_a_leading_utf8_byte_order_mark_is_accepted(tmp_path, ext):
    plain = pathlib.Path(_write(tmp_path / f"plain.{ext}", ROWS["classify"]))
    marked = tmp_path / f"marked.{ext}"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    (a, b) = tasks.resolve([f"a={plain}", f"b={marked}"])
    assert a.kind == b.kind == "classify"
    assert {s: a.load()[s].to_dict() for s in SPLITS} == {s: b.load()[s].to_dict() for s in SPLITS}
