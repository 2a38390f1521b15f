"""mtl.run_folder: what a run folder accepts to resume, and the metric lines a resumed run keeps."""

import dataclasses
import json

import pytest

from mtl import config as C
from mtl.config import UsageError
from mtl.run_folder import RunFolder

CFG = C.tiny()


def started(path, cfg=CFG):
    folder = RunFolder(path)
    folder.check_resumable(cfg)
    folder.start(cfg, [{"name": "g2p", "kind": "generate", "labels": [], "max_new_tokens": 9}])
    return folder


def test_a_new_or_empty_folder_starts_a_run(tmp_path):
    RunFolder(tmp_path / "new").check_resumable(CFG)
    (tmp_path / "empty").mkdir()
    started(tmp_path / "empty")
    assert C.from_dict(json.loads((tmp_path / "empty" / "config.json").read_text())) == CFG
    assert json.loads((tmp_path / "empty" / "tasks.json").read_text())[0]["max_new_tokens"] == 9


def test_a_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not empty and holds no mtl run"):
        RunFolder(tmp_path).check_resumable(CFG)


def test_resuming_may_change_steps_mesh_and_serving_but_not_the_model_or_data(tmp_path):
    started(tmp_path)
    train, model = CFG.train, CFG.model
    for same in (
        dataclasses.replace(CFG, train=dataclasses.replace(train, steps=99, mesh="data=2", grad_accum=2)),
        dataclasses.replace(CFG, model=dataclasses.replace(model, remat="full")),
        dataclasses.replace(CFG, serve=dataclasses.replace(CFG.serve, max_batch=3)),
    ):
        RunFolder(tmp_path).check_resumable(same)
    other = dataclasses.replace(
        CFG, model=dataclasses.replace(model, d_model=32), train=dataclasses.replace(train, seed=1)
    )
    with pytest.raises(UsageError) as e:
        RunFolder(tmp_path).check_resumable(other)
    assert "different model.d_model, train.seed; use a new --out" in str(e.value)


def test_a_resumed_run_drops_the_lines_it_logs_again(tmp_path):
    folder = started(tmp_path)
    for step in (1, 2, 3, 4):
        folder.log({"step": step, "task": "g2p", "loss": 1.0 / step})
    folder.log({"step": 4, "task": "g2p", "split": "validation", "exact_match": 0.5})
    folder.log({"step": 4, "task": "g2p", "split": "test", "exact_match": 0.25})
    folder.close()

    def steps():
        return [(r["step"], r.get("split")) for r in map(json.loads, folder.metrics_path.read_text().splitlines())]

    # Resumed at the last step of a finished run: only its final evaluation comes again.
    folder.truncate_metrics(4, evaluated=True)
    assert steps() == [(1, None), (2, None), (3, None), (4, None)]
    # Resumed mid-run at step 2: everything after it comes again.
    folder.truncate_metrics(2, evaluated=False)
    assert steps() == [(1, None), (2, None)]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_resumed_run_drops_a_part_done_evaluation_and_a_torn_last_line(tmp_path):
    folder = started(tmp_path)
    for step in (2, 4):
        folder.log({"step": step, "task": "g2p", "loss": 1.0 / step})
        folder.log({"step": step, "task": "g2p", "split": "validation", "exact_match": 0.5})
    folder.close()
    with folder.metrics_path.open("a") as f:
        f.write('{"step": 4, "task": "langid", "spl')  # killed mid-write, mid-evaluation
    # Resumed at step 4, where it evaluates: the evaluation comes again, the torn line is gone.
    folder.truncate_metrics(4, evaluated=True)
    records = [json.loads(line) for line in folder.metrics_path.read_text().splitlines()]
    assert [(r["step"], r.get("split")) for r in records] == [(2, None), (2, "validation"), (4, None)]
    # A line that is not JSON before the last was not torn by a crash: it is named, nothing is rewritten.
    folder.metrics_path.write_text('{"step": 1, "task": "g2p", "loss": 1.0}\nnot json\n{"step": 2}\n')
    with pytest.raises(UsageError, match="line 2 is not JSON: 'not json'"):
        folder.truncate_metrics(2, evaluated=False)
    assert folder.metrics_path.read_text().count("\n") == 3


def test_fewer_steps_than_done_is_refused_and_more_extend(tmp_path):
    started(tmp_path)
    (tmp_path / "checkpoints" / "40" / "meta").mkdir(parents=True)  # a complete checkpoint of step 40
    RunFolder(tmp_path).check_resumable(CFG)  # CFG trains more steps than 40: it extends
    for steps in (40, 41):
        RunFolder(tmp_path).check_resumable(dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, steps=steps)))
    fewer = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, steps=39))
    with pytest.raises(UsageError, match=r"already at step 40, past --steps 39; give --steps 40 or more to resume"):
        RunFolder(tmp_path).check_resumable(fewer)


def test_a_task_whose_data_now_gives_other_labels_or_kind_is_refused_naming_it(tmp_path):
    started(tmp_path)
    same = [{"name": "g2p", "kind": "generate", "labels": [], "max_new_tokens": 9}]
    RunFolder(tmp_path).check_resumable(CFG, same)
    for changed, field in (({"labels": ["a", "b"]}, "labels"), ({"kind": "classify"}, "kind")):
        with pytest.raises(UsageError, match=f"holds a run with different task g2p {field}; use a new --out"):
            RunFolder(tmp_path).check_resumable(CFG, [{**same[0], **changed}])
