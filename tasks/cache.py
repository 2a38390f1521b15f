"""The tokenized-data cache: a task file checked and tokenized once, then memory-mapped by every start.

A task file of ten million rows takes minutes to tokenize and gigabytes to
hold as padded arrays; here it is tokenized in one streaming pass into flat
files (Levanter's jagged layout: every example's tokens end to end, and an
``offsets`` array of where each starts), which training memory-maps, so its
memory does not grow with the rows and a second start, a resume or an
evaluation only opens them.

One folder per cache entry, named by a key of the file's content, the task's
kind, the tokenizer and this format's version: a changed file or tokenizer is
another key, so it is rebuilt; an unchanged one is reused however it is named
or wherever it lies. The folder is written under a temporary name and renamed
when whole, its ``COMPLETED`` marker last: a second process building the same
key waits on a lock and then reuses it, and an interrupted build (Ctrl-C, a
full disk) leaves no folder behind.

Each split is a set of raw little-endian arrays ``SPLIT.NAME.bin`` whose dtype
and length ``meta.json`` records:

    tokens       uint16 or int32 [T]   every example's sequence (``tasks.data.encode_rows``)
    offsets      int64 [N+1]           example i is tokens[offsets[i]:offsets[i+1]]
    prefix       int32 [N]             generate: the prompt's length
    label        int32 [N]             classify: the index in the sorted labels
    value        float32 [N]           regress: the target
    tags         int32 [T]             tag: the tag at each word's last token, -1 elsewhere
    word_tags    int32 [W], word_offsets int64 [N+1]   tag: each word's tag, for evaluation
    input_text   uint8 [bytes], input_offsets int64 [N+1]   validation, test: the raw input
    target_text  uint8 [bytes], target_offsets int64 [N+1]  generate's validation, test: the raw target
"""

from __future__ import annotations

import collections.abc
import dataclasses
import errno
import fcntl
import json
import os
import pathlib
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import xxhash

from tasks.data import EncodedSplit, encode_rows, token_dtype
from tasks.schema import SPLITS
from tasks.tokenizer import ByteTokenizer, Tokenizer
from tasks.user_files import TaskFile

FORMAT = 1  # bump when the files or their meaning change: every old entry becomes another key
COMPLETED = "COMPLETED"
META = "meta.json"
HELD_OUT = "train?"  # train rows whose hash says validation: validation if the file has none, else train (TaskFile)
_TEXT_SPLITS = ("validation", "test", HELD_OUT)  # the splits evaluation reads raw text from
_REFERENCE_TEXT = ("generate",)  # kinds whose reference is text of its own


def digest_file(path: str | os.PathLike) -> str:
    """A 128-bit digest of a file's bytes, read in 4 MiB blocks (about 0.4 s a GB)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def tokenizer_key(tokenizer: Tokenizer) -> str:
    """What of a tokenizer decides its ids: its vocabulary and rules, special ids and prompt template."""
    if isinstance(tokenizer, ByteTokenizer):
        return "bytes"
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if fingerprint is None:
        raise ValueError(f"tokenizer {tokenizer!r} has no fingerprint(); the data cache cannot key it")
    return fingerprint()


def cache_key(source: str, kind: str, tokenizer: Tokenizer, spec: str = "") -> str:
    """The entry's name: a digest of the source's content digest, the kind, the task spec and the tokenizer."""
    parts = {"format": FORMAT, "source": source, "kind": kind, "spec": spec, "tokenizer": tokenizer_key(tokenizer)}
    return xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True).encode())


@dataclasses.dataclass
class Cached:
    """A complete cache entry: its folder and what ``meta.json`` says of it."""

    path: pathlib.Path
    meta: dict

    @property
    def size(self) -> int:
        """Bytes on disk."""
        return sum(f.stat().st_size for f in self.path.iterdir())

    def splits(self, max_len: int, task_id: int, pad_id: int) -> dict[str, EncodedSplit]:
        """The entry's splits, memory-mapped, as ``EncodedSplit``s."""
        labels = tuple(self.meta["labels"])
        out = {}
        for split in SPLITS:
            arrays = {
                name: _map(self.path / f"{split}.{name}.bin", *info)
                for name, info in self.meta["splits"][split].items()
            }
            store = {k: v for k, v in arrays.items() if not k.startswith(("input_", "target_", "word_"))}
            inputs = references = None
            if "input_text" in arrays:
                inputs = _Texts(arrays["input_text"], arrays["input_offsets"])
                references = _references(self.meta["kind"], arrays, labels)
            out[split] = EncodedSplit(
                self.meta["kind"],
                store,
                labels,
                pad_id=pad_id,
                max_len=max_len,
                task_id=task_id,
                inputs=inputs,
                references=references,
            )
        return out


