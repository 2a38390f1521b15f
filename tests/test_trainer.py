"""mtl.trainer's pieces that need no training: the config from flag values, batch trimming, the task list.

The training loop itself runs end to end in tests/test_cli.py (killed and
resumed), tests/test_multiprocess.py and tests/test_notebook.py.
"""

import dataclasses
import json

import numpy as np
import pytest

from mtl import train_progress, trainer
from mtl.cli.train import build_parser, config_from_args
from mtl.config import UsageError


def test_configure_applies_the_flags_then_the_overrides():
    cfg = trainer.configure(
        "tiny", tasks="g2p, langid", steps=3, batch_size=4, seed=5, overrides=["train.log_every=2", "model.d_ff=96"]
    )
    assert cfg.train.tasks == ("g2p", "langid")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.seed, cfg.train.log_every) == (3, 4, 5, 2)
    assert cfg.model.d_ff == 96
    assert cfg.train.mixture == trainer.configure("tiny").train.mixture  # not given: the preset's
    assert trainer.configure("tiny", tasks=["g2p", "langid"], steps=3, batch_size=4, seed=5).train == (
        trainer.configure("tiny", tasks="g2p,langid", steps=3, batch_size=4, seed=5).train
    )


def test_the_command_line_builds_the_same_config():
    argv = ["--preset", "small", "--tasks", "langid", "--mesh", "data=-1", "--steps", "7", "--set", "train.seed=3"]
    expected = trainer.configure("small", tasks="langid", mesh="data=-1", steps=7, overrides=["train.seed=3"])
    assert config_from_args(build_parser().parse_args(argv)) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "huge"}, "huge"),
        ({"tasks": " , "}, "--tasks names no task"),
        ({"overrides": ["model.d_modle=4"]}, "d_modle"),
        ({"steps": -1}, "train.steps=-1 must be at least 0"),
    ],
)
def test_configure_raises_one_usage_error(kwargs, message):
    with pytest.raises(UsageError) as e:
        trainer.configure(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_trim_cuts_padding_to_the_longest_row_rounded_up():
    tokens = np.zeros((2, 128), np.int32)
    tokens[0, :40] = 5
    tokens[1, :10] = 5
    batch = {"tokens": tokens, "loss_mask": np.ones((2, 128), np.float32), "label": np.array([1, 2])}
    trimmed = trainer.trim(batch)
    assert trimmed["tokens"].shape == (2, 64) and trimmed["loss_mask"].shape == (2, 64)
    np.testing.assert_array_equal(trimmed["tokens"], tokens[:, :64])
    np.testing.assert_array_equal(trimmed["label"], [1, 2])  # not a row of tokens: kept whole
    # One process's rows: the global batch's longest row decides, so every process cuts alike.
    assert trainer.trim(batch, longest=70)["tokens"].shape == (2, 96)
    assert trainer.trim(batch, longest=500)["tokens"].shape == (2, 128)  # never wider than the split


def test_train_batches_pack_the_drawn_examples_into_fewer_rows_split_between_devices():
    import datasets

    from sharding import make_mesh
    from tasks import ByteTokenizer, encode_split

    words = [w * k for w in ("ab", "cde", "f") for k in range(1, 9)]  # 24 examples of 1 to 24 bytes
    data = datasets.Dataset.from_dict({"input": words, "target": words})
    split = encode_split("generate", data, ByteTokenizer(), 64)
    task = trainer.TaskData("spell", "generate", "", (), {"train": split}, 0)
    indices = np.arange(24)[::-1]
    mesh = make_mesh("data=2,fsdp=2,tensor=2")  # 4 devices split the batch
    packed_cfg = trainer.configure("tiny", batch_size=24)
    batches = {
        pack: trainer.TrainBatches(
            dataclasses.replace(packed_cfg, train=dataclasses.replace(packed_cfg.train, pack=pack)), [task], mesh
        )
        for pack in (True, False)
    }
    packed, rows, real = batches[True]("spell", indices)
    unpacked, b, real_unpacked = batches[False]("spell", indices)
    assert real == real_unpacked == (packed["segment_ids"] > 0).sum() == (unpacked["tokens"] > 0).sum()
    assert packed["loss_mask"].sum() == unpacked["loss_mask"].sum()
    assert b == 24 and rows % 4 == 0 and rows < 24 and packed["tokens"].shape == (rows, 128)
    assert packed["segment_ids"].max() > 1  # rows hold several examples


def test_default_out_names_the_tasks_and_the_seed():
    assert trainer.default_out(trainer.configure(tasks="g2p,langid", seed=4)) == "runs/g2p-langid-4"


def test_list_tasks_names_every_built_in_task():
    lines = []
    trainer.list_tasks(log=lines.append)
    assert [line.split()[:2] for line in lines] == [
        ["g2p", "generate"],
        ["hyphenate", "tag"],
        ["langid", "classify"],
        ["valence", "regress"],
    ]


def test_progress_without_a_terminal_is_a_plain_line_every_few_seconds():
    import io

    from rich.console import Console

    text = io.StringIO()
    console = Console(file=text, force_terminal=False, width=40)
    progress = train_progress.make_progress(console, total=100, start=0)
    assert isinstance(progress, train_progress.Lines)
    progress.every = 0.0
    with progress:
        progress.update(10, losses="g2p 2.500  langid 1.250  12.3k tok/s")
        progress.update(11)
    lines = text.getvalue().splitlines()
    assert len(lines) == 2  # one line each, never wrapped at the console's width
    assert lines[0].startswith("train step 10/100  g2p 2.500  langid 1.250  12.3k tok/s  ") and lines[0].endswith(
        "left"
    )
    assert lines[1].startswith("train step 11/100  g2p 2.500")
    quiet = train_progress.make_progress(Console(file=io.StringIO(), force_terminal=False), 100, 0)
    quiet.update(1)  # within the interval: nothing
    assert quiet.console.file.getvalue() == ""


def test_the_time_left_leaves_the_compilation_out(monkeypatch):
    """Step 1 compiles for 60 s, then steps take 1 s: 98 steps left are 98 s, not 60 s a step (issue 26)."""
    now = [0.0]
    monkeypatch.setattr(train_progress.time, "perf_counter", lambda: now[0])
    eta, counting_the_compile = train_progress.Eta(total=100, start=0), train_progress.Eta(total=100, start=0)
    now[0] = 61.0  # step 1 (compile 60 s, the step 1 s) is done
    eta.untimed(61.0, steps=1)
    assert eta.text(1) == "? left"  # nothing timed yet
    now[0] = 62.0  # step 2 took 1 s
    assert eta.text(2) == "00:01:38 left"
    assert counting_the_compile.text(2) == "00:50:38 left"  # what it showed before: 31 s a step


def test_throughput_counts_only_timed_steps(monkeypatch):
    """A compiling step's tokens and FLOPs leave the counts with its seconds: no rate from work outside the clock."""
    clock = iter([0.0, 10.0, 10.0, 20.0, 20.0])  # start; flush and reset; flush and reset
    monkeypatch.setattr(train_progress.time, "perf_counter", lambda: next(clock))
    window = train_progress.Window(peak_flops=100.0)  # t0 = 0
    window.untimed(6.0)  # a compile: 6 of the 10 seconds, its tokens not counted
    window.timed(tokens=400, flops=200.0)
    window.add("g2p", {"loss": 1.0}, 1)
    (record,) = window.flush(2)  # at 10 s: 4 timed seconds
    assert record["tokens_per_s"] == 100.0 and record["mfu"] == 0.5 and record["mfu_peak_flops"] == 100
    window.untimed(10.0)  # a window of nothing but a compile (10 -> 20 s)
    window.add("g2p", {"loss": 1.0}, 2)
    (record,) = window.flush(3)
    assert record["tokens_per_s"] is None and record["mfu"] is None  # not 0, not a division by ~0
    assert train_progress.losses_text({"g2p": record}) == "g2p 1.000"


def test_a_frozen_backbone_run_reports_an_mfu_of_at_most_one(tmp_path):
    """train.trainable=adapters: every logged MFU is a share of the peak (it read up to 1,784 when compiles were
    timed out but their tokens counted)."""
    cfg = trainer.configure(
        "tiny",
        tasks="g2p,langid",
        steps=6,
        overrides=["model.adapter_rank=2", "train.trainable=adapters", "train.log_every=2", "train.eval_examples=4"],
    )
    trainer.run(trainer.prepare(cfg, log=lambda _: None), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["mfu"] for r in records if "split" not in r]
    assert len(rates) >= 3 and any(rates)
    assert all(rate is None or 0 < rate <= 1 for rate in rates), rates


def test_a_task_file_is_tokenized_once_and_every_later_start_reads_the_same_batches(tmp_path):
    import io

    from rich.console import Console

    rows = [{"input": f"word {i} " * (1 + i % 5), "label": ["a", "b", "c"][i % 3]} for i in range(400)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = trainer.configure("tiny", tasks=f"mine={path},langid", batch_size=8)
    plans, logs = [], []
    for _ in range(2):
        out, log = io.StringIO(), []
        plans.append(trainer.prepare(cfg, log=log.append, cache_dir=tmp_path / "c", console=Console(file=out)))
        logs.append((out.getvalue(), log))
    (piped, first), (piped_again, second) = logs
    assert piped.startswith("tokenizing mine: 0.0 MB to read") and piped_again == ""  # a piped build: a line at once
    assert "400 rows" in first[0] and "0 bad rows" in first[0] and "built in" in first[0] and "reused" in second[0]
    assert first[1].startswith("task mine (classify): train ") and second[1].split(";")[:2] == first[1].split(";")[:2]
    assert plans[0].config == plans[1].config
    sampler = trainer.tasks.MixtureSampler({"mine": 360, "langid": 100}, {"mine": 0.5, "langid": 0.5}, 8, 0)
    batches = [trainer.TrainBatches(cfg, plan.data, plan.mesh) for plan in plans]
    for step in range(6):  # a resumed run's batches are these, bitwise
        name, indices = sampler.batch_at(step)
        indices = indices % len(plans[0].data[0].splits["train"])
        a, b = batches[0]("mine", indices)[0], batches[1]("mine", indices)[0]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_with_the_caches_off_a_task_file_is_tokenized_into_a_folder_removed_at_exit(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(f'{{"input": "w{i}", "value": {i}}}\n' for i in range(60)))
    cleanups = []
    monkeypatch.setattr(trainer.atexit, "register", lambda fn, *args, **kw: cleanups.append((fn, args, kw)))
    log = []
    plan = trainer.prepare(trainer.configure("tiny", tasks=f"v={path}"), log=log.append, cache_dir="off")
    ((fn, args, kw),) = cleanups
    assert str(args[0]) in log[0] and "built in" in log[0] and len(plan.data[0].splits["train"]) > 40
    fn(*args, **kw)
    assert not args[0].exists()


def test_tokenizing_piped_prints_a_line_at_once_then_one_an_interval_with_the_rate_and_time_left():
    import io

    from rich.console import Console

    from mtl import data_progress

    text = io.StringIO()
    display = data_progress.tokenize_progress(Console(file=text, force_terminal=False, width=30), "big", 2_000_000)
    assert isinstance(display, data_progress.TokenizeLines)
    with display:
        display.update(500_000, 2_000_000, 5_000)  # within the interval: nothing
        display.every = 0.0
        display.update(1_000_000, 2_000_000, 10_000)
    lines = text.getvalue().splitlines()
    assert len(lines) == 2 and lines[0] == "tokenizing big: 2.0 MB to read (a line every 10s)"
    assert lines[1].startswith("tokenizing big: 50%  10,000 rows  ") and "rows/s" in lines[1]
    assert lines[1].endswith(" left")
