"""Decode and prefill cost against the context actually in use, in onnxruntime and LiteRT, in one run.

    python benchmarks/decode_context.py [--max-context 2048] [--runs 50]

Exports the random >= 1M-parameter GLM-4 of ``export_sizes.py`` with a KV cache of ``--max-context`` tokens and one
extra bucket of 64 (graphs ``prefill_64``, ``prefill_<C>``, ``decode``, ``decode_64``), fp32 and int8, in ONNX and
TFLite, and reads the export's own timings (``report.measure_latency``: median of ``--runs`` calls, this machine's
CPU): one decode step at context 64 through ``decode_64`` (reads the first 64 cache positions), the same step through
``decode`` (reads all C), and the step at context C; prefill of 64 tokens through ``prefill_64`` and through the
C-token graph every prompt used to be padded to.

Whether the cache copy is gone in onnxruntime: the fp32 decode step run as the export's check runs it (caches fed in,
``present.*`` returned in new buffers), and with IOBinding binding each ``present.<i>.*`` output to the buffer of
its ``past_key_values.<i>.*`` input, so the ScatterND writes the new token's slot in place; the in-place step must
give the same logits and caches. Prints a table and writes JSON. Timings on shared cores are noisy: compare the
ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export_sizes import NO_QUANTIZED_BARS, WIDE, wide_export  # noqa: E402

from autoglm_distill.export import ExportSettings  # noqa: E402
from autoglm_distill.export.report import median_ms  # noqa: E402


def onnx_in_place(path: Path, position: int, runs: int) -> dict:
    """One decode step of ``path`` at ``position``: plain ``run`` vs IOBinding with every present.* bound to its
    past_key_values.* buffer (in place); checks the two give the same logits and caches."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    caches = [n for n in inputs if n.startswith("past_key_values.")]
    rng = np.random.default_rng(0)
    values = {n: rng.standard_normal(session.get_inputs()[inputs.index(n)].shape).astype(np.float32) for n in caches}
    feeds = {"tokens": np.array([[5]], np.int32), "input_pos": np.array([position], np.int32), **values}
    expected = dict(zip(outputs, session.run(None, feeds), strict=True))
    buffers = {n: ort.OrtValue.ortvalue_from_numpy(values[n].copy()) for n in caches}
    binding = session.io_binding()
    binding.bind_cpu_input("tokens", feeds["tokens"])
    binding.bind_cpu_input("input_pos", feeds["input_pos"])
    for name in caches:
        binding.bind_ortvalue_input(name, buffers[name])
        binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), buffers[name])
    binding.bind_output("logits")
    session.run_with_iobinding(binding)  # writes the slot of `position` into the bound buffers
    logits = binding.get_outputs()[-1].numpy()
    same = bool(np.array_equal(logits, expected["logits"])) and all(
        np.array_equal(buffers[n].numpy(), expected[n.replace("past_key_values.", "present.")]) for n in caches
    )
    return {
        "plain_ms": median_ms(lambda: session.run(None, feeds), runs),
        "in_place_ms": median_ms(lambda: session.run_with_iobinding(binding), runs),
        "in_place_matches_plain": same,
    }


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
        onnx_dir = Path(tmp) / "wide" / "onnx"
        in_place = {
            "64": onnx_in_place(onnx_dir / "decode_64.fp32.onnx", 63, args.runs),
            str(c): onnx_in_place(onnx_dir / "decode.fp32.onnx", c - 1, args.runs),
        }
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
    print("onnxruntime fp32 decode step, plain run (present.* in new buffers) vs IOBinding in place:")
    for context, r in in_place.items():
        print(
            f"  context {context:>5}: plain {r['plain_ms']:.3f} ms, in place {r['in_place_ms']:.3f} ms "
            f"(x{r['in_place_ms'] / r['plain_ms']:.2f}), same result: {r['in_place_matches_plain']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": WIDE,
        "parameters": params,
        "max_context": c,
        "runs": args.runs,
        "rows": rows,
        "onnxruntime_in_place": in_place,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
