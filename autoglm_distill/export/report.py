"""CPU latency of the exported graphs and the export report (``report.md`` + ``report.png``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from autoglm_distill.export.runner import artifact_files, decode_graph

WARMUP_RUNS = 2


def median_ms(fn: Callable[[], Any], runs: int) -> float:
    """Median wall time in ms of ``runs`` calls of ``fn``, after ``WARMUP_RUNS`` untimed ones."""
    for _ in range(WARMUP_RUNS):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure_latency(graphs: Mapping[str, Callable], golden, facts: Mapping[str, Any], runs: int) -> dict:
    """Median wall time (ms) of ``runs`` calls of each graph: vision (when there is one) on the golden screenshot,
    each prefill bucket on the golden prompt's first tokens (padded when shorter) from position 0, and one decode
    step at context 64 and at ``max_context`` (the token written at position 63, or C - 1, of the cache), each
    through the decode window a runtime would pick, and at 64 through ``decode`` (all C positions) too."""
    from autoglm_distill.export.verify import Session

    session = Session(graphs, facts)

    out = {}
    if "vision" in graphs:
        out["vision_ms_median"] = median_ms(lambda: graphs["vision"](golden.pixel_values), runs)
    extras = session.image_inputs(golden)
    caches = [torch.zeros(session.cache_shape) for _ in range(session.num_caches)]
    prefill = {}
    for bucket in session.buckets:
        tokens = torch.full((1, bucket), session.pad, dtype=torch.int32)
        chunk = golden.prompt[:bucket]
        tokens[0, : len(chunk)] = torch.tensor(chunk, dtype=torch.int32)
        args = (tokens, torch.arange(bucket, dtype=torch.int32), *extras, *caches)
        prefill[str(bucket)] = median_ms(lambda graph=graphs[f"prefill_{bucket}"], args=args: graph(*args), runs)
    decode = {}
    token = torch.tensor([[golden.prompt[-1]]], dtype=torch.int32)
    short = min(64, session.context)
    for context in sorted({short, session.context}):
        graph = graphs[decode_graph(context - 1, graphs)]
        args = (token, torch.tensor([context - 1], dtype=torch.int32), *caches)
        decode[str(context)] = median_ms(lambda graph=graph, args=args: graph(*args), runs)
    position = torch.tensor([short - 1], dtype=torch.int32)
    whole_cache = median_ms(lambda: graphs["decode"](token, position, *caches), runs)
    return {
        **out,
        "prefill_ms_median": prefill,
        "decode_ms_median": decode,  # through the decode window that holds the position
        "decode_ms_median_whole_cache_at_64": whole_cache,  # the same step at 64 through decode (all C positions)
        "decode_ratio_max_context_vs_64": decode[str(session.context)] / decode[str(short)],
        "runs": runs,
        "threads": torch.get_num_threads(),
    }


def size_rows(manifest: Mapping[str, Any]) -> list[dict]:
    """One row per format + precision (an ONNX/Core ML pair of graph files is one row); bytes count every file once."""
    rows: dict[tuple[str, str], dict] = {}
    for artifact in manifest["artifacts"]:
        key = (artifact["format"], artifact["precision"])
        row = rows.setdefault(
            key,
            {
                "format": key[0],
                "precision": key[1],
                "files": [],
                "bytes": 0,
                "latency": artifact["cpu_latency_ms"],
                "parity": artifact["parity"],
            },
        )
        for entry in artifact_files(artifact):  # a weight file the graphs share counts once
            if entry["file"] not in row["files"]:
                row["files"].append(entry["file"])
                row["bytes"] += entry["bytes"]
    out = list(rows.values())
    for row in out:
        full = next(r for r in out if r["format"] == row["format"] and r["precision"] in ("fp32", "fp16"))
        row["ratio"] = row["bytes"] / full["bytes"]
    return out


def _parity_text(parity: Mapping[str, Any]) -> str:
    if "same_text_as_tflite" in parity:
        status = "pass" if parity["passed"] else "FAIL"
        return (
            f"{status}: LiteRT-LM engine, {parity['same_text_as_tflite']}/{parity['prompts']} answers = the .tflite's"
        )
    if parity["kind"] == "structural":
        checks = [v for v in parity.values() if isinstance(v, Mapping)]
        weights = sum(c["weights_checked"] for c in checks)
        return f"structural: I/O as declared, {weights} weights within rounding" if parity["passed"] else "FAILED"
    worst = max(parity["prefill_max_abs_diff"], parity["decode_max_abs_diff"])
    greedy = "greedy identical" if parity["greedy_match"] else "greedy differs"
    status = "pass" if parity["passed"] else "FAIL"
    return (
        f"{status}: max abs diff {worst:.1e}, top-1 {parity['top1_agreement']:.3f}, "
        f"mean KL {parity['mean_kl']:.1e}, {greedy}"
    )


def _chart(rows: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (size_ax, prefill_ax, decode_ax) = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = [f"{r['format']} {r['precision']}" for r in rows]
    size_ax.barh(labels[::-1], [r["bytes"] / 1e6 for r in rows][::-1], color="#4C72B0")
    size_ax.set_xlabel("MB on disk")
    size_ax.set_title("Artifact size")
    timed = [r for r in rows if r["latency"]]
    for r in timed:
        prefill = r["latency"]["prefill_ms_median"]
        prefill_ax.plot(
            [int(b) for b in prefill], list(prefill.values()), marker="o", label=f"{r['format']} {r['precision']}"
        )
    prefill_ax.set_xscale("log", base=2)
    buckets = sorted({int(b) for r in timed for b in r["latency"]["prefill_ms_median"]})
    prefill_ax.set_xticks(buckets, [str(b) for b in buckets])
    prefill_ax.set_xlabel("prefill bucket (tokens)")
    prefill_ax.set_ylabel("ms, median")
    prefill_ax.set_title("Prefill per bucket (CPU, this machine)")
    prefill_ax.legend(fontsize=7)
    x = range(len(timed))
    contexts = sorted({c for r in timed for c in r["latency"]["decode_ms_median"]}, key=int)
    width = 0.8 / max(len(contexts), 1)
    for i, context in enumerate(contexts):
        values = [r["latency"]["decode_ms_median"].get(context, 0.0) for r in timed]
        decode_ax.bar([j + (i - (len(contexts) - 1) / 2) * width for j in x], values, width, label=f"context {context}")
    decode_ax.set_xticks(list(x), [f"{r['format']}\n{r['precision']}" for r in timed])
    decode_ax.set_ylabel("ms, median")
    decode_ax.set_title("Decode, one token (CPU, this machine)")
    decode_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _prefill_text(latency: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    if row["format"] == "litertlm":  # the engine's own timing of the last golden prompt
        return f"{row['parity'].get('litertlm_prefill_tokens_per_second', 0):.0f} tokens/s (LiteRT-LM)"
    if not latency:
        return "n/a (macOS)"
    return ", ".join(f"{b}: {ms:.2f}" for b, ms in latency["prefill_ms_median"].items())


def _decode_text(latency: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    if row["format"] == "litertlm":
        return f"{row['parity'].get('litertlm_decode_tokens_per_second', 0):.0f} tokens/s (LiteRT-LM)"
    if not latency:
        return "n/a (macOS)"
    decode = latency["decode_ms_median"]
    text = ", ".join(f"{c}: {ms:.2f}" for c, ms in decode.items())
    if len(decode) > 1:
        text += f" (x{latency['decode_ratio_max_context_vs_64']:.2f}; 64 over the whole cache: "
        text += f"{latency['decode_ms_median_whole_cache_at_64']:.2f})"
    return text


def write_report(folder: Path, manifest: Mapping[str, Any]) -> None:
    """``report.md`` (table of size, latency and parity per format and precision) and ``report.png``."""
    rows = size_rows(manifest)
    facts = manifest["model"]
    runs = next((r["latency"]["runs"] for r in rows if r["latency"]), 0)
    lines = [
        "# Export report",
        "",
        f"Student: {manifest.get('source') or 'in-memory model'}; {facts['architecture']}, {facts['num_layers']} "
        f"layers, vocabulary {facts['vocab_size']}, max context {facts['max_context']} tokens, prefill buckets "
        f"{facts['prefill_buckets']}.",
        f"Parity: {manifest['golden']['prompts']} golden prompts, {manifest['golden']['max_new_tokens']} greedy tokens "
        "each, run in the artifact's own runtime (Core ML: structural, predict is macOS-only); and per prefill "
        "bucket, the logits after each prompt cut to the bucket, through that bucket and its decode window.",
        f"Latency: median of {runs} runs on this machine's CPU: vision on the first golden screenshot, each prefill "
        "bucket (ms per call, by bucket size), one decode step at context 64 (through decode_64, which reads the "
        "first 64 cache positions) and at max context (through decode); in brackets their ratio, and the step at 64 "
        "through decode, which reads the whole cache.",
        "",
        "| format | precision | files | MB | vs full precision | vision ms | prefill ms by bucket "
        "| decode ms by context | parity |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        latency = r["latency"] or {}
        vision = f"{latency['vision_ms_median']:.2f}" if "vision_ms_median" in latency else "-"
        lines.append(
            f"| {r['format']} | {r['precision']} | {', '.join(r['files'])} | {r['bytes'] / 1e6:.2f} | "
            f"{r['ratio']:.2f} | {vision} | {_prefill_text(latency, r)} | {_decode_text(latency, r)} | "
            f"{_parity_text(r['parity'])} |"
        )
    lines += ["", "![size and latency](report.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))
    _chart(rows, folder / "report.png")
