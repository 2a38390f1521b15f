"""Tasks from files a user brings: read, detect the kind, split.

A file is one example a row; its columns decide its kind (``schema.COLUMNS``).
An optional ``split`` column fixes each row's split; without it the split is a
stable hash of ``input``. A ``split`` column with no ``validation`` row has its
validation split cut from the train rows by that hash (as for a hub dataset
lacking one), so the best checkpoint can still be chosen. Every problem a user can cause is one sentence that
names the file and, for a bad value, its line (``.jsonl``, ``.csv``) or row (``.parquet``). Values are checked by
``tasks.values``; a leading UTF-8 byte-order mark is accepted.
"""

import csv
import io
import json
import logging
import math
import os
from typing import Any, Callable

import datasets

from tasks.schema import COLUMNS, KINDS, SPLITS, split_of
from tasks.values import check_classes, regress_target

# File extension -> the Hugging Face ``datasets`` builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

FEATURES = {
    "generate": datasets.Features({"input": datasets.Value("string"), "target": datasets.Value("string")}),
    "classify": datasets.Features({"input": datasets.Value("string"), "label": datasets.Value("string")}),
    "regress": datasets.Features({"input": datasets.Value("string"), "value": datasets.Value("float32")}),
    "tag": datasets.Features({"input": datasets.Value("string"), "tags": datasets.Sequence(datasets.Value("string"))}),
}


def detect_kind(path: str, columns: list[str]) -> str:
    """Returns the one kind whose columns ``columns`` holds.

    Columns beyond the kind's own (and ``split``) are ignored, so a file may
    carry ids or notes.

    Raises:
      ValueError: the columns fit no kind, or more than one.
    """
    found = set(columns)
    kinds = [kind for kind in KINDS if set(COLUMNS[kind]) <= found]
    if len(kinds) != 1:
        accepted = "; ".join(f"{k}: {', '.join(COLUMNS[k])}" for k in KINDS)
        fit = "no kind" if not kinds else f"more than one kind ({', '.join(kinds)})"
        raise ValueError(
            f"Task file {path!r} has columns {sorted(found)}, which fit {fit}; "
            f"give exactly one of these column sets: {accepted}."
        )
    return kinds[0]


def load_task_file(path: str) -> tuple[str, Callable[[], datasets.DatasetDict]]:
    """Reads a user's task file and returns its kind and a loader.

    The file is read and checked now, so that a bad file stops a run before
    any training; the loader returns the result already built.

    Args:
      path: a ``.jsonl``, ``.csv`` or ``.parquet`` file, one example a row.

    Returns:
      ``(kind, load)``; ``load()`` gives a ``DatasetDict`` with the three
      splits and exactly the kind's columns.

    Raises:
      ValueError: the file is missing, empty, unreadable, of an unknown type,
        or its columns or values do not fit a kind.
    """
    table, lines = _read(path)
    kind = detect_kind(path, list(table))
    n = len(table["input"])

    def place(row: int) -> str:
        return f"on line {lines[row]}" if lines else f"in row {row + 1}"

    columns = {name: [_clean(path, name, place(row), v) for row, v in enumerate(table[name])] for name in COLUMNS[kind]}
    if kind == "tag":
        _check_tag_counts(path, columns["input"], columns["tags"], place)

    if "split" in table:
        splits = [_split_value(path, place(row), v) for row, v in enumerate(table["split"])]
        if "validation" not in splits:
            # As for a hub dataset without one: the validation split (which picks the best
            # checkpoint) is cut from the train rows by the same hash as a file without splits.
            splits = [
                "validation" if s == "train" and split_of(text) == "validation" else s
                for s, text in zip(splits, columns["input"])
            ]
    else:
        splits = [split_of(text) for text in columns["input"]]
    rows_of = {split: [i for i in range(n) if splits[i] == split] for split in SPLITS}
    if not rows_of["train"]:
        raise ValueError(f"Task file {path!r} has no rows in its train split; at least one is needed to train.")
    if kind == "classify":
        check_classes(columns["label"], f"Task file {path!r}")
    result = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {name: [values[i] for i in rows] for name, values in columns.items()},
                features=FEATURES[kind],
            )
            for split, rows in rows_of.items()
        }
    )
    return kind, lambda: result


