"""KD variants against the hard-label baseline over seeds: one table from one or more ``--multirun`` sweep folders.
Variants include on-policy distillation (``distill.on_policy``) and, where measured, closed-loop episodes on the
synthetic phone (``eval.closed_loop=true`` in the sweep, or ``python -m autoglm_distill.play`` into each run folder).

    python -m autoglm_distill recipe=demo_seeds teacher=pretrained teacher.path=<run>/teacher --multirun
    python benchmarks/kd_seeds.py multirun/demo_seeds/<date_time> [more sweeps] --out benchmarks/results/kd_seeds.json

A variant is a run's loss (temperature, alpha) and data (the references, or a label_with_teacher folder); the
baseline is alpha 0 on the references. For each variant: step and episode success per seed, their mean and spread,
and per seed the gain over the baseline's run with the same seed, against the binomial standard error of that
difference (``sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n)`` on the n test steps).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from autoglm_distill.label_with_teacher import META_FILE  # noqa: E402
from autoglm_distill.sweep_report import dig, read_runs  # noqa: E402


def variant_of(config: dict) -> str:
    """A readable name for a run's settings: its loss, whether its data came from label_with_teacher, and who wrote
    the training answers (distill.on_policy)."""
    alpha, temperature = float(config["distill"]["loss"]["alpha"]), float(config["distill"]["loss"]["temperature"])
    labelled = (Path(config["data"]["path"]) / META_FILE).is_file()
    data = " on teacher-labelled data" if labelled else ""
    if alpha == 0:
        return ("sequence-level KD (hard labels" + data + ")") if labelled else "baseline (hard labels)"
    on_policy = config["distill"].get("on_policy") or {}
    writers = []
    if float(on_policy.get("lmbda", 0)) > 0:
        writers.append(f"on-policy lmbda={float(on_policy['lmbda']):g}")
    if on_policy.get("seq_kd"):
        writers.append("teacher samples (seq_kd)")
    return f"KD T={temperature:g} alpha={alpha:g}{data}" + (", " + " + ".join(writers) if writers else "")


def closed_loop_of(run_dir: Path, metrics: dict) -> dict:
    """Closed-loop success and progress on the test split: from the run's eval (eval.closed_loop=true), else from a
    ``closed_loop.json`` that ``python -m autoglm_distill.play`` wrote into the run folder; {} when neither."""
    if "closed_loop_success" in metrics:
        return {"closed_loop_success": metrics["closed_loop_success"], "progress": metrics["closed_loop_progress"]}
    played = run_dir / "closed_loop.json"
    if played.is_file():
        test = json.loads(played.read_text())["splits"]["test"]
        return {"closed_loop_success": test["episode_success"], "progress": test["progress"]}
    return {}


def collect(sweeps: list[Path]) -> dict[str, dict[int, dict]]:
    """variant -> seed -> {step_success, episode_success, n} of the student on the test split."""
    table: dict[str, dict[int, dict]] = {}
    for sweep in sweeps:
        for run in read_runs(sweep):
            summary = run["summary"]
            if summary.get("status") != "completed":
                print(f"skipped {sweep}/{run['job']}: {summary.get('status')} {summary.get('error', '')}")
                continue
            config = yaml.safe_load((sweep / str(run["job"]) / ".hydra" / "config.yaml").read_text())
            metrics = dig(summary, ("eval", "student", "test")) or {}
            table.setdefault(variant_of(config), {})[int(config["seed"])] = {
                "step_success": metrics["step_success"],
                "episode_success": metrics["episode_success"],
                "n": dig(summary, ("data", "examples", "test")),
                "run": str(sweep / str(run["job"])),
            } | closed_loop_of(sweep / str(run["job"]), metrics)
    return table


def binomial_se(p1: float, p2: float, n: int) -> float:
    return math.sqrt(p1 * (1 - p1) / n + p2 * (1 - p2) / n)


def report(table: dict[str, dict[int, dict]]) -> dict:
    baseline = table.get("baseline (hard labels)", {})
    rows = []
    for variant, runs in sorted(table.items(), key=lambda kv: kv[0] != "baseline (hard labels)"):
        seeds = sorted(runs)
        steps = [runs[s]["step_success"] for s in seeds]
        row = {
            "variant": variant,
            "seeds": seeds,
            "step_success": steps,
            "step_success_mean": statistics.mean(steps),
            "step_success_sd": statistics.stdev(steps) if len(steps) > 1 else 0.0,
            "episode_success": [runs[s]["episode_success"] for s in seeds],
        }
        if all("progress" in runs[s] for s in seeds):
            row["closed_loop_success"] = [runs[s]["closed_loop_success"] for s in seeds]
            row["closed_loop_progress"] = [runs[s]["progress"] for s in seeds]
            row["closed_loop_progress_mean"] = statistics.mean(row["closed_loop_progress"])
        if variant != "baseline (hard labels)" and baseline:
            gains, ses = [], []
            for s in seeds:
                if s in baseline:
                    p, q, n = runs[s]["step_success"], baseline[s]["step_success"], runs[s]["n"]
                    gains.append(p - q)
                    ses.append(binomial_se(p, q, n))
            row["gain_over_baseline"] = gains
            row["binomial_se_of_gain"] = ses
            row["beats_baseline_by_more_than_se_on_every_seed"] = bool(gains) and all(
                g > se for g, se in zip(gains, ses, strict=True)
            )
        rows.append(row)
    return {"rows": rows}


def print_table(result: dict) -> None:
    header = (
        "| variant | step success per seed | mean +- sd | gain over baseline per seed (SE) | > SE every seed "
        "| closed-loop progress per seed (mean) | closed-loop episode success per seed |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        per_seed = " / ".join(f"{v:.3f}" for v in r["step_success"])
        gains = " / ".join(
            f"{g:+.3f} ({se:.3f})" for g, se in zip(r.get("gain_over_baseline", []), r.get("binomial_se_of_gain", []))
        )
        beats = {True: "yes", False: "no"}.get(r.get("beats_baseline_by_more_than_se_on_every_seed"), "-")
        mean = f"{r['step_success_mean']:.3f} +- {r['step_success_sd']:.3f}"
        progress, success = "-", "-"
        if "closed_loop_progress" in r:
            progress = " / ".join(f"{v:.3f}" for v in r["closed_loop_progress"])
            progress += f" ({r['closed_loop_progress_mean']:.3f})"
            success = " / ".join(f"{v:.3f}" for v in r["closed_loop_success"])
        print(f"| {r['variant']} | {per_seed} | {mean} | {gains or '-'} | {beats} | {progress} | {success} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path, help="--multirun sweep folders")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kd_seeds.json"))
    args = parser.parse_args()
    result = report(collect(args.sweeps))
    result["sweeps"] = [str(s) for s in args.sweeps]
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
