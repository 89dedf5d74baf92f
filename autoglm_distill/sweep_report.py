"""One table and one chart for a ``--multirun`` sweep: ``python -m autoglm_distill.sweep_report <sweep dir>``.

Reads every run's ``summary.json`` and the values it swept (``.hydra/overrides.yaml``), prints the table, and writes
``sweep_report.md``, ``sweep_report.json`` and ``sweep_report.png`` (the metric against the swept values) into the
sweep folder. Every ``--multirun`` writes it at the end by itself (conf/hydra/default.yaml); failed runs are listed
with their error and left out of the chart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from autoglm_distill.utils import write_json_atomic

DEFAULT_METRIC = "test/student/exact_match"
# Columns after the swept values: (name, where in summary.json).
COLUMNS = [
    ("val/ce", ("stages", "distill", "val/ce")),
    ("val/kd", ("stages", "distill", "val/kd")),
    ("val/top1_agreement", ("stages", "distill", "val/top1_agreement")),
    ("steps", ("stages", "distill", "steps")),
    ("seconds", ("stages", "distill", "seconds")),
]


class SweepError(ValueError):
    """The folder is not a finished or running sweep; the message says what was expected."""


def read_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every run folder of the sweep (``<sweep dir>/<job number>``) with its overrides and summary, in job order."""
    if not sweep_dir.is_dir():
        raise SweepError(f"{sweep_dir} is not a folder: pass the sweep folder, e.g. multirun/demo_sweep/<date_time>.")
    runs = []
    for folder in sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    ):
        overrides_file = folder / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        summary_file = folder / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"status": "no summary.json"}
        runs.append(
            {"job": int(folder.name), "overrides": dict(o.split("=", 1) for o in overrides), "summary": summary}
        )
    if not runs:
        raise SweepError(
            f"{sweep_dir} has no run folders (0/, 1/, ...): pass the folder a `--multirun` wrote, "
            "e.g. multirun/demo_sweep/<date_time>, not one of its runs."
        )
    return runs


def metric_value(summary: dict, metric: str) -> float | None:
    """``<split>/<model>/<name>`` from the eval results (``test/student/exact_match``), or a distill-stage metric
    (``val/ce``)."""
    parts = metric.split("/")
    if len(parts) == 3 and parts[1] in summary.get("eval", {}):
        split, model, name = parts
        return dig(summary, ("eval", model, split, name))
    return dig(summary, ("stages", "distill", metric))


def dig(obj: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def swept_keys(runs: list[dict]) -> list[str]:
    """The override keys whose values differ between runs, in the order they were given."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run["overrides"] if k not in keys]
    return [k for k in keys if len({run["overrides"].get(k) for run in runs}) > 1]


def build_rows(runs: list[dict], metric: str) -> tuple[list[str], list[dict[str, Any]]]:
    keys = swept_keys(runs)
    rows = []
    for run in runs:
        summary = run["summary"]
        row: dict[str, Any] = {"job": run["job"], **{k: run["overrides"].get(k) for k in keys}}
        row["status"] = summary.get("status")
        row[metric] = metric_value(summary, metric)
        row.update({name: dig(summary, path) for name, path in COLUMNS if name != metric})
        if summary.get("error"):
            row["error"] = summary["error"]
        rows.append(row)
    return keys, rows


def as_number(value: str | None) -> float | str | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def plot(keys: list[str], rows: list[dict], metric: str, path: Path) -> Path | None:
    """The metric against the first swept key, one line per value of the other swept keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "completed" and r[metric] is not None]
    if not done:
        return None
    x_key = keys[0] if keys else "job"
    xs = sorted({as_number(r[x_key]) for r in done}, key=lambda v: (isinstance(v, str), v))
    numeric = all(isinstance(x, float) for x in xs)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    lines: dict[str, list[dict]] = {}
    for r in done:
        label = ", ".join(f"{k}={r[k]}" for k in keys[1:]) or metric
        lines.setdefault(label, []).append(r)
    for label, line in sorted(lines.items()):
        line.sort(key=lambda r: xs.index(as_number(r[x_key])))
        x = [as_number(r[x_key]) if numeric else xs.index(as_number(r[x_key])) for r in line]
        ax.plot(x, [r[metric] for r in line], marker="o", label=label)
    if not numeric:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} over the sweep ({len(done)} of {len(rows)} runs completed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def report(sweep_dir: str | Path, metric: str = DEFAULT_METRIC, console: Console | None = None) -> dict:
    """Tabulate and chart the sweep in ``sweep_dir``; returns what ``sweep_report.json`` holds."""
    sweep_dir = Path(sweep_dir)
    keys, rows = build_rows(read_runs(sweep_dir), metric)
    columns = ["job", *keys, "status", metric] + [name for name, _ in COLUMNS if name != metric]
    table = Table(title=f"sweep {sweep_dir}")
    for c in columns:
        table.add_column(c, justify="left" if c in ("status", *keys) else "right")
    for r in rows:
        table.add_row(*(fmt(r.get(c)) for c in columns))
    (console or Console(width=160)).print(table)
    markdown = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    markdown += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    failed = [r for r in rows if r["status"] != "completed"]
    markdown += [""] + [f"- job {r['job']}: {r['status']}: {r.get('error', '')}" for r in failed]
    (sweep_dir / "sweep_report.md").write_text("\n".join(markdown) + "\n")
    chart = plot(keys, rows, metric, sweep_dir / "sweep_report.png")
    result = {"metric": metric, "swept": keys, "runs": rows, "chart": str(chart) if chart else None}
    write_json_atomic(sweep_dir / "sweep_report.json", result)
    return result


class SweepReport(Callback):
    """Hydra callback: writes the sweep's report once every run of a ``--multirun`` has finished."""

    def __init__(self, metric: str = DEFAULT_METRIC):
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report(config.hydra.sweep.dir, self.metric)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m autoglm_distill.sweep_report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="the folder a --multirun wrote (multirun/<recipe>/<date_time>)")
    parser.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        help="<split>/<model>/<name> from the eval (test/student/exact_match) or a distill metric (val/ce)",
    )
    args = parser.parse_args(argv)
    try:
        result = report(args.sweep_dir, args.metric)
    except SweepError as err:
        parser.exit(1, f"error: {err}\n")
    print(f"Wrote {Path(args.sweep_dir) / 'sweep_report.md'}" + (f" and {result['chart']}" if result["chart"] else ""))


if __name__ == "__main__":
    main()