def _read(path: str) -> tuple[dict[str, list[Any]], list[int] | None]:
    """Reads a file with Hugging Face ``datasets`` into columns of values.

    Returns:
      ``(columns, lines)``: ``lines[i]`` is the 1-based line of the file where
      row ``i`` starts (``None`` for ``.parquet``, whose rows have no lines).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in BUILDERS:
        raise ValueError(
            f"Task file {path!r} has extension {ext or '(none)'!r}; accepted extensions are .jsonl, .csv and .parquet."
        )
    if not os.path.isfile(path):
        raise ValueError(f"Task file {path!r} does not exist.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"Task file {path!r} is empty.")
    lines = None
    if ext in (".jsonl", ".json", ".csv"):
        text = _utf8_text(path)
        if ext == ".jsonl":
            return _read_json_lines(path, text)
        lines = _csv_lines(text) if ext == ".csv" else None
    logger = datasets.utils.logging.get_logger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # its parsers log each failure as ERROR lines before raising it
    try:
        dataset = datasets.load_dataset(BUILDERS[ext], data_files=os.path.abspath(path), split="train")
    except Exception as e:  # datasets raises many types; the user needs only the reason
        if "corresponds to no data" in str(e):  # how datasets reports a file of no rows
            raise ValueError(f"Task file {path!r} has no rows.") from e
        raise ValueError(f"Task file {path!r} could not be read as {ext}: {_root_reason(e)}.") from e
    finally:
        logger.setLevel(level)
    if dataset.num_rows == 0:
        raise ValueError(f"Task file {path!r} has no rows.")
    return dataset.to_dict(), lines if lines is not None and len(lines) == dataset.num_rows else None


def _csv_lines(text: str) -> list[int]:
    """The line each CSV record starts on, after the header (blank lines, which pandas skips, skipped)."""
    reader = csv.reader(io.StringIO(text))
    starts, line = [], 1
    for number, record in enumerate(reader):
        if record and number > 0:
            starts.append(line)
        line = reader.line_num + 1
    return starts


def _utf8_text(path: str) -> str:
    """The file's text less a leading byte-order mark, or a ValueError naming the line of its first non-UTF-8 byte."""
    data = open(path, "rb").read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"Task file {path!r} is not UTF-8 text: byte {data[e.start]:#04x} on line {line} "
            f"(byte offset {e.start}); save it as UTF-8."
        ) from None


def _read_json_lines(path: str, text: str) -> tuple[dict[str, list[Any]], list[int]]:
    """One JSON object a line, parsed here so an error names its line (blank lines are skipped)."""
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"Task file {path!r} has invalid JSON on line {number}, column {e.colno}: {e.msg}."
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"Task file {path!r} has a {type(row).__name__} on line {number}; a JSON object is accepted."
            )
        rows.append(row)
        lines.append(number)
    if not rows:
        raise ValueError(f"Task file {path!r} has no rows.")
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name) for row in rows] for name in names}, lines


def _root_reason(error: BaseException) -> str:
    """The first line of the innermost cause: datasets wraps the parser's own words."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__).rstrip(".")


def _clean(path: str, column: str, place: str, value: Any) -> Any:
    """Checks one cell (``place``: ``"on line 3"``, ``"in row 3"``) and converts it to its column's type."""
    if column == "value":
        return regress_target(value, f"Task file {path!r}", place)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"Task file {path!r} has an empty {column!r} {place}.")
    if column == "tags":
        # CSV cannot hold a list, so a whitespace-separated string is accepted too.
        if isinstance(value, str):
            return value.split()
        if isinstance(value, (list, tuple)):
            return [str(tag) for tag in value]
        raise ValueError(
            f"Task file {path!r} has tags {value!r} {place}; "
            f"a list or a whitespace-separated string is accepted."
        )
    # input, target, label are text; numeric labels (0/1 in a CSV) become text.
    if isinstance(value, (list, dict)):
        raise ValueError(f"Task file {path!r} has {column} {value!r} {place}; text is accepted.")
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape in JSON ("\ud800")
        raise ValueError(
            f"Task file {path!r} has a lone surrogate in its {column} {place}; text must be valid Unicode."
        ) from None
    return text


def _check_tag_counts(path: str, inputs: list[str], tags: list[list[str]], place: Callable[[int], str]) -> None:
    for row, (text, row_tags) in enumerate(zip(inputs, tags)):
        if len(text.split()) != len(row_tags):
            raise ValueError(
                f"Task file {path!r} has {len(row_tags)} tags for {len(text.split())} "
                f"tokens {place(row)}; one tag per whitespace-separated token is accepted."
            )


