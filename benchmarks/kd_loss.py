"""Peak memory and time of the KD + CE loss at AutoGLM's vocabulary: naive full logits vs chunked.

Each measurement is one forward + backward of ``alpha * T**2 * KL + (1 - alpha) * CE`` from the student's final
hidden states and lm_head weight (both trainable) and the teacher's (frozen), in a fresh subprocess, so that one
variant's allocations cannot hide in another's high-water mark:

* ``naive``: teacher logits under no_grad, student logits ``hidden @ W.T``, ``DistillationLoss.forward``;
* ``chunked``: ``DistillationLoss.from_hidden`` (logits made and differentiated ``chunk_size`` tokens at a time).

Peak memory is what the loss adds on top of its inputs: on CPU the process's peak resident set (VmHWM, reset via
``/proc/self/clear_refs`` once the inputs exist) minus its resident set at that moment; on CUDA
``max_memory_allocated`` minus ``memory_allocated``. Both include the weight gradient, which either variant must
produce. The variants alternate (naive, chunked, naive, ...) and medians are reported. A parity run per shape
computes both in one process and reports the largest relative difference of the loss and of each gradient.

    python benchmarks/kd_loss.py                                  # CPU: hidden 1024 and 2048, 2k tokens
    python benchmarks/kd_loss.py --device cuda --hidden 1024 2048 4096 --tokens 1024 2048 4096 8192 --dtype bf16

Prints a table and writes JSON (default benchmarks/results/kd_loss.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from autoglm_distill.losses import DistillationLoss, HeadTargets

VARIANTS = ("naive", "chunked")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status_mb(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def _inputs(hidden: int, tokens: int, vocab: int, device: str, dtype: torch.dtype):
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    h_s = randn(tokens, hidden).requires_grad_()
    w_s = randn(vocab, hidden, scale=hidden**-0.5).requires_grad_()
    teacher = HeadTargets(randn(tokens, hidden), randn(vocab, hidden, scale=2 * hidden**-0.5))
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    return h_s, w_s, teacher, labels


def _step(variant: str, loss: DistillationLoss, h_s, w_s, teacher: HeadTargets, labels) -> torch.Tensor:
    if variant == "naive":
        with torch.no_grad():
            teacher_logits = teacher.hidden @ teacher.weight.T
        out = loss(h_s @ w_s.T, labels, teacher_logits)
    else:
        out = loss.from_hidden(h_s, w_s, labels, teacher)
    out.loss.backward()
    return out.loss.detach()


def worker(args) -> dict:
    """One measurement in this (fresh) process: peak memory above the inputs and the wall time."""
    dtype = DTYPES[args.dtype]
    loss = DistillationLoss(kind=args.kind, temperature=2.0, alpha=0.5, chunk_size=args.chunk_size)
    # Warm-up on tiny inputs: libraries, threads and autograd are set up before the measurement starts.
    _step(args.worker, loss, *_inputs(64, 16, 256, args.device, dtype))
    h_s, w_s, teacher, labels = _inputs(args.hidden[0], args.tokens[0], args.vocab, args.device, dtype)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        base = _status_mb("VmRSS")
    start = time.perf_counter()
    value = _step(args.worker, loss, h_s, w_s, teacher, labels)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mb("VmHWM")
    return {"peak_mb": peak - base, "seconds": seconds, "loss": value.float().item()}


def parity(args) -> dict:
    """Both variants on the same inputs in one process: the largest relative differences."""
    dtype = DTYPES[args.dtype]
    loss = DistillationLoss(kind=args.kind, temperature=2.0, alpha=0.5, chunk_size=args.chunk_size)
    results = {}
    for variant in VARIANTS:
        h_s, w_s, teacher, labels = _inputs(args.hidden[0], args.tokens[0], args.vocab, args.device, dtype)
        value = _step(variant, loss, h_s, w_s, teacher, labels)
        results[variant] = (value.float(), h_s.grad.float(), w_s.grad.float())
        del h_s, w_s, teacher
    rel = {}
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), *results.values(), strict=True):
        rel[name] = ((a - b).abs().max() / b.abs().max()).item()
    return rel


def _spawn(args, mode: str, hidden: int, tokens: int) -> dict:
    command = [
        sys.executable, __file__, mode, "--hidden", str(hidden), "--tokens", str(tokens), "--vocab", str(args.vocab),
        "--device", args.device, "--dtype", args.dtype, "--kind", args.kind, "--chunk-size", str(args.chunk_size),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048])
    parser.add_argument("--vocab", type=int, default=151_552)
    parser.add_argument("--kind", default="forward_kl")
    parser.add_argument("--chunk-size", default="auto")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kd_loss.json")
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "parity", *VARIANTS])
    args = parser.parse_args()
    if args.chunk_size != "auto":
        args.chunk_size = int(args.chunk_size)
    if args.mode in VARIANTS:
        args.worker = args.mode
        print(json.dumps(worker(args)))
        return
    if args.mode == "parity":
        print(json.dumps(parity(args)))
        return

    console = Console(width=160)
    rows = []
    for hidden in args.hidden:
        for tokens in args.tokens:
            runs = {v: [] for v in VARIANTS}
            for rep in range(args.reps):
                for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                    console.log(f"hidden {hidden}, {tokens} tokens: {variant} ({rep + 1}/{args.reps})")
                    runs[variant].append(_spawn(args, variant, hidden, tokens))
            console.log(f"hidden {hidden}, {tokens} tokens: parity")
            row = {"hidden": hidden, "tokens": tokens, "parity": _spawn(args, "parity", hidden, tokens)}
            for variant, measured in runs.items():
                ok = [m for m in measured if "error" not in m]
                row[variant] = {
                    "peak_mb": statistics.median(m["peak_mb"] for m in ok) if ok else None,
                    "seconds": statistics.median(m["seconds"] for m in ok) if ok else None,
                    "runs": measured,
                }
            if row["naive"]["peak_mb"] and row["chunked"]["peak_mb"]:
                row["memory_ratio"] = row["naive"]["peak_mb"] / row["chunked"]["peak_mb"]
                row["time_ratio"] = row["naive"]["seconds"] / row["chunked"]["seconds"]
            rows.append(row)

    table = Table(title=f"KD loss, V={args.vocab:,}, {args.dtype} on {args.device} (median of {args.reps})")
    for col in ("hidden", "tokens", "naive peak MB", "chunked peak MB", "naive/chunked", "naive s", "chunked s",
                "time naive/chunked", "max rel diff loss / dh / dW"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        n, c, p = r["naive"], r["chunked"], r["parity"]
        table.add_row(
            str(r["hidden"]), str(r["tokens"]),
            f"{n['peak_mb']:,.0f}" if n["peak_mb"] else "failed", f"{c['peak_mb']:,.0f}" if c["peak_mb"] else "failed",
            f"{r['memory_ratio']:.1f}x" if "memory_ratio" in r else "", f"{n['seconds']:.2f}" if n["seconds"] else "",
            f"{c['seconds']:.2f}" if c["seconds"] else "", f"{r['time_ratio']:.2f}" if "time_ratio" in r else "",
            " / ".join(f"{p[k]:.1e}" for k in ("loss", "grad_hidden", "grad_weight")) if "error" not in p
            else p["error"],
        )  # fmt: skip
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    meta = {
        "vocab": args.vocab, "kind": args.kind, "chunk_size": args.chunk_size, "dtype": args.dtype,
        "device": args.device, "machine": machine, "threads": torch.get_num_threads(), "reps": args.reps,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
