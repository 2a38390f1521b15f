"""Per-task curves of a run as a PNG, without TensorBoard: ``python -m mtl.plot RUN_DIR``.

Reads ``RUN_DIR/metrics.jsonl`` (docs/contract.md: training lines carry ``step``,
``task``, ``loss``, ``tokens_per_s``; evaluation lines carry ``split`` and the
task's metrics by name) and draws one row per task: its training loss on the
left, its validation metrics on the right (test metrics, measured once at the
end, as crosses), and the training throughput at the bottom. Meant for a
remote machine (``scp`` the PNG home) and for notebooks (``figure(run)``
returns a matplotlib figure to show inline).

The figure is built on ``matplotlib.figure.Figure`` directly, not pyplot, so
it renders with the Agg canvas and never touches a notebook's backend.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence

TRAIN_KEYS = ("step", "task", "steps", "mfu_peak_flops")  # bookkeeping of a training line (and MFU's denominator), not metrics
LOWER_IS_BETTER = ("loss", "mse", "error")  # metric names containing these read better falling


class RunError(ValueError):
    """A run folder with nothing to plot: one sentence naming the path."""


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl``, in file order.

    Raises:
      RunError: no such folder, no ``metrics.jsonl`` in it, or one with no record.
    """
    run = pathlib.Path(run_dir)
    if not run.is_dir():
        raise RunError(f"run folder {str(run)!r} does not exist; give the --out folder of a train.py run")
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise RunError(f"{str(run)!r} holds no metrics.jsonl; is it the --out folder of a train.py run?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RunError(f"{str(path)!r} line {number} is not JSON") from None
        if isinstance(record, dict) and "step" in record and "task" in record:
            records.append(record)
    if not records:
        raise RunError(f"{str(path)!r} holds no metric record yet; the run has not logged a step")
    return records


def curves(records: Sequence[dict]) -> dict:
    """Series to plot, keyed ``(section, task, metric) -> (steps, values)``.

    ``section`` is ``train`` for training lines and the split for evaluation
    lines; throughput is ``("throughput", "", "tokens_per_s")``. A step logged
    twice keeps its last value (a resumed run logs again what it repeats).
    """
    points: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in records:
        section = r.get("split", "train")
        for key, value in r.items():
            if key in TRAIN_KEYS or key == "split" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key in ("tokens_per_s", "mfu"):
                series = ("throughput", "", key)
            else:
                series = (section, r["task"], key)
            points.setdefault(series, {})[int(r["step"])] = float(value)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in points.items()}


