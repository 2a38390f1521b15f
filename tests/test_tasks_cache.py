"""tasks.cache: a task file tokenized once into memory-mapped files, reused, rebuilt, never half-written."""

import json
import pathlib
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import tasks
from tasks import ByteTokenizer, cache, encode_split, labels_of, packing, user_files
from tasks.user_files import TaskFile

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()
RNG = np.random.default_rng(0)
WORDS = ["apple", "brick", "cloud", "dance", "eagle", "flame", "grape", "house", "ivory", "jelly", "koala", "été"]


def rows_of(kind: str, n: int = 300) -> list[dict]:
    out = []
    for i in range(n):
        text = " ".join(RNG.choice(WORDS, RNG.integers(1, 5)))
        out.append(
            {
                "generate": {"input": text, "target": text[::-1] + f" {i}"},
                "classify": {"input": f"{text} {i}", "label": f"c{i % 3}"},
                "regress": {"input": f"{text} {i}", "value": float(i) / 7},
                "tag": {"input": f"{text} {i}", "tags": ["W"] * len(text.split()) + ["N"]},
            }[kind]
        )
    return out


def write(path: pathlib.Path, rows: list[dict]) -> TaskFile:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TaskFile.open(str(path))


@pytest.mark.parametrize("kind", ["generate", "classify", "regress", "tag"])
def test_cached_splits_hold_exactly_the_in_memory_encoding(tmp_path, kind):
    task_file = write(tmp_path / "t.jsonl", rows_of(kind))
    entry, built = cache.cached_file(task_file, TOK, tmp_path / "cache")
    assert built and (entry.path / cache.COMPLETED).exists()
    loaded = task_file.load()
    labels = labels_of(loaded)
    assert tuple(entry.meta["labels"]) == labels
    longest = int(np.diff(entry.splits(10_000, 0, 0)["train"].store["offsets"]).max())
    max_len = longest - 6  # the longest rows are dropped, alike
    cached = entry.splits(max_len=max_len, task_id=3, pad_id=TOK.pad_id)
    for split in tasks.SPLITS:
        memory = encode_split(kind, loaded[split], TOK, max_len, labels=labels or None, task_id=3)
        assert len(cached[split]) == len(memory) and cached[split].dropped == memory.dropped
        assert cached[split].length == memory.length
        for name, array in memory.arrays.items():
            np.testing.assert_array_equal(cached[split].arrays[name], array, err_msg=f"{split} {name}")
        picks = np.array([len(memory) - 1, 0, 2])
        for name, array in memory.batch(picks).items():
            np.testing.assert_array_equal(cached[split].batch(picks)[name], array)
        if split != "train":  # evaluation reads the raw inputs and references
            assert list(cached[split].inputs) == memory.inputs
            assert list(cached[split].references) == memory.references
    assert cached["train"].dropped > 0  # the test covers the index of kept rows


def test_a_second_start_reuses_the_entry_and_a_changed_file_or_tokenizer_rebuilds_it(tmp_path):
    from tasks.hf_tokenizer import HFTokenizer
    from tests.hf_fixtures import train_bpe

    root = tmp_path / "cache"
    task_file = write(tmp_path / "t.jsonl", rows_of("classify"))
    first, built = cache.cached_file(task_file, TOK, root)
    again, built_again = cache.cached_file(TaskFile.open(str(tmp_path / "t.jsonl")), TOK, root)
    assert built and not built_again and again.path == first.path
    # The same bytes under another name are the same entry; one changed byte is another.
    (tmp_path / "copy.jsonl").write_bytes((tmp_path / "t.jsonl").read_bytes())
    assert cache.cached_file(TaskFile.open(str(tmp_path / "copy.jsonl")), TOK, root) == (first, False)
    changed = write(tmp_path / "t.jsonl", rows_of("classify")[:-1])
    rebuilt, built = cache.cached_file(changed, TOK, root)
    assert built and rebuilt.path != first.path and rebuilt.meta["rows"] == first.meta["rows"] - 1
    hf = HFTokenizer.from_folder(train_bpe(str(tmp_path / "tok")))
    other, built = cache.cached_file(changed, hf, root)
    assert built and other.path not in (first.path, rebuilt.path)
    split = other.splits(64, 0, hf.pad_id)["validation"]
    np.testing.assert_array_equal(
        split.batch([0])["tokens"][0, : split.lengths_of([0])[0]], hf.prompt_ids(split.inputs[0])
    )


def test_an_interrupted_build_leaves_no_entry_and_the_next_start_builds_it(tmp_path, monkeypatch):
    monkeypatch.setattr(user_files, "BATCH_ROWS", 50)
    root = tmp_path / "cache"
    task_file = write(tmp_path / "t.jsonl", rows_of("generate"))

    def interrupt(done, total, rows):
        if rows >= 100:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the pass

    with pytest.raises(KeyboardInterrupt):
        cache.cached_file(task_file, TOK, root, progress=interrupt)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []  # no entry, no temporary folder
    entry, built = cache.cached_file(task_file, TOK, root)
    assert built and entry.meta["rows"] == 300