def find(root: str | os.PathLike, key: str) -> Cached | None:
    """The complete entry of ``key`` under ``root``, or None."""
    path = pathlib.Path(root) / key
    if (path / COMPLETED).exists():
        return Cached(path, json.loads((path / META).read_text()))
    return None


class CacheBuild:
    """Writes one entry: ``add`` each batch of rows, then ``finish``; used as a context manager.

    Entered, it holds the key's lock and writes into a temporary folder beside
    the entry; ``finish`` sorts the labels, writes ``meta.json`` and
    ``COMPLETED`` and renames the folder into place. Leaving the ``with``
    without ``finish`` (an error, Ctrl-C) removes the temporary folder.

    Args:
      root: the cache folder (``mtl.cache_dir.data_dir()``).
      key: the entry's ``cache_key``.
      kind: the task kind.
      tokenizer: the run's tokenizer.
    """

    def __init__(self, root: str | os.PathLike, key: str, kind: str, tokenizer: Tokenizer):
        self.root, self.key, self.kind, self.tokenizer = pathlib.Path(root), key, kind, tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.rows = self.tokens = 0
        self._labels: dict[str, int] = {}  # label -> provisional id, in order of first sight
        self._lock = None
        self._tmp: pathlib.Path | None = None
        self._writers: dict[str, _SplitWriter] = {}

    def __enter__(self) -> CacheBuild:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.root / f".{self.key}.lock", "w")
        except OSError as e:
            raise ValueError(
                f"the data cache {str(self.root)!r} cannot be written: {e.strerror}; set --cache-dir or MTL_CACHE_DIR"
            ) from None
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # a second builder of this key waits here, then finds it built
        if find(self.root, self.key) is None:
            for stale in self.root.glob(f".{self.key}.*.tmp"):  # left by a build that was killed (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            self._tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.key}.", suffix=".tmp", dir=self.root))
        return self

    @property
    def needed(self) -> bool:
        """False when another process finished the entry while this one waited for the lock."""
        return self._tmp is not None

    def add(self, columns: dict[str, list], splits: list[str]) -> None:
        """Encodes and appends one batch of checked rows: ``input`` and the kind's column, and each row's split."""
        if not splits:
            return
        encoded = encode_rows(self.kind, columns, self.tokenizer, self._label_id, self.dtype)
        starts = np.cumsum(encoded.lengths) - encoded.lengths
        split_of_row = np.asarray(splits)
        for split in dict.fromkeys(splits):
            here = np.flatnonzero(split_of_row == split)
            writer = self._writers.get(split)
            if writer is None:
                writer = self._writers[split] = _SplitWriter(self._tmp, split, self.kind, self.dtype)
            writer.add(encoded, starts, here, columns)
        self.rows += len(splits)
        self.tokens += len(encoded.tokens)

    def _label_id(self, label: str) -> int:
        return self._labels.setdefault(label, len(self._labels))

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels (classify) or tags (tag) seen so far, sorted."""
        return tuple(sorted(self._labels))

    def finish(self, source: dict) -> Cached:
        """Completes the entry and renames it into place; ``source`` (the file's name, say) goes into meta.json."""
        for writer in self._writers.values():
            writer.close()
        held = self._writers.pop(HELD_OUT, None)
        for split in SPLITS:
            if split not in self._writers:
                self._writers[split] = _SplitWriter(self._tmp, split, self.kind, self.dtype)
                self._writers[split].close()
        if held is not None:  # no validation rows in the file: its hash cuts them from train
            if self._writers["validation"].rows == 0:
                held.rename("validation")
                self._writers["validation"] = held
            else:
                self._writers["train"].append(held)
        labels = self.labels
        if self._labels:
            order = np.empty(len(labels), np.int32)  # provisional id -> sorted id
            rank = {label: i for i, label in enumerate(labels)}
            for label, provisional in self._labels.items():
                order[provisional] = rank[label]
            for writer in self._writers.values():
                writer.relabel(order)
        meta = {
            "format": FORMAT,
            "kind": self.kind,
            "labels": list(labels),
            "rows": self.rows,
            "tokens": self.tokens,
            "tokenizer": repr(self.tokenizer),
            "source": source,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "splits": {split: self._writers[split].arrays() for split in SPLITS},
        }
        (self._tmp / META).write_text(json.dumps(meta, indent=1))
        (self._tmp / COMPLETED).write_text("")
        final = self.root / self.key
        if final.exists():  # an entry without COMPLETED (damaged by hand): ours replaces it
            shutil.rmtree(final)
        os.rename(self._tmp, final)
        self._tmp = None
        return Cached(final, meta)

    def __exit__(self, *exc) -> None:
        try:
            if self._tmp is not None:
                for writer in self._writers.values():
                    writer.close()
                shutil.rmtree(self._tmp, ignore_errors=True)
        finally:
            if self._lock is not None:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
                self._lock.close()
        if exc[0] is not None and isinstance(exc[1], OSError) and exc[1].errno in (errno.ENOSPC, errno.EDQUOT):
            raise ValueError(
                f"the disk of the data cache {str(self.root)!r} is full; free some space or set --cache-dir"
            ) from None


class _SplitWriter:
    """Appends one split's arrays to raw files."""

    def __init__(self, folder: pathlib.Path, split: str, kind: str, dtype: np.dtype):
        self.folder, self.split, self.kind = folder, split, kind
        self.rows = 0
        self._ends: dict[str, int] = {}  # running ends of each jagged array: its next offset
        self._files: dict[str, object] = {}
        self._dtypes: dict[str, np.dtype] = {"tokens": dtype}
        self._texts = split in _TEXT_SPLITS
        for offsets in self._offset_names():
            self._write(offsets, np.zeros(1, np.int64))

    def _offset_names(self) -> list[str]:
        names = ["offsets"]
        if self.kind == "tag":
            names.append("word_offsets")
        if self._texts:
            names.append("input_offsets")
            if self.kind in _REFERENCE_TEXT:
                names.append("target_offsets")
        return names

    def _write(self, name: str, values: np.ndarray) -> None:
        if name not in self._files:
            self._files[name] = open(self.folder / f"{self.split}.{name}.bin", "ab")
            self._dtypes.setdefault(name, values.dtype)
        self._files[name].write(np.ascontiguousarray(values, dtype=self._dtypes[name]).tobytes())

    def _jagged(self, name: str, offsets: str, flat: np.ndarray, lengths: np.ndarray) -> None:
        end = self._ends.get(offsets, 0)
        self._write(name, flat)
        self._write(offsets, end + np.cumsum(lengths))
        self._ends[offsets] = end + int(lengths.sum())

    def add(self, encoded, starts: np.ndarray, here: np.ndarray, columns: dict[str, list]) -> None:
        """Appends the rows ``here`` of one encoded batch."""
        lengths = encoded.lengths[here]
        source = np.repeat(starts[here], lengths) + (
            np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        )
        self._jagged("tokens", "offsets", encoded.tokens[source], lengths)
        for name, values in encoded.columns.items():
            if name == "tags":
                self._write(name, values[source])
            elif name == "word_tags":
                counts = encoded.columns["word_counts"]
                word_starts = np.cumsum(counts) - counts
                picked = np.repeat(word_starts[here], counts[here]) + (
                    np.arange(int(counts[here].sum())) - np.repeat(np.cumsum(counts[here]) - counts[here], counts[here])
                )
                self._jagged("word_tags", "word_offsets", values[picked], counts[here])
            elif name != "word_counts":
                self._write(name, values[here])
        if self._texts:
            texts = [("input", "input")] + ([("target", "target")] if self.kind in _REFERENCE_TEXT else [])
            for column, name in texts:
                raw = [columns[column][i].encode("utf-8") for i in here]
                lens = np.fromiter(map(len, raw), np.int64, count=len(raw))
                self._jagged(f"{name}_text", f"{name}_offsets", np.frombuffer(b"".join(raw), np.uint8), lens)
        self.rows += len(here)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def arrays(self) -> dict[str, list]:
        """name -> [dtype, length], as meta.json records them."""
        out = {}
        for path in sorted(self.folder.glob(f"{glob_escape(self.split)}.*.bin")):
            name = path.name[len(self.split) + 1 : -len(".bin")]
            dtype = self._dtypes[name]
            out[name] = [dtype.str, path.stat().st_size // dtype.itemsize]
        return out

    def rename(self, split: str) -> None:
        for path in self.folder.glob(f"{glob_escape(self.split)}.*.bin"):
            path.rename(self.folder / (split + path.name[len(self.split) :]))
        self.split = split

    def append(self, other: _SplitWriter) -> None:
        """Appends another closed split's rows to this closed one's files, then removes them."""
        for path in sorted(self.folder.glob(f"{glob_escape(other.split)}.*.bin")):
            name = path.name[len(other.split) + 1 : -len(".bin")]
            mine = self.folder / f"{self.split}.{name}.bin"
            if name not in self._dtypes:  # text arrays only the other kept: train keeps none
                path.unlink()
                continue
            dtype = self._dtypes[name]
            with open(mine, "ab") as out:
                if name.endswith("offsets"):
                    base = np.fromfile(mine, dtype=dtype)[-1] if mine.stat().st_size else 0
                    tail = np.fromfile(path, dtype=dtype)[1:] + base  # its leading 0 is our last end
                    out.write(tail.astype(dtype).tobytes())
                else:
                    with open(path, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 22)
            path.unlink()
        self.rows += other.rows

    def relabel(self, order: np.ndarray) -> None:
        """Rewrites provisional label ids as sorted ones, a chunk at a time."""
        for name in ("label", "tags", "word_tags"):
            path = self.folder / f"{self.split}.{name}.bin"
            if not path.exists() or path.stat().st_size == 0:
                continue
            ids = np.memmap(path, dtype=np.int32, mode="r+")
            for start in range(0, len(ids), 1 << 22):
                chunk = ids[start : start + (1 << 22)]
                ids[start : start + (1 << 22)] = np.where(chunk >= 0, order[np.maximum(chunk, 0)], chunk)
            ids.flush()
            del ids


def glob_escape(text: str) -> str:
    return text.replace("?", "[?]")


def _map(path: pathlib.Path, dtype: str, length: int) -> np.ndarray:
    """A read-only memory map of a raw array (an empty array for an empty file, which mmap refuses)."""
    if length == 0:
        return np.empty(0, dtype=np.dtype(dtype))
    return np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=(length,))


class _Texts(collections.abc.Sequence):
    """Texts stored as UTF-8 bytes end to end, decoded one at a time."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self._data, self._offsets = data, offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self._data[self._offsets[i] : self._offsets[i + 1]]).decode("utf-8")


class _References(collections.abc.Sequence):
    def __init__(self, n: int, get: Callable[[int], object]):
        self._n, self._get = n, get

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        return self._get(int(i))


def _references(kind: str, arrays: dict[str, np.ndarray], labels: Sequence[str]) -> Sequence:
    n = len(arrays["offsets"]) - 1
    if kind == "generate":
        return _Texts(arrays["target_text"], arrays["target_offsets"])
    if kind == "classify":
        return _References(n, lambda i: labels[arrays["label"][i]])
    if kind == "regress":
        return _References(n, lambda i: float(arrays["value"][i]))
    words, offsets = arrays["word_tags"], arrays["word_offsets"]
    return _References(n, lambda i: [labels[t] for t in words[offsets[i] : offsets[i + 1]]])


def file_key(task_file: TaskFile, tokenizer: Tokenizer) -> str:
    """The entry key of a task file read with a tokenizer (reads the whole file once, for its digest)."""
    return cache_key(digest_file(task_file.path), task_file.kind, tokenizer)


def cached_file(
    task_file: TaskFile,
    tokenizer: Tokenizer,
    root: str | os.PathLike,
    progress: Callable[[int, int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[Cached, bool]:
    """The cache entry of a task file with a tokenizer: found, or built (``build_file``).

    Returns:
      ``(entry, built)``: ``built`` is False when the entry was already there.
    """
    key = file_key(task_file, tokenizer)
    if (entry := find(root, key)) is not None:
        return entry, False
    return build_file(task_file, key, tokenizer, root, progress, warn)


def build_file(
    task_file: TaskFile,
    key: str,
    tokenizer: Tokenizer,
    root: str | os.PathLike,
    progress: Callable[[int, int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[Cached, bool]:
    """Checks and tokenizes a task file in one streaming pass into the entry ``key``.

    Args:
      task_file: the opened file (``tasks.user_files.TaskFile``).
      key: its ``file_key``.
      tokenizer: the run's tokenizer.
      root: the cache folder.
      progress: called after each batch with (bytes read, the file's bytes, rows so far).
      warn: called with each of the first bad rows (file and line).

    Returns:
      ``(entry, built)``: ``built`` is False when another process built it while this one waited.

    Raises:
      ValueError: a bad file or row, a cache folder that cannot be written, a full disk.
    """
    _check_space(root, task_file.size, tokenizer)
    # One batch is encoded and written on a second thread while the next is read and checked: a Hugging Face
    # tokenizer encodes on every core without the GIL, so the reading no longer leaves a core idle. The pool
    # is left (its thread finished) before the build is, so an interrupted build's folder is removed last.
    with CacheBuild(root, key, task_file.kind, tokenizer) as build, ThreadPoolExecutor(1) as encoder:
        if not build.needed:
            return find(root, key), False
        pending, rows = None, 0
        for columns, splits, done in task_file.batches(warn):
            if pending is not None:
                pending.result()
            pending = encoder.submit(build.add, columns, splits)
            rows += len(splits)
            if progress:
                progress(done, task_file.size, rows)
        if pending is not None:
            pending.result()
        return build.finish({"file": os.path.abspath(task_file.path), "bytes": task_file.size}), True


def _check_space(root: str | os.PathLike, size: int, tokenizer: Tokenizer) -> None:
    """Refuses a build the disk cannot hold: a token a byte at most (bytes), in 2 or 4 bytes, plus offsets."""
    need = size * token_dtype(tokenizer.vocab_size).itemsize + size // 4
    probe = pathlib.Path(root)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise ValueError(
            f"the data cache {str(root)!r} has {free / 2**30:.1f} GiB free, and tokenizing "
            f"{size / 2**30:.2f} GiB of text may need {need / 2**30:.1f} GiB; free some space or set --cache-dir"
        )
