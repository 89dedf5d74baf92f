"""Compression on the demo benchmark: KD alone, KD + structured pruning, KD + QAT, KD + both, and PTQ int8 of KD alone.

Every row is a real run of ``python -m autoglm_distill recipe=phone_tiny`` against the same trained demo teacher,
data and test split, exported to ONNX and TFLite (each artifact passing the export step's parity checks). Accuracy
is measured on what a phone would run: the PyTorch student for float rows, the int8 ONNX and TFLite files (driven by
the reference runner over every test chat) for the quantized rows; both are reported for every row.

    python benchmarks/compression_table.py --teacher outputs/demo/<time>/teacher \
        [--steps 600] [--out benchmarks/results/compression_table.json]

Finished runs (summary.json completed) are reused, so an interrupted benchmark resumes where it stopped.
Prints a table and writes JSON (and a Markdown copy next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import datasets
from rich.console import Console
from rich.progress import track
from rich.table import Table

from autoglm_distill.actions import try_parse
from autoglm_distill.data.phone import read_split
from autoglm_distill.evaluate import score_answers
from autoglm_distill.export.runner import Runner

# name, label, overrides of recipe=phone_tiny (which itself is: pruned-teacher init + pruning + QAT)
RUNS = [
    ("kd", "KD only", ["student.init=random", "callbacks=default"]),
    ("kd_prune", "KD + structured pruning", ["callbacks=[default,prune_structured]"]),
    ("kd_qat", "KD + QAT", ["student.init=random", "callbacks=[default,qat]"]),
    ("kd_prune_qat", "KD + pruning + QAT", []),
    ("pruned_init_half", "pruned-teacher init, half the steps", ["callbacks=default"]),
]
METRICS = ("action_type_acc", "tap_in_element", "exact_match")


def run_once(name: str, overrides: list[str], args) -> dict:
    """Run (or reuse) one training run; returns its summary."""
    run_dir = args.work / "runs" / name
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("status") == "completed":
        print(f"reusing {run_dir}")
        return json.loads(summary_path.read_text())
    steps = args.steps // 2 if name == "pruned_init_half" else args.steps
    command = [
        sys.executable,
        "-m",
        "autoglm_distill",
        "recipe=phone_tiny",
        "teacher=pretrained",
        f"teacher.path={args.teacher}",
        "logger=csv",
        f"eval.teacher={str(name == 'kd').lower()}",  # measured once: every run shares the teacher
        f"trainer.max_steps={steps}",
        "export.formats=[onnx,tflite]",
        f"export.dir={args.work / 'export' / name}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    print("running", " ".join(command[2:]))
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env)
    return json.loads(summary_path.read_text())


def artifact_accuracy(export_dir: Path, fmt: str, precision: str, records: list[dict], split, reference: dict) -> dict:
    """Action metrics of the exported ``fmt``/``precision`` file over the test chats (reference runner, greedy), how
    often it gives the same action as the run's own PyTorch student (``reference``: id -> answer), and its CPU
    speed: median ms per answer (prefill + decode) and ms per generated token."""
    runner = Runner(export_dir, fmt, precision)
    answers, same, seconds, tokens = [], 0, [], 0
    for r in track(records, description=f"{export_dir.name} {fmt} {precision}"):
        start = time.perf_counter()
        out = runner(r["messages"], 64)
        seconds.append(time.perf_counter() - start)
        tokens += len(out["tokens"])
        answers.append(out["text"])
        same += out["action"] is not None and out["action"] == try_parse(reference[r["id"]])
    return score_answers(answers, split) | {
        "same_action_as_pytorch": same / len(records),
        "ms_per_answer_median": 1e3 * statistics.median(seconds),
        "ms_per_token": 1e3 * sum(seconds) / max(tokens, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, type=Path, help="the demo run's teacher folder")
    parser.add_argument("--data", type=Path, default=Path("data/synth_phone"), help="the demo data folder")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--work", type=Path, default=Path("outputs/compression"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compression_table.json"))
    args = parser.parse_args()
    if not (args.teacher / "config.json").is_file():
        sys.exit(f"--teacher {args.teacher}: no config.json there; pass the teacher/ folder of a `make demo` run.")
    args.teacher, args.work = args.teacher.resolve(), args.work.resolve()

    records, _ = read_split(args.data / "test.jsonl", args.data)
    split = datasets.Dataset.from_list([{**r, "messages": json.dumps(r["messages"])} for r in records])
    summaries = {name: run_once(name, overrides, args) for name, _, overrides in RUNS}

    teacher = summaries["kd"]["eval"]["teacher"]
    rows = [
        {"name": "teacher", "label": "teacher (reference)", "params": teacher["params"], "pytorch": teacher["test"]}
    ]
    for name, label, _ in RUNS:
        s = summaries[name]
        manifest = json.loads((args.work / "export" / name / "manifest.json").read_text())
        predictions = json.loads((args.work / "runs" / name / "predictions" / "student_test.json").read_text())
        reference = {p["id"]: p["answer"] for p in predictions}
        row = {
            "name": name,
            "label": label,
            "params": s["eval"]["student"]["params"],
            "steps": s["stages"]["distill"]["steps"],
            "qat": s["student"]["qat"] is not None,
            "shape": s["student"].get("shape"),
            "pytorch": s["eval"]["student"]["test"],
        }
        for fmt in ("onnx", "tflite"):
            row[f"{fmt}_int8_bytes"] = next(
                s["bytes"] for s in manifest["sizes"] if s["format"] == fmt and s["precision"] == "int8"
            )
            for a in manifest["artifacts"]:
                if a["format"] == fmt and a["precision"] == "int8":
                    row[f"{fmt}_int8_export_decode_ms"] = a["cpu_latency_ms"]["decode_ms_median"]
                    row[f"{fmt}_int8_parity_passed"] = a["parity"]["passed"]
            row[f"{fmt}_int8"] = artifact_accuracy(args.work / "export" / name, fmt, "int8", records, split, reference)
        rows.append(row)
    kd = next(r for r in rows if r["name"] == "kd")
    rows.insert(2, {**kd, "name": "ptq", "label": "PTQ int8 of KD only"})

    shipped = {"kd": "pytorch", "kd_prune": "pytorch", "pruned_init_half": "pytorch"}  # others ship int8
    table = Table(title=f"Compression on the demo benchmark (test split, n={len(records)})")
    columns = [
        "row",
        "params",
        "x fewer than teacher",
        "int8 onnx / tflite KB",
        "ms/token onnx / tflite int8",
        "measured on",
        "action_type",
        "tap_in_element",
        "exact",
        "exact Δ vs teacher",
        "exact onnx / tflite int8",
        "int8 same action as own fp32, onnx / tflite",
    ]
    for c in columns:
        table.add_column(c, justify="left" if c in ("row", "measured on") else "right")
    markdown = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    teacher_exact = teacher["test"]["exact_match"]
    for r in rows:
        where = "pytorch" if r["name"] == "teacher" else shipped.get(r["name"], "onnx_int8")
        m = r["pytorch"] if where == "pytorch" else r["onnx_int8"]
        cells = [
            r["label"],
            f"{r['params']:,}",
            f"{teacher['params'] / r['params']:.1f}",
            f"{r['onnx_int8_bytes'] / 1e3:.0f} / {r['tflite_int8_bytes'] / 1e3:.0f}" if "onnx_int8_bytes" in r else "-",
            f"{r['onnx_int8']['ms_per_token']:.2f} / {r['tflite_int8']['ms_per_token']:.2f}"
            if "onnx_int8" in r
            else "-",
            {"pytorch": "PyTorch fp32", "onnx_int8": "ONNX int8 file"}[where],
            *(f"{m[k]:.3f}" for k in METRICS),
            f"{m['exact_match'] - teacher_exact:+.3f}",
            f"{r['onnx_int8']['exact_match']:.3f} / {r['tflite_int8']['exact_match']:.3f}" if "onnx_int8" in r else "-",
            f"{r['onnx_int8']['same_action_as_pytorch']:.3f} / {r['tflite_int8']['same_action_as_pytorch']:.3f}"
            if "onnx_int8" in r
            else "-",
        ]
        r["measured_on"] = where
        table.add_row(*cells)
        markdown.append("| " + " | ".join(cells) + " |")
    Console(width=200).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"teacher": str(args.teacher), "steps": args.steps, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(markdown) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