def test_a_build_killed_outright_is_cleaned_up_by_the_next(tmp_path):
    root = tmp_path / "cache"
    task_file = write(tmp_path / "t.jsonl", rows_of("regress"))
    key = cache.cache_key(cache.digest_file(task_file.path), "regress", TOK)
    (root / f".{key}.x.tmp").mkdir(parents=True)  # what SIGKILL mid-build leaves
    (root / key).mkdir()  # an entry without COMPLETED: damaged, never used
    (root / key / "train.tokens.bin").write_bytes(b"junk")
    entry, built = cache.cached_file(task_file, TOK, root)
    assert built and entry.path == root / key and sorted(p.name for p in root.iterdir()) == [f".{key}.lock", key]


def test_two_processes_building_one_entry_share_it(tmp_path):
    path = tmp_path / "t.jsonl"
    write(path, rows_of("tag", 3000))
    script = (
        "import sys, tasks; from tasks.user_files import TaskFile; "
        f"entry, built = tasks.cache.cached_file(TaskFile.open({str(path)!r}), tasks.ByteTokenizer(), "
        f"{str(tmp_path / 'c')!r}); "
        "print(entry.path, built)"
    )
    runs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120)[0].split() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert outputs[0][0] == outputs[1][0] and sorted(o[1] for o in outputs) == [
        "False",
        "True",
    ]  # one built, one waited
    entry = cache.find(tmp_path / "c", pathlib.Path(outputs[0][0]).name)
    assert entry.meta["rows"] == 3000


def test_bad_rows_are_named_up_to_a_cap_then_stop_the_build_with_their_count(tmp_path):
    rows = rows_of("regress")
    for i in range(5, 5 + 15):
        rows[i]["value"] = "high"
    task_file = write(tmp_path / "t.jsonl", rows)
    warned = []
    with pytest.raises(ValueError) as info:
        cache.cached_file(task_file, TOK, tmp_path / "cache", warn=warned.append)
    assert len(warned) == user_files.BAD_ROWS_SHOWN and "on line 6" in warned[0] and "on line 15" in warned[-1]
    text = str(info.value)
    assert text.startswith(f"Task file {task_file.path!r} has value 'high' on line 6") and "15 bad rows in all" in text
    assert "\n" not in text and text.endswith(".")
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_a_full_or_read_only_cache_folder_is_one_line(tmp_path, monkeypatch):
    task_file = write(tmp_path / "t.jsonl", rows_of("classify"))
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(ValueError, match=r"has 0.0 GiB free, and tokenizing .* free some space or set --cache-dir"):
        cache.cached_file(task_file, TOK, tmp_path / "cache")
    monkeypatch.undo()
    blocker = tmp_path / "file"
    blocker.write_text("")  # a cache root below a file cannot be created
    with pytest.raises(ValueError, match="cannot be written"):
        cache.cached_file(task_file, TOK, blocker / "cache")


def test_reading_batches_of_a_split_takes_memory_flat_in_its_rows(tmp_path, monkeypatch):
    """Opening a split and drawing batches scans in bounded chunks; nothing is a row-sized array."""
    monkeypatch.setattr(tasks.data, "CHUNK_ROWS", 1000)
    n = 40_000
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"input": f"row {i}", "label": f"c{i % 2}"}) + "\n" for i in range(n)))
    entry, _ = cache.cached_file(TaskFile.open(str(path)), TOK, tmp_path / "cache")
    tracemalloc.start()
    split = entry.splits(max_len=64, task_id=0, pad_id=0)["train"]
    picks = np.arange(0, len(split), 997)[:16]  # a batch far smaller than the split
    split.batch(picks)
    packing.packed_batch(split, picks, split.lengths_of(picks), packing.plan(split.lengths_of(picks), 64), rows=8)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(split) > 30_000 and peak < 8 * len(split) / 4, peak  # a quarter of one int64 a row


def test_packing_reads_only_the_examples_of_this_process_rows(tmp_path):
    task_file = write(tmp_path / "t.jsonl", rows_of("generate"))
    entry, _ = cache.cached_file(task_file, TOK, tmp_path / "cache")
    split = entry.splits(max_len=64, task_id=0, pad_id=0)["train"]

    class Recording(np.ndarray):
        read: set = set()

        def __getitem__(self, index):
            if isinstance(index, np.ndarray):
                Recording.read.update(index.tolist())
            return np.asarray(super().__getitem__(index))

    split.store["tokens"] = np.asarray(split.store["tokens"]).view(Recording)
    indices = np.arange(16)
    lengths = split.lengths_of(indices)
    layout = packing.plan(lengths, 64)
    rows = packing.rows_needed(layout, 2)
    mine = np.arange(rows // 2, rows)  # the second of two processes
    packing.packed_batch(split, indices, lengths, layout, rows, mine)
    offsets = split.store["offsets"]
    here = [i for i in indices if layout.row[i] in mine]
    others = [i for i in indices if layout.row[i] not in mine]
    assert here and others
    assert all(offsets[i] in Recording.read for i in here)
    assert not any(offsets[i] <= t < offsets[i + 1] for i in others for t in Recording.read)
