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
import dataclasses
import functools
import io
import json
import json.scanner
import math
import os
from typing import Any, Callable, Iterator

import datasets
import pyarrow.parquet as pq

from tasks.schema import COLUMNS, KINDS, SPLITS, split_of
from tasks.values import check_classes, regress_target

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


BATCH_ROWS = 1 << 16  # rows a reader yields at once: its memory, whatever the file's size
BAD_ROWS_SHOWN = 10  # bad rows reported one by one; the rest are counted


def load_task_file(path: str) -> tuple[str, Callable[[], datasets.DatasetDict]]:
    """Opens a user's task file and returns its kind and a loader.

    Only the file's start is read now (its columns decide the kind); ``load()``
    reads and checks every row (``TaskFile.batches``) into a ``DatasetDict``
    held in memory, for small files and tests. Training reads a file through
    ``tasks.cache.cached_file`` instead, a batch at a time.

    Args:
      path: a ``.jsonl``, ``.csv`` or ``.parquet`` file, one example a row.

    Returns:
      ``(kind, load)``; ``load()`` gives a ``DatasetDict`` with the three
      splits and exactly the kind's columns.

    Raises:
      ValueError: the file is missing, empty, unreadable, of an unknown type,
        or its columns do not fit a kind; ``load()`` also for a bad row.
    """
    task_file = TaskFile.open(path)
    return task_file.kind, functools.cache(task_file.load)


@dataclasses.dataclass(frozen=True)
class TaskFile:
    """A user's task file: its kind, from its columns, and its rows, read again a batch at a time.

    Attributes:
      path: the file.
      kind: the task kind its columns fit.
      has_split: whether it has a ``split`` column.
      size: its bytes, the unit of ``batches``' progress.
    """

    path: str
    kind: str
    has_split: bool
    size: int

    @classmethod
    def open(cls, path: str) -> "TaskFile":
        """Checks the file's type and reads its first rows' columns (raises ValueError naming the file)."""
        ext = os.path.splitext(path)[1].lower()
        if ext not in READERS:
            raise ValueError(
                f"Task file {path!r} has extension {ext or '(none)'!r}; "
                "accepted extensions are .jsonl, .csv and .parquet."
            )
        if not os.path.isfile(path):
            raise ValueError(f"Task file {path!r} does not exist.")
        size = os.path.getsize(path)
        if size == 0:
            raise ValueError(f"Task file {path!r} is empty.")
        first = next(READERS[ext](path, 1 << 10), None)
        if first is None:
            raise ValueError(f"Task file {path!r} has no rows.")
        kind = detect_kind(path, list(first.columns))
        return cls(path, kind, "split" in first.columns, size)

    def batches(self, warn: Callable[[str], None] | None = None) -> Iterator[tuple[dict[str, list], list[str], int]]:
        """The file's checked rows, a batch at a time: ``(columns, splits, bytes read)``.

        ``columns`` holds ``input`` and the kind's column, converted
        (``_clean``); ``splits`` each row's split, where ``"train?"`` marks a
        train row whose hash says validation in a file with a ``split``
        column: validation if no row of the file says validation, else train.

        A bad row (an empty or wrong value, tags that do not match the words,
        an unknown split) stops the file: its first ``BAD_ROWS_SHOWN`` are
        each passed to ``warn`` with the file and line, the reading goes on to
        count the rest (yielding nothing more), and a ValueError then names
        the first and the count, before training starts.

        Raises:
          ValueError: a file that cannot be parsed, bad rows, no train rows, or
            a classify file of fewer than two labels.
        """
        path, kind, names = self.path, self.kind, COLUMNS[self.kind]
        first_bad, bad, train, labels = None, 0, 0, set()
        for raw in READERS[os.path.splitext(path)[1].lower()](path, BATCH_ROWS):
            columns = {name: [] for name in names}
            splits = []
            values = [raw.columns.get(name) for name in names]
            split_values = raw.columns.get("split")
            for i in range(raw.rows):
                place = raw.place(i)
                try:
                    cells = [
                        _clean(path, name, place, column[i] if column is not None else None)
                        for name, column in zip(names, values)
                    ]
                    if kind == "tag":
                        _check_tag_count(path, cells[0], cells[1], place)
                    split = split_of(cells[0])
                    if split_values is not None:
                        given = _split_value(path, place, split_values[i])
                        split = "train?" if given == "train" and split == "validation" else given
                except ValueError as e:
                    bad += 1
                    first_bad = first_bad or str(e)
                    if warn and bad <= BAD_ROWS_SHOWN:
                        warn(str(e))
                    continue
                if bad:
                    continue  # checked and counted only: the file will not be used
                for name, cell in zip(names, cells):
                    columns[name].append(cell)
                splits.append(split)
                train += split in ("train", "train?")
                if kind == "classify":
                    labels.add(cells[1])
            if not bad:
                yield columns, splits, raw.done
        if bad:
            more = f"; {bad} bad rows in all (the first {BAD_ROWS_SHOWN} are named above)" if bad > 1 else ""
            raise ValueError(f"{first_bad.rstrip('.')}{more}; fix or remove them and run again.")
        if not train:
            raise ValueError(f"Task file {path!r} has no rows in its train split; at least one is needed to train.")
        if kind == "classify":
            check_classes(labels, f"Task file {path!r}")

    def load(self) -> datasets.DatasetDict:
        """Every row, checked, in memory: the three splits with exactly the kind's columns."""
        names = COLUMNS[self.kind]
        columns = {name: [] for name in names}
        splits = []
        for batch, batch_splits, _ in self.batches():
            for name in names:
                columns[name] += batch[name]
            splits += batch_splits
        held = "validation" if "validation" not in splits else "train"
        splits = [held if s == "train?" else s for s in splits]
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict(
                    {name: [v for v, s in zip(values, splits) if s == split] for name, values in columns.items()},
                    features=FEATURES[self.kind],
                )
                for split in SPLITS
            }
        )


