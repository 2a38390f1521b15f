"""The task table (mtl.serving.task_table): adds are transactions, a removed task's row is reused only after
its last request, and the host rooms of the serving wing import no JAX."""

import ast
import pathlib
import threading

import pytest

from mtl.config import HeadConfig
from mtl.serving.task_table import Task, TaskError, TaskTable

HEADS = (
    HeadConfig("spell", "generate"),
    HeadConfig("lang", "classify", 3),
    HeadConfig("free:0", "generate"),
    HeadConfig("free:1", "classify", 4),
    HeadConfig("free:2", "regress"),
)
SERVING = pathlib.Path(__file__).resolve().parents[1] / "mtl" / "serving"


def table():
    return TaskTable(HEADS, {"lang": {"labels": ["a", "b", "c"]}, "spell": {"max_new_tokens": 7}})


def test_the_runs_own_tasks_are_served_and_spare_rows_are_not():
    t = table()
    assert t.names() == ["lang", "spell"] and "free:0" not in t
    assert t.get("lang") == Task("lang", "classify", 1, "lang", ("a", "b", "c"), 0)
    assert t.get("spell").max_new_tokens == 7 and t.kinds() == {"spell": "generate", "lang": "classify"}


def test_an_add_is_served_only_once_committed_and_not_at_all_if_aborted():
    t = table()
    row = t.reserve("size", "classify", 4)
    assert row == 3 and "size" not in t  # the spare classifier with room for 4 labels
    with pytest.raises(TaskError, match="'size' is being added already"):
        t.reserve("size", "classify", 2)
    t.abort(row)
    assert "size" not in t and t.reserve("size", "classify", 4) == 3  # the row was given back
    t.commit(Task("size", "classify", 3, "free:1", ("x", "y")))
    assert t.get("size").labels == ("x", "y")
    with pytest.raises(TaskError, match="'size' is served already"):
        t.reserve("size", "classify", 2)


def test_rows_fit_their_kind():
    t = table()
    assert t.reserve("score", "regress") == 4
    with pytest.raises(TaskError, match=r"no free row has a classify head for 9 labels \(the largest holds 4\)"):
        t.reserve("big", "classify", 9)
    with pytest.raises(TaskError, match="no free row has a tag head"):
        t.reserve("pos", "tag", 2)
    assert t.reserve("gen", "generate") == 2  # the generation row first: heads stay for the kinds that need them
    assert t.reserve("gen2", "generate") == 3
    with pytest.raises(TaskError, match="no room for another task: serve.max_tasks=5"):
        t.reserve("gen3", "generate")


def test_a_removed_tasks_row_is_reused_only_after_its_last_request():
    t = table()
    held = [t.acquire("spell"), t.acquire("spell")]
    assert t.in_use(0) == 2
    t.remove("spell")
    assert t.acquire("spell") is None and "spell" not in t
    with pytest.raises(TaskError, match="'spell' is not served") as e:
        t.remove("spell")
    assert e.value.status == 404
    taken = [t.reserve(f"g{i}", "generate") for i in range(3)]
    assert 0 not in taken  # still held by two requests
    for task in held:
        t.release(task)
    for row in taken:
        t.abort(row)
    assert t.in_use(0) == 0 and t.reserve("spell", "generate") == 0  # free again once both have finished


def test_acquire_and_remove_race_without_losing_a_count():
    t = table()

    def client():
        for _ in range(2000):
            task = t.acquire("spell")
            if task is not None:
                t.release(task)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    t.remove("spell")
    for thread in threads:
        thread.join()
    assert t.in_use(0) == 0


def imports_of(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_host_rooms_import_no_jax_and_the_wing_has_no_import_circle():
    for room in ("scheduler", "task_table", "requests"):
        mine = imports_of(SERVING / f"{room}.py")
        device = {n for n in mine if n.split(".")[0] in ("jax", "flax") or n.startswith("mtl.serving.engine")}
        assert not device, (room, device)
    graph = {
        p.stem: {n.split(".")[2] for n in imports_of(p) if n.startswith("mtl.serving.") and n.count(".") >= 2}
        | {n.split(".")[-1] for n in imports_of(p) if n.startswith("mtl.serving.") and n.count(".") == 2}
        for p in SERVING.glob("*.py")
    }
    graph = {k: {v for v in vs if v in graph and v != k} for k, vs in graph.items()}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    circles = [room for room in graph if reaches(room, room)]
    assert circles == []
