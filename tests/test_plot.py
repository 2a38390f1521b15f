"""mtl.plot: a run's metrics.jsonl becomes a PNG of per-task curves; bad folders get one-line errors."""

import json
import struct
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

from mtl import plot  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = {
    "g2p": {"exact_match": 0.1, "token_error_rate": 0.9, "chrf": 0.2},
    "langid": {"accuracy": 0.2, "macro_f1": 0.1},
    "valence": {"mse": 3.0, "pearson": 0.1},
}


def write_run(folder, steps=200, eval_every=50, resumed_at=None):
    """A synthetic run folder: a training line per task every 10 steps, evaluations, a final test."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(10, steps + 1, 10):
        for i, task in enumerate(TASKS):
            lines.append(
                {
                    "step": step,
                    "task": task,
                    "steps": 3,
                    "loss": (3 - i) * 50 / (step + 40),
                    "grad_norm": 1.0,
                    "tokens_per_s": 3000.0 + step,
                    "mfu": 0.01,
                }
            )
        if step % eval_every == 0:
            for task, metrics in TASKS.items():
                lines.append(
                    {
                        "step": step,
                        "task": task,
                        "split": "validation",
                        **{k: v * (1 + step / steps) for k, v in metrics.items()},
                    }
                )
    for task, metrics in TASKS.items():
        lines.append({"step": steps, "task": task, "split": "test", **metrics})
    if resumed_at:  # a resumed run repeats a step with a new value; the last one counts
        lines.append({"step": resumed_at, "task": "g2p", "steps": 3, "loss": 123.0, "tokens_per_s": 1.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk follows the signature
    return width, height, len(data)


def test_save_writes_a_readable_png(tmp_path):
    run = write_run(tmp_path / "demo")
    path = plot.save(run)
    assert path == run / "metrics.png"
    width, height, size = png_size(path)
    # One row per task plus throughput, two panels a row: wide enough to read, tall enough for four rows.
    assert 1000 <= width <= 2500 and 900 <= height <= 3000, (width, height)
    assert 30_000 < size < 2_000_000, size


def test_figure_has_a_panel_per_task_and_the_run_name(tmp_path):
    fig = plot.figure(write_run(tmp_path / "demo"))
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    for task in TASKS:
        assert f"{task}: training loss" in titles
        assert any(t.startswith(f"{task}: validation") for t in titles)
    assert "training throughput" in titles
    assert fig._suptitle.get_text().startswith("demo: 3 tasks, 200 steps")


def test_curves_keep_the_last_value_of_a_repeated_step(tmp_path):
    records = plot.read_metrics(write_run(tmp_path / "r", resumed_at=100))
    series = plot.curves(records)
    steps, losses = series[("train", "g2p", "loss")]
    assert steps == sorted(set(steps)) and losses[steps.index(100)] == 123.0
    assert series[("validation", "langid", "accuracy")][0] == [50, 100, 150, 200]
    assert series[("test", "valence", "mse")] == ([200], [3.0])
    assert ("throughput", "", "tokens_per_s") in series
    assert not any(metric in ("step", "steps") for _, _, metric in series)


def test_a_run_without_evaluations_still_plots(tmp_path):
    run = tmp_path / "early"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "task": "g2p", "loss": 2.0, "tokens_per_s": 9.0}) + "\n")
    assert png_size(plot.save(run, tmp_path / "out" / "early.png"))[2] > 10_000


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mtl.plot", *args], capture_output=True, text=True, timeout=120)


def test_cli_writes_the_png_named_by_out(tmp_path):
    run = write_run(tmp_path / "demo")
    result = run_cli(str(run), "--out", str(tmp_path / "curves.png"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "curves.png")
    png_size(tmp_path / "curves.png")


def with_metrics(folder, text):
    (folder / "metrics.jsonl").write_text(text)
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "holds no metrics.jsonl"),
        (lambda p: with_metrics(p, "\n"), "holds no metric record"),
        (lambda p: with_metrics(p, '{"step": 1, "task"\n'), "line 1 is not JSON"),
    ],
    ids=["no-folder", "no-metrics", "empty-metrics", "bad-json"],
)
def test_cli_errors_are_one_line_with_status_2(tmp_path, make, message):
    run = make(tmp_path)
    result = run_cli(str(run))
    assert result.returncode == 2
    assert result.stderr.startswith("mtl.plot: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    with pytest.raises(plot.RunError, match=message):
        plot.read_metrics(run)
