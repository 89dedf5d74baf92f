"""Does the reference runner, driving only the exported files, give the PyTorch student's answers?

Runs every test chat through ``autoglm_distill.export.runner.Runner`` for each ONNX/TFLite precision and compares with
the answers the run's PyTorch student generated (``<run dir>/predictions/student_test.json``, HF ``generate``).

    python benchmarks/export_runner_parity.py --export export/demo --run outputs/demo/<time> \
        --data data/synth_phone/test.jsonl [--limit 200] [--out benchmarks/results/export_runner_parity.json]

Prints a table (per format and precision: same action, same text, answers the gold action) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from autoglm_distill.actions import try_parse
from autoglm_distill.export.runner import Runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", required=True, type=Path)
    parser.add_argument("--run", required=True, type=Path, help="the run folder that holds predictions/")
    parser.add_argument("--data", required=True, type=Path, help="the test split JSONL the run evaluated")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_runner_parity.json"))
    args = parser.parse_args()

    predictions = {p["id"]: p["answer"] for p in json.loads((args.run / "predictions/student_test.json").read_text())}
    records = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()][: args.limit]
    rows = []
    for fmt in ("onnx", "tflite"):
        for precision in ("fp32", "int8"):
            runner = Runner(args.export, fmt, precision)
            same_action = same_text = gold = 0
            for record in track(records, description=f"{fmt} {precision}"):
                out = runner(record["messages"], args.max_new_tokens)
                torch_answer = predictions[record["id"]]
                same_text += out["text"] == torch_answer
                same_action += out["action"] is not None and out["action"] == try_parse(torch_answer)
                gold += out["action"] is not None and out["action"] == try_parse(record["messages"][-1]["content"])
            n = len(records)
            rows.append(
                {
                    "format": fmt,
                    "precision": precision,
                    "examples": n,
                    "same_action_as_pytorch": same_action / n,
                    "same_text_as_pytorch": same_text / n,
                    "exact_action_vs_gold": gold / n,
                }
            )

    table = Table(title=f"Reference runner vs PyTorch student ({args.export})")
    for column in ("format", "precision", "examples", "same action", "same text", "exact vs gold"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["format"],
            r["precision"],
            str(r["examples"]),
            f"{r['same_action_as_pytorch']:.3f}",
            f"{r['same_text_as_pytorch']:.3f}",
            f"{r['exact_action_vs_gold']:.3f}",
        )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"export": str(args.export), "run": str(args.run), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
