"""CPU latency of the exported graphs and the export report (``report.md`` + ``report.png``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from autoglm_distill.export.runner import artifact_files

WARMUP_RUNS = 2


def measure_latency(graphs: Mapping[str, Callable], golden, facts: Mapping[str, Any], runs: int) -> dict:
    """Median wall time (ms) of ``runs`` calls of each graph: vision (when there is one) on the golden screenshot,
    prefill on the golden prompt, decode of one token after it."""
    from autoglm_distill.export.verify import Session

    session = Session(graphs, facts)

    def timed(fn: Callable[[], Any]) -> float:
        for _ in range(WARMUP_RUNS):
            fn()
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    out = {}
    if "vision" in graphs:
        out["vision_ms_median"] = timed(lambda: graphs["vision"](golden.pixel_values))
    args = session.prefill_args(golden)
    out["prefill_ms_median"] = timed(lambda: graphs["prefill"](*args))
    session.prefill(golden)
    k_cache, v_cache, position = session.k_cache, session.v_cache, session.position

    def one_decode() -> None:
        session.k_cache, session.v_cache, session.position = k_cache, v_cache, position
        session.decode(int(golden.prompt[-1]))

    out["decode_ms_median"] = timed(one_decode)
    return {**out, "runs": runs, "prompt_tokens": len(golden.prompt), "threads": torch.get_num_threads()}


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

    labels = [f"{r['format']}\n{r['precision']}" for r in rows]
    fig, (size_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4))
    size_ax.bar(labels, [r["bytes"] / 1e6 for r in rows], color="#4C72B0")
    size_ax.set_ylabel("MB on disk")
    size_ax.set_title("Artifact size")
    timed = [r for r in rows if r["latency"]]
    x = range(len(timed))
    time_ax.bar([i - 0.2 for i in x], [r["latency"]["prefill_ms_median"] for r in timed], 0.4, label="prefill")
    time_ax.bar([i + 0.2 for i in x], [r["latency"]["decode_ms_median"] for r in timed], 0.4, label="decode (1 token)")
    time_ax.set_xticks(list(x), [f"{r['format']}\n{r['precision']}" for r in timed])
    time_ax.set_ylabel("ms, median")
    time_ax.set_title("CPU latency (this machine)")
    time_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ms(latency: Mapping[str, Any], key: str) -> str:
    if not latency:
        return "n/a (macOS)"
    return f"{latency[key]:.2f}" if key in latency else "-"


def write_report(folder: Path, manifest: Mapping[str, Any]) -> None:
    """``report.md`` (table of size, latency and parity per format and precision) and ``report.png``."""
    rows = size_rows(manifest)
    facts = manifest["model"]
    runs = next((r["latency"]["runs"] for r in rows if r["latency"]), 0)
    lines = [
        "# Export report",
        "",
        f"Student: {manifest.get('source') or 'in-memory model'}; {facts['architecture']}, {facts['num_layers']} "
        f"layers, vocabulary {facts['vocab_size']}, max context {facts['max_context']} tokens.",
        f"Parity: {manifest['golden']['prompts']} golden prompts, {manifest['golden']['max_new_tokens']} greedy tokens "
        "each, run in the artifact's own runtime (Core ML: structural, predict is macOS-only).",
        f"Latency: median of {runs} runs on this machine's CPU (vision on the first golden screenshot, prefill of the "
        "first golden prompt, one decode step).",
        "",
        "| format | precision | files | MB | vs full precision | vision ms | prefill ms | decode ms | parity |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        latency = r["latency"] or {}
        ms = {k: _ms(latency, k) for k in ("vision_ms_median", "prefill_ms_median", "decode_ms_median")}
        lines.append(
            f"| {r['format']} | {r['precision']} | {', '.join(r['files'])} | {r['bytes'] / 1e6:.2f} | "
            f"{r['ratio']:.2f} | {ms['vision_ms_median']} | {ms['prefill_ms_median']} | {ms['decode_ms_median']} | "
            f"{_parity_text(r['parity'])} |"
        )
    lines += ["", "![size and latency](report.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))
    _chart(rows, folder / "report.png")
