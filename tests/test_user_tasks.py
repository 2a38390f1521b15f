"""User task files of every kind train beside a built-in task and are served with their own labels."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
WORDS = ["apple", "brick", "cloud", "dance", "eagle", "flame", "grape", "house", "ivory", "jelly", "koala", "lemon"]


def run(script, *args, stdin=None):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=ENV, input=stdin, timeout=600
    )


def write_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    rows = [(w, i) for i in range(6) for w in WORDS]  # 72 rows a file
    paths = {
        "rev": folder / "reverse.jsonl",
        "vowel": folder / "vowel.csv",
        "length": folder / "length.parquet",
        "shape": folder / "shape.jsonl",
    }
    with paths["rev"].open("w") as f:  # generate: spell backwards
        for w, i in rows:
            f.write(json.dumps({"input": f"{w} {i}", "target": f"{i} {w[::-1]}"}) + "\n")
    with paths["vowel"].open("w", newline="") as f:  # classify with a split column
        writer = csv.writer(f)
        writer.writerow(["input", "label", "split"])
        for n, (w, i) in enumerate(rows):
            writer.writerow(
                [
                    f"{w}{i}",
                    "starts-with-vowel" if w[0] in "aeiou" else "consonant",
                    ["train", "validation", "test"][n % 3],
                ]
            )
    pq.write_table(  # regress
        pa.table({"input": [f"{w} x{i}" for w, i in rows], "value": [float(len(w) + i) for w, i in rows]}),
        paths["length"],
    )
    with paths["shape"].open("w") as f:  # tag: one tag a whitespace-separated token
        for w, i in rows:
            text = f"{w} {i} {w.upper()}"
            f.write(json.dumps({"input": text, "tags": ["LOWER", "DIGIT", "UPPER"]}) + "\n")
    return paths


@pytest.mark.slow
def test_user_files_of_every_kind_train_and_serve(tmp_path):
    paths = write_files(tmp_path)
    spec = ",".join(["langid"] + [f"{name}={path}" for name, path in paths.items()])
    out = tmp_path / "run"
    trained = run(
        "train.py",
        "--preset",
        "tiny",
        "--tasks",
        spec,
        "--steps",
        "10",
        "--batch-size",
        "8",
        "--mesh",
        "data=2,tensor=4",
        "--set",
        "train.eval_examples=4",
        "--out",
        str(out),
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    meta = {t["name"]: t for t in json.loads((out / "tasks.json").read_text())}
    assert meta["vowel"]["labels"] == ["consonant", "starts-with-vowel"]
    assert meta["shape"]["labels"] == ["DIGIT", "LOWER", "UPPER"]
    assert [meta[n]["kind"] for n in ("rev", "vowel", "length", "shape")] == ["generate", "classify", "regress", "tag"]
    test_lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"test"' in x]
    assert {r["task"] for r in test_lines} == {"langid", "rev", "vowel", "length", "shape"}

    requests = [
        {"id": "a", "task": "vowel", "input": "apple9"},
        {"id": "b", "task": "length", "input": "grape x2"},
        {"id": "c", "task": "shape", "input": "koala 3 KOALA  extra"},
        {"id": "d", "task": "rev", "input": "lemon 1", "max_new_tokens": 6},
        {"id": "e", "task": "langid", "input": "Frankreich"},
    ]
    served = run(
        "serve.py", "--ckpt", str(out), "--mesh", "fsdp=8", stdin="".join(json.dumps(r) + "\n" for r in requests)
    )
    assert served.returncode == 0, served.stderr[-3000:]
    answers = {r["id"]: r for r in map(json.loads, served.stdout.splitlines())}
    assert answers["a"]["label"] in ("consonant", "starts-with-vowel")
    assert set(answers["a"]["scores"]) == {"consonant", "starts-with-vowel"}
    assert isinstance(answers["b"]["value"], float)
    assert len(answers["c"]["tags"]) == 4 and set(answers["c"]["tags"]) <= {"DIGIT", "LOWER", "UPPER"}
    assert answers["d"]["tokens"] <= 6 and answers["d"]["finish_reason"] in ("stop", "length")
    assert answers["e"]["label"] in json.loads((out / "tasks.json").read_text())[0]["labels"]


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("", ".jsonl", "is empty"),
        ('{"input": "a", "colour": "red"}\n', ".jsonl", "colour"),
        ('{"input": "a", "target": "b", "label": "c"}\n', ".jsonl", "more than one"),
        (b'{"input": "a", "target": "b"}\n{"input": "\xff", "target": "c"}\n', ".jsonl", "byte 0xff on line 2"),
        ('{"input": "a", "target": "b"}\n\n{"input": "c", "target": \n', ".jsonl", "invalid JSON on line 3, column 26"),
        ("input,label\na,\xe9t\xe9\n".encode("latin-1"), ".csv", "not UTF-8 text: byte 0xe9 on line 2"),
        ('{"input": "a\\ud800", "target": "b"}\n', ".jsonl", "lone surrogate in its input on line 1"),
        ('{"input": "a", "value": 1}\n\n{"input": "b", "value": Infinity}\n', ".jsonl", "value inf on line 3"),
        ("input,label\na,pos\nb,pos\n", ".csv", "has only the label 'pos'"),
    ],
)
def test_bad_task_file_is_one_line_exit_2(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = run("train.py", "--tasks", f"mine={path}", "--steps", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and str(path) in errors[0] and message in errors[0], result.stderr
    assert "ERROR" not in result.stderr and "Traceback" not in result.stderr  # no datasets log lines
    assert not (tmp_path / "run").exists()


def test_a_split_column_without_validation_rows_has_validation_cut_from_train(tmp_path):
    """Such a file trained to the end and then failed to pick the best checkpoint (issue 14)."""
    from tasks.schema import split_of
    from tasks.user_files import load_task_file

    rows = [
        {"input": f"{w} {i}", "label": w[0], "split": "test" if i == 0 else "train"} for w in WORDS for i in range(6)
    ]
    path = tmp_path / "no_validation.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, load = load_task_file(str(path))
    splits = load()
    assert sorted(splits["validation"]["input"]) == sorted(
        r["input"] for r in rows if r["split"] == "train" and split_of(r["input"]) == "validation"
    )
    assert len(splits["validation"]) > 0
    assert sorted(splits["test"]["input"]) == sorted(r["input"] for r in rows if r["split"] == "test")
    assert len(splits["train"]) + len(splits["validation"]) == sum(r["split"] == "train" for r in rows)
