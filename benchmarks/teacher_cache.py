"""Teacher cache: bytes per token and KD-loss deviation from the dense teacher, by k and value bits.

Two sources of teacher distributions, each encoded with the cache's code (`autoglm_distill.teacher_cache`), decoded
and fed to the KD loss against the same student logits as the dense teacher:

* ``demo``: the trained demo teacher and distilled student over the demo's validation split (vocabulary 400, so
  ids are cheap there): the deviation a real training run sees;
* ``synthetic-151k``: 2,048 positions of synthetic logits over AutoGLM's 151,552-token vocabulary (Gaussian plus
  an exponential tail, a peaked distribution; the student is the teacher plus Gaussian noise). The top-k ids are
  spread uniformly over the vocabulary: the worst case for delta coding, so bytes/token here is an upper bound.

Bytes are those of the shard file (npz with every array and header) divided by the tokens in it. "kd truncation"
is the deviation of exact top-k targets (before quantization); "kd cached" that of the decoded cache.
DistillKit's published figure (~300 B/token at top-k 128) is the reference.

    python benchmarks/teacher_cache.py --run outputs/demo/<time>      # the demo run with teacher/ and student/

Prints a table and writes JSON (default benchmarks/results/teacher_cache.json).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoglm_distill.data.phone import ChatEncoder, PhoneDataModule
from autoglm_distill.losses import DistillationLoss, TopKTargets
from autoglm_distill.teacher_cache import decode, encode, top_k

DISTILLKIT_BYTES_AT_128 = 300


def shard_bytes(arrays: dict[str, np.ndarray]) -> int:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return len(buffer.getvalue())


def kd_sum(loss: DistillationLoss, student: torch.Tensor, teacher, chunk: int = 256) -> float:
    """Summed per-token KD over rows, a chunk at a time (teacher: logits or `TopKTargets`)."""
    total = 0.0
    labels = torch.zeros(student.shape[0], dtype=torch.long)
    for s in range(0, student.shape[0], chunk):
        e = min(s + chunk, student.shape[0])
        part = teacher[s:e] if isinstance(teacher, torch.Tensor) else teacher.rows(s, e)
        total += loss(student[s:e], labels[s:e], part).kd.item() * (e - s)
    return total


def measure(name: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float, ks, bits) -> list[dict]:
    loss = DistillationLoss(temperature=temperature, alpha=1.0)
    dense = kd_sum(loss, student, teacher)
    rows = []
    for k in ks:
        ids, logp, rest = top_k(teacher, k, temperature)
        truncated = kd_sum(loss, student, TopKTargets(ids, logp, rest, temperature))
        for b in bits:
            arrays = encode(ids.numpy(), logp.numpy(), rest.numpy(), b)
            cached = kd_sum(loss, student, TopKTargets(*(torch.from_numpy(a) for a in decode(arrays)), temperature))
            rows.append({
                "source": name, "vocab": teacher.shape[1], "tokens": teacher.shape[0], "k": k, "value_bits": b,
                "bytes_per_token": shard_bytes(arrays) / teacher.shape[0], "kd_dense": dense / teacher.shape[0],
                "kd_truncation_rel": (truncated - dense) / dense, "kd_cached_rel": (cached - dense) / dense,
            })  # fmt: skip
    return rows


@torch.no_grad()
def demo_logits(run: Path, data: Path, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student logits, teacher logits) at the supervised positions of the demo's validation split."""
    teacher = AutoModelForCausalLM.from_pretrained(run / "teacher").eval()
    student = AutoModelForCausalLM.from_pretrained(run / "student").eval()
    encoder = ChatEncoder(AutoTokenizer.from_pretrained(run / "teacher"), None, max_length)
    datamodule = PhoneDataModule(data, encoder, batch_size=32)
    students, teachers = [], []
    for batch in datamodule.val_dataloader():
        mask = batch["labels"][:, 1:] != -100
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        students.append(student(**inputs).logits[:, :-1][mask])
        teachers.append(teacher(**inputs).logits[:, :-1][mask])
    return torch.cat(students), torch.cat(teachers)


def synthetic_logits(vocab: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(tokens, vocab, generator=g) * 2 + torch.empty(tokens, vocab).exponential_(1, generator=g) * 4
    return teacher + torch.randn(tokens, vocab, generator=g), teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a demo run folder with teacher/ and student/")
    parser.add_argument("--data", type=Path, default=Path("data/synth_phone"))
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0, help="the demo recipe's distill temperature")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "teacher_cache.json")
    args = parser.parse_args()
    console = Console(width=150)
    console.log("demo teacher and student on the validation split")
    student, teacher = demo_logits(args.run, args.data, args.max_length)
    rows = measure("demo", student, teacher, args.temperature, [8, 32, 128], args.bits)
    console.log("synthetic logits over 151,552 tokens")
    student, teacher = synthetic_logits(151_552, 2048)
    rows += measure("synthetic-151k", student, teacher, args.temperature, [32, 128], args.bits)

    table = Table(
        title=f"Teacher cache at T={args.temperature} (DistillKit: ~{DISTILLKIT_BYTES_AT_128} B/token at k=128)"
    )
    for col in ("source", "vocab", "tokens", "k", "value bits", "B/token", "KD dense", "KD dev. top-k exact",
                "KD dev. cached"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["source"], f"{r['vocab']:,}", f"{r['tokens']:,}", str(r["k"]), str(r["value_bits"]),
            f"{r['bytes_per_token']:.1f}", f"{r['kd_dense']:.4f}", f"{r['kd_truncation_rel']:+.2%}",
            f"{r['kd_cached_rel']:+.2%}",
        )  # fmt: skip
    console.print(table)
    meta = {"run": str(args.run), "temperature": args.temperature, "date": time.strftime("%Y-%m-%d"),
            "distillkit_bytes_per_token_at_k128": DISTILLKIT_BYTES_AT_128}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