def figure(run: str | os.PathLike | Sequence[dict], title: str | None = None):
    """A matplotlib figure of a run's per-task curves.

    Args:
      run: a run folder, or records already read from one.
      title: the figure's title; default: the run folder's name.

    Returns:
      A ``matplotlib.figure.Figure``: show it in a notebook, or ``savefig`` it.

    Raises:
      RunError: see :func:`read_metrics`.
    """
    from matplotlib.figure import Figure

    if isinstance(run, (str, os.PathLike)):
        records = read_metrics(run)
        title = title or pathlib.Path(run).resolve().name
    else:
        records = list(run)
        if not records:
            raise RunError("no metric records to plot")
    series = curves(records)
    task_names = list(dict.fromkeys(r["task"] for r in records))  # first-seen order, as trained
    throughput = [k for k in (("throughput", "", "tokens_per_s"),) if k in series]
    rows = len(task_names) + bool(throughput)

    fig = Figure(figsize=(12, 2.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False)
    last_step = max(int(r["step"]) for r in records)
    for row, task in zip(axes, task_names):
        _training_panel(row[0], series, task)
        _evaluation_panel(row[1], series, task)
        for ax in row:
            ax.set_xlim(0, last_step * 1.03 or 1)  # a twin axis shares its x limits
    if throughput:
        ax = axes[-1][0]
        steps, values = series[throughput[0]]
        ax.plot(steps, [v / 1e3 for v in values], marker=".", color="tab:gray")
        ax.set_title("training throughput", loc="left", fontsize=11)
        ax.set_ylabel("thousand tokens / s")
        ax.set_ylim(bottom=0)
        ax.set_xlim(0, last_step * 1.03 or 1)
        ax.grid(alpha=0.3)
        _final_note(axes[-1][1], series)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(f"{title or 'run'}: {len(task_names)} tasks, {last_step} steps", fontsize=14, fontweight="bold")
    return fig


def save(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, dpi: int = 110) -> pathlib.Path:
    """Writes the run's figure as a PNG; default ``RUN_DIR/metrics.png``. Returns its path."""
    out = pathlib.Path(out) if out else pathlib.Path(run_dir) / "metrics.png"
    fig = figure(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


def _training_panel(ax, series: dict, task: str) -> None:
    key = ("train", task, "loss")
    ax.set_title(f"{task}: training loss", loc="left", fontsize=11)
    ax.grid(alpha=0.3)
    if key not in series:
        _empty(ax, "no training loss logged")
        return
    steps, values = series[key]
    ax.plot(steps, values, marker="." if len(steps) < 40 else None, color="tab:blue")
    ax.set_ylabel("loss")
    if min(values) > 0 and max(values) / min(values) > 30:  # a loss falling by orders of magnitude
        ax.set_yscale("log")


def _evaluation_panel(ax, series: dict, task: str) -> None:
    """Validation curves of one task; test values as crosses at the last step.

    Metrics that read better rising (accuracy, F1, chrF, correlation) go on the
    left axis, solid; those that read better falling (error rates, MSE) on a
    right axis, dashed, since their scales differ (an early error rate is often
    above 1 while an F1 is near 0).
    """
    ax.set_title(f"{task}: validation metrics (x: test)", loc="left", fontsize=11)
    ax.grid(alpha=0.3)
    names = list(dict.fromkeys(m for (s, t, m) in series if t == task and s in ("validation", "test")))
    if not names:
        _empty(ax, "no evaluation yet")
        return
    falling = [n for n in names if any(word in n for word in LOWER_IS_BETTER)]
    rising = [n for n in names if n not in falling]
    right = ax.twinx() if falling and rising else ax
    if falling and rising:
        ax.set_ylabel("higher is better")
        right.set_ylabel("lower is better (dashed)")
    colors = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    handles = []
    for i, name in enumerate(rising + falling):
        target, color, down = (right if name in falling else ax), colors[i % len(colors)], name in falling
        label = f"{name} {'↓' if down else '↑'}"
        if ("validation", task, name) in series:
            steps, values = series[("validation", task, name)]
            (line,) = target.plot(
                steps, values, marker="o", markersize=4, color=color, linestyle="--" if down else "-", label=label
            )
            handles.append(line)
        if ("test", task, name) in series:
            steps, values = series[("test", task, name)]
            (cross,) = target.plot(steps, values, marker="x", markersize=8, linestyle="none", color=color, label=label)
            if ("validation", task, name) not in series:
                handles.append(cross)
    ax.legend(
        handles=handles,
        fontsize=8,
        loc="center left",
        bbox_to_anchor=(1.2 if right is not ax else 1.01, 0.5),  # clear of the twin axis and its label
        frameon=False,
    )


def _final_note(ax, series: dict) -> None:
    """The last validation (or test) value of each metric, as text: the numbers a reader looks for."""
    ax.axis("off")
    lines = []
    for (section, task, name), (steps, values) in sorted(series.items()):
        if section == "test":
            lines.append(f"{task:>12s}  {name:<18s} {values[-1]:.4g}")
    if not lines:
        for (section, task, name), (steps, values) in sorted(series.items()):
            if section == "validation":
                lines.append(f"{task:>12s}  {name:<18s} {values[-1]:.4g}  (step {steps[-1]})")
    heading = "test metrics" if any(s == "test" for s, _, _ in series) else "latest validation metrics"
    ax.set_title(heading, loc="left", fontsize=11)
    ax.text(
        0,
        1,
        "\n".join(lines) or "none yet",
        va="top",
        ha="left",
        family="monospace",
        fontsize=9,
        transform=ax.transAxes,
    )


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", color="gray", transform=ax.transAxes)
    ax.set_yticks([])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtl.plot", description="Plot a run's per-task training loss and validation metrics as a PNG."
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a train.py run")
    parser.add_argument("--out", metavar="FILE.png", help="where to write the PNG (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        path = save(args.run_dir, args.out)
    except RunError as e:
        print(f"mtl.plot: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"mtl.plot: error: cannot write {args.out!r}: {e.strerror}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