@dataclasses.dataclass
class _RawBatch:
    """Rows as parsed, before any check: columns of values, and where each row is in the file."""

    columns: dict[str, list[Any]]
    rows: int
    done: int  # bytes of the file read so far
    lines: list[int] | None = None  # each row's line (text files); else rows count from ``first_row``
    first_row: int = 0

    def place(self, i: int) -> str:
        return f"on line {self.lines[i]}" if self.lines is not None else f"in row {self.first_row + i + 1}"


def _text_blocks(path: str, block: int = 1 << 22) -> Iterator[tuple[str, int, int]]:
    """The file's UTF-8 text in blocks of whole lines: ``(text, lines before it, bytes read)``.

    A leading byte-order mark is dropped. A byte that is not UTF-8 is a
    ValueError naming its line and byte offset.
    """
    lines = offset = 0
    rest = b""
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            chunk = rest + data
            if data:
                cut = chunk.rfind(b"\n") + 1
                if cut == 0:  # a line longer than a block: read on
                    rest = chunk
                    continue
                chunk, rest = chunk[:cut], chunk[cut:]
            elif not chunk:
                return
            else:
                rest = b""
            skip = 3 if offset == 0 and chunk.startswith(b"\xef\xbb\xbf") else 0
            try:
                text = chunk[skip:].decode("utf-8")
            except UnicodeDecodeError as e:
                at = e.start + skip
                line = lines + chunk.count(b"\n", 0, at) + 1
                raise ValueError(
                    f"Task file {path!r} is not UTF-8 text: byte {chunk[at]:#04x} on line {line} "
                    f"(byte offset {offset + at}); save it as UTF-8."
                ) from None
            offset += len(chunk)
            yield text, lines, offset
            lines += chunk.count(b"\n")
            if not data:
                return


def _read_json_lines(path: str, batch_rows: int) -> Iterator[_RawBatch]:
    """One JSON object a line, parsed here so an error names its line (blank lines are skipped)."""
    rows, lines, seen = [], [], False
    for text, before, done in _text_blocks(path):
        for number, line in enumerate(text.split("\n"), before + 1):
            if not line.strip():
                continue
            try:
                row = _parse_json(line)
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
            if len(rows) == batch_rows:
                yield _json_batch(rows, lines, done)
                rows, lines, seen = [], [], True
    if rows:
        yield _json_batch(rows, lines, os.path.getsize(path))
    elif not seen:
        raise ValueError(f"Task file {path!r} has no rows.")


