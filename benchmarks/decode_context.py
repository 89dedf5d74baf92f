"""Decode and prefill cost against the context actually in use, in onnxruntime and LiteRT, in one run.

    python benchmarks/decode_context.py [--max-context 2048] [--runs 50]

Exports the random >= 1M-parameter GLM-4 of ``export_sizes.py`` with a KV cache of ``--max-context`` tokens and one
extra bucket of 64 (graphs ``prefill_64``, ``prefill_<C>``, ``decode``, ``decode_64``), fp32 and int8, in ONNX and
TFLite, and reads the export's own timings (``report.measure_latency``: median of ``--runs`` calls, this machine's
CPU): one decode step at context 64 through ``decode_64`` (reads the first 64 cache positions), the same step through
``decode`` (reads all C), and the step at context C; prefill of 64 tokens through ``prefill_64`` and through the
C-token graph every prompt used to be padded to. Prints a table and writes JSON. Timings on shared cores are noisy:
compare the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export_sizes import NO_QUANTIZED_BARS, WIDE, wide_export  # noqa: E402

from autoglm_distill.export import ExportSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_context.json")
    args = parser.parse_args()
    c = args.max_context
    settings = ExportSettings(
        max_context=c,
        prefill_buckets=(64,),
        formats=("onnx", "tflite"),
        max_new_tokens=4,
        golden_prompts=1,
        latency_runs=args.runs,
        bars=NO_QUANTIZED_BARS,
    )
    with tempfile.TemporaryDirectory() as tmp:
        manifest, params = wide_export(Path(tmp), settings, golden=[list(range(1, 81))])
    rows, seen = [], set()
    for artifact in manifest["artifacts"]:
        key = (artifact["format"], artifact["precision"])
        if key in seen or artifact["precision"] == "int4":
            continue
        seen.add(key)
        latency = artifact["cpu_latency_ms"]
        decode, prefill = latency["decode_ms_median"], latency["prefill_ms_median"]
        rows.append(
            {
                "format": key[0],
                "precision": key[1],
                "decode_ms_at_64_window": decode["64"],
                "decode_ms_at_64_whole_cache": latency["decode_ms_median_whole_cache_at_64"],
                f"decode_ms_at_{c}": decode[str(c)],
                "decode_at_64_window_vs_whole_cache": decode["64"] / latency["decode_ms_median_whole_cache_at_64"],
                f"decode_at_{c}_vs_64_window": decode[str(c)] / decode["64"],
                "prefill_ms_64_tokens_bucket_64": prefill["64"],
                f"prefill_ms_64_tokens_padded_to_{c}": prefill[str(c)],
                "prefill_bucket_64_vs_padded": prefill["64"] / prefill[str(c)],
            }
        )
    print(f"random GLM-4 {WIDE}, {params:,} parameters, KV cache {c} tokens, median of {args.runs} runs")
    print(
        f"{'format':<8}{'prec':<6}{'dec@64 win':>11}{'dec@64 all':>11}{f'dec@{c}':>10}{'win/all':>9}"
        f"{f'{c}/win':>9}{'pre 64':>9}{f'pre {c}':>10}{'64/pad':>8}"
    )
    for r in rows:
        print(
            f"{r['format']:<8}{r['precision']:<6}{r['decode_ms_at_64_window']:>11.3f}"
            f"{r['decode_ms_at_64_whole_cache']:>11.3f}{r[f'decode_ms_at_{c}']:>10.3f}"
            f"{r['decode_at_64_window_vs_whole_cache']:>9.2f}{r[f'decode_at_{c}_vs_64_window']:>9.2f}"
            f"{r['prefill_ms_64_tokens_bucket_64']:>9.2f}{r[f'prefill_ms_64_tokens_padded_to_{c}']:>10.2f}"
            f"{r['prefill_bucket_64_vs_padded']:>8.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": WIDE, "parameters": params, "max_context": c, "runs": args.runs, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