def _split_value(path: str, place: str, value: Any) -> str:
    if value not in SPLITS:
        raise ValueError(
            f"Task file {path!r} has split {value!r} {place}; accepted splits are {', '.join(SPLITS)}."
        )
    return value


HUB_PREFIX = "hf:"


def load_hub_task(spec: str) -> tuple[str, Callable[[], datasets.DatasetDict]]:
    """Reads a Hugging Face dataset named by ``hf:DATASET[:CONFIG][?COLUMN=SOURCE&...]``.

    ``DATASET`` is a hub name (``nyu-mll/glue``) or a local folder of data
    files; ``CONFIG`` its configuration (``sst2``). Each ``COLUMN=SOURCE``
    maps a column of ours (``input``, ``target``, ``label``, ``value``,
    ``tags``) to the dataset's, so ``hf:nyu-mll/glue:sst2?input=sentence``
    reads GLUE's SST-2 as a classify task. Integer class labels become their
    names. The dataset's own ``train``/``validation``/``test`` splits are kept
    (a missing validation or test split is cut from train by hash). Once
    downloaded, the cache serves it offline (``HF_DATASETS_OFFLINE=1``).

    Raises:
      ValueError: a malformed spec, a dataset that cannot be loaded (offline
        and not cached, say), or columns that fit no kind.
    """
    body, _, query = spec[len(HUB_PREFIX) :].partition("?")
    name, _, config = body.partition(":")
    ours_all = {c for cols in COLUMNS.values() for c in cols}
    mapping = {}
    for part in filter(None, query.split("&")):
        ours, sep, theirs = part.partition("=")
        if not sep or ours not in ours_all:
            raise ValueError(
                f"Hub task {spec!r} maps {part!r}; use COLUMN=SOURCE with COLUMN one of {', '.join(sorted(ours_all))}."
            )
        mapping[ours] = theirs
    if not name:
        raise ValueError(f"Hub task {spec!r} names no dataset; use hf:DATASET[:CONFIG][?input=COLUMN&...].")
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as e:  # the hub client raises many types; the user needs only the reason
        raise ValueError(
            f"Hub task {spec!r} could not be loaded: {_root_reason(e)} (offline, it must be cached)."
        ) from e
    if "train" not in loaded:
        raise ValueError(f"Hub task {spec!r} has no train split; it has {', '.join(loaded)}.")
    renamed = {}
    for split, dataset in loaded.items():
        for ours, theirs in mapping.items():
            if theirs not in dataset.column_names:
                raise ValueError(
                    f"Hub task {spec!r} maps {ours} to {theirs!r}, which is not among {dataset.column_names}."
                )
        labels = {
            t: dataset.features[t].names
            for t in dataset.column_names
            if isinstance(dataset.features[t], datasets.ClassLabel)
        }
        columns = {}
        for ours in ours_all:
            source = mapping.get(ours, ours)
            if source in dataset.column_names:
                values = dataset[source]
                columns[ours] = [labels[source][v] if v >= 0 else None for v in values] if source in labels else values
        renamed[split] = columns
    kind = detect_kind(spec, list(renamed["train"]))
    rows = {split: {c: [] for c in COLUMNS[kind]} for split in SPLITS}
    missing = {s for s in SPLITS if s not in loaded}  # cut from train by hash
    for split, columns in renamed.items():
        if split not in SPLITS:
            continue  # e.g. an "unsupervised" split
        for i in range(len(columns["input"])):
            cells = {c: columns[c][i] for c in COLUMNS[kind]}
            if any(v is None for v in cells.values()):
                continue  # unlabelled rows, as in GLUE's test splits
            target = split
            if split == "train" and split_of(cells["input"]) in missing:
                target = split_of(cells["input"])
            for c in COLUMNS[kind]:
                rows[target][c].append(_clean(spec, c, f"in row {i + 1} of its {split} split", cells[c]))
    if kind == "classify":
        check_classes([label for split in SPLITS for label in rows[split]["label"]], f"Hub task {spec!r}")
    result = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows[s], features=FEATURES[kind]) for s in SPLITS})
    if result["train"].num_rows == 0:
        raise ValueError(f"Hub task {spec!r} has no labelled rows in its train split.")
    return kind, lambda: result