_SCAN = json.scanner.make_scanner(json.JSONDecoder())  # the C scanner json.loads calls, without its wrappers


def _parse_json(line: str) -> Any:
    """``json.loads(line)``, a third of its time: the scanner is called directly; a line it refuses gets json.loads's
    own error."""
    text = line.strip(" \t\r\n")  # JSON's whitespace, no other
    try:
        value, end = _SCAN(text, 0)
        if end == len(text):
            return value
    except (StopIteration, json.JSONDecodeError):
        pass
    return json.loads(line)  # raises, naming the column


def _json_batch(rows: list[dict], lines: list[int], done: int) -> _RawBatch:
    names = dict.fromkeys(name for row in rows for name in row)
    return _RawBatch({name: [row.get(name) for row in rows] for name in names}, len(rows), done, lines)


def _read_csv(path: str, batch_rows: int) -> Iterator[_RawBatch]:
    """A header, then one record a row; an empty cell is a missing value, every other cell text."""
    state = {"done": 0}

    def text_lines() -> Iterator[str]:
        for text, _, done in _text_blocks(path):
            state["done"] = done
            yield from io.StringIO(text, newline="")  # lines end at \n, \r or \r\n, as the csv module wants

    reader = csv.reader(text_lines())
    header, line = None, 1
    records, lines = [], []
    try:
        for record in reader:
            start, line = line, reader.line_num + 1
            if not record:
                continue  # a blank line
            if header is None:
                header = record
                continue
            records.append(record)
            lines.append(start)
            if len(records) == batch_rows:
                yield _csv_batch(header, records, lines, state["done"])
                records, lines = [], []
    except csv.Error as e:
        raise ValueError(f"Task file {path!r} could not be read as .csv on line {reader.line_num}: {e}.") from None
    if records:
        yield _csv_batch(header, records, lines, state["done"])
    elif header is None or not lines:
        raise ValueError(f"Task file {path!r} has no rows.")


def _csv_batch(header: list[str], records: list[list[str]], lines: list[int], done: int) -> _RawBatch:
    columns = {name: [(r[j] if j < len(r) and r[j] != "" else None) for r in records] for j, name in enumerate(header)}
    return _RawBatch(columns, len(records), done, lines)


def _read_parquet(path: str, batch_rows: int) -> Iterator[_RawBatch]:
    """Row groups a batch at a time; rows are named by their number (a Parquet file has no lines)."""
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types; the user needs only the reason
        raise ValueError(f"Task file {path!r} could not be read as .parquet: {_root_reason(e)}.") from None
    total, size, first = parquet.metadata.num_rows, os.path.getsize(path), 0
    if total == 0:
        raise ValueError(f"Task file {path!r} has no rows.")
    for batch in parquet.iter_batches(batch_size=batch_rows):
        columns = batch.to_pydict()
        yield _RawBatch(columns, batch.num_rows, size * (first + batch.num_rows) // total, None, first)
        first += batch.num_rows


READERS = {".jsonl": _read_json_lines, ".json": _read_json_lines, ".csv": _read_csv, ".parquet": _read_parquet}


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
            f"Task file {path!r} has tags {value!r} {place}; " f"a list or a whitespace-separated string is accepted."
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


def _check_tag_count(path: str, text: str, tags: list[str], place: str) -> None:
    if len(text.split()) != len(tags):
        raise ValueError(
            f"Task file {path!r} has {len(tags)} tags for {len(text.split())} "
            f"tokens {place}; one tag per whitespace-separated token is accepted."
        )


def _split_value(path: str, place: str, value: Any) -> str:
    if value not in SPLITS:
        raise ValueError(f"Task file {path!r} has split {value!r} {place}; accepted splits are {', '.join(SPLITS)}.")
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
