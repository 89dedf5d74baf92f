"""Tokens/s and peak memory of a full KD training step: this project's (chunked and naive loss) vs TRL's GKDTrainer.

The same GLM-4 teacher and student (random weights at AutoGLM's vocabulary, 151,552: the shapes are what cost), the
same pre-tokenized examples (random prompt + response tokens, only the response supervised), batch size,
temperature, optimizer (AdamW, lr 1e-4, no weight decay), gradient clipping (1.0) and fp32 on CPU:

* ``ours``: `DistillModule` under a Lightning Trainer, forward KL at T with alpha=1, teacher under inference_mode,
  the loss made from hidden states a chunk at a time (the default);
* ``ours_naive``: the same with ``chunk_size=None`` (full logits of both models);
* ``trl``: ``trl.experimental.gkd.GKDTrainer`` (lmbda=0, beta=0: forward KL on the fixed completions), run by
  ``benchmarks/trl_gkd_step.py`` with TRL's own environment (``bash benchmarks/trl_env.sh``, ``.venv-trl``); TRL is
  never a dependency of the project. Skipped, and said so, when that environment is missing.

With ``--lmbda`` > 0 both sides are on-policy (GKD): with that probability per step the student samples
``--max-new-tokens`` tokens per prompt (random weights never sample the end token, so every answer is that long on
both sides) at ``--temperature`` with its KV cache, and the forward KL trains on them. TRL draws its coin per step
from Python's ``random``, this project from the seed and the step, so at lmbda < 1 the two sample on different
steps; compare at ``--lmbda 1``. Supervised tokens per second then count the sampled tokens.

Every run is a fresh process; the variants alternate in rotating order, ``--reps`` times, and medians are reported.
A step is timed from batch start to batch end (forward, loss, backward, clipping, optimizer); the first step is
warm-up. Peak memory is the process's peak resident set minus its resident set once both models are loaded.

    bash benchmarks/trl_env.sh      # once: TRL's separate environment
    python benchmarks/kd_step.py    # CPU defaults below; --help for sizes

Prints a table and writes JSON (default benchmarks/results/kd_step.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
VARIANTS = ("ours", "ours_naive", "trl")


def _status_mb(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def make_models_and_data(args, work: Path) -> None:
    """Teacher and student folders (with a word-level tokenizer of the vocabulary size) and the examples."""
    from tokenizers import Tokenizer, models
    from transformers import Glm4Config, Glm4ForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0", eos_token="t1"
    )
    for name, hidden, layers in (("teacher", args.teacher_hidden, args.teacher_layers),
                                 ("student", args.student_hidden, args.student_layers)):  # fmt: skip
        config = Glm4Config(
            vocab_size=args.vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
            num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), head_dim=64,
            pad_token_id=0, eos_token_id=1, max_position_embeddings=4 * args.seq_len,
        )  # fmt: skip
        model = Glm4ForCausalLM(config)
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    g = torch.Generator().manual_seed(1)
    examples = []
    for _ in range(args.steps * args.batch_size):
        ids = torch.randint(2, args.vocab, (args.seq_len,), generator=g).tolist()
        prompt = args.seq_len - args.response
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    torch.save(examples, work / "data.pt")


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    length = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.zeros(len(examples), length, dtype=torch.long),
        "attention_mask": torch.zeros(len(examples), length, dtype=torch.long),
        "labels": torch.full((len(examples), length), -100, dtype=torch.long),
    }
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.tensor(e["labels"])
    return batch


def ours(args, chunk_size) -> dict:
    """This project's step under Lightning, in this process."""
    import pytorch_lightning as pl
    from transformers import AutoModelForCausalLM

    from autoglm_distill.losses import DistillationLoss
    from autoglm_distill.models import freeze
    from autoglm_distill.module import DistillModule
    from autoglm_distill.on_policy import OnPolicy

    class StepTimer(pl.Callback):
        def __init__(self):
            self.seconds, self.tokens = [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.seconds.append(time.perf_counter() - self._start)
            # The tokens trained on: the student's samples on an on-policy step (the optimizer step just taken),
            # else the data's answers.
            if module.on_policy is not None and module.on_policy.source(trainer.global_step - 1) == "student":
                mean_length = float(trainer.callback_metrics["train/student_sample_len"])
                self.tokens.append(round(mean_length * len(batch["labels"])))
            else:
                self.tokens.append(int((batch["labels"][:, 1:] != -100).sum()))

    pl.seed_everything(42, verbose=False)
    teacher = freeze(AutoModelForCausalLM.from_pretrained(args.work / "teacher"))
    student = AutoModelForCausalLM.from_pretrained(args.work / "student")
    rss_after_load = _status_mb("VmRSS")
    loss = DistillationLoss(kind="forward_kl", temperature=args.temperature, alpha=1.0, chunk_size=chunk_size)
    on_policy = OnPolicy(args.lmbda, False, args.temperature, args.max_new_tokens, pad_token_id=0, eos_token_id=1)
    module = DistillModule(
        student, loss, functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.0), None, teacher,
        on_policy=on_policy,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        torch.load(args.work / "data.pt"), batch_size=args.batch_size, collate_fn=collate
    )
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=args.steps, gradient_clip_val=1.0, accelerator="cpu", devices=1, precision="32-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    measured = slice(1, None)  # the first step is warm-up
    return {
        "median_step_seconds": statistics.median(timer.seconds[measured]),
        "supervised_tokens_per_second": sum(timer.tokens[measured]) / sum(timer.seconds[measured]),
        "rss_after_load_mb": rss_after_load,
        "peak_rss_mb": _status_mb("VmHWM"),
        "step_seconds": timer.seconds,
    }


def _spawn(args, variant: str) -> dict:
    out = args.work / f"{variant}.json"
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--temperature", str(args.temperature),
              "--lmbda", str(args.lmbda), "--max-new-tokens", str(args.max_new_tokens)]  # fmt: skip
    if variant == "trl":
        command = [
            str(TRL_PYTHON), str(ROOT / "benchmarks" / "trl_gkd_step.py"), "--teacher", str(args.work / "teacher"),
            "--student", str(args.work / "student"), "--data", str(args.work / "data.pt"), "--out", str(out),
            "--threads", str(torch.get_num_threads()), *common,
        ]  # fmt: skip
    else:
        command = [sys.executable, __file__, variant, "--work", str(args.work), "--out", str(out), *common]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"rc {done.returncode}"])[-1]}
    result = json.loads(out.read_text())
    result["added_mb"] = result["peak_rss_mb"] - result["rss_after_load_mb"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "ours", "ours_naive"])
    parser.add_argument("--vocab", type=int, default=151_552)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--response", type=int, default=128, help="supervised tokens per example")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run, the first is warm-up")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--lmbda", type=float, default=0.0, help="on-policy share (GKD); 0: fixed completions")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="sampled tokens per prompt when on-policy")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "kd_step")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kd_step.json")
    args = parser.parse_args()
    if args.mode != "run":
        result = ours(args, "auto" if args.mode == "ours" else None)
        args.out.write_text(json.dumps(result, indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    args.work.mkdir(parents=True, exist_ok=True)
    console.log(f"models and data in {args.work}")
    make_models_and_data(args, args.work)
    variants = list(VARIANTS)
    if not TRL_PYTHON.is_file():
        console.log(f"TRL is skipped: {TRL_PYTHON} is missing (create it with: bash benchmarks/trl_env.sh)")
        variants.remove("trl")
    runs = {v: [] for v in variants}
    for rep in range(args.reps):
        for variant in variants[rep % len(variants) :] + variants[: rep % len(variants)]:  # rotating order
            console.log(f"{variant} ({rep + 1}/{args.reps})")
            runs[variant].append(_spawn(args, variant))
    rows = {}
    for variant, measured in runs.items():
        ok = [m for m in measured if "error" not in m]
        rows[variant] = {
            "tokens_per_second": statistics.median(m["supervised_tokens_per_second"] for m in ok) if ok else None,
            "step_seconds": statistics.median(m["median_step_seconds"] for m in ok) if ok else None,
            "added_mb": statistics.median(m["added_mb"] for m in ok) if ok else None,
            "runs": measured,
        }
    reference = rows.get("trl", {}).get("tokens_per_second")
    table = Table(title=f"KD training step, lmbda={args.lmbda:g}, V={args.vocab:,}, CPU fp32, "
                        f"{torch.get_num_threads()} threads (median of {args.reps}, alternating)")  # fmt: skip
    for col in ("variant", "supervised tokens/s", "s/step", "peak MB above the models", "speed vs TRL GKD"):
        table.add_column(col, justify="right")
    for variant, r in rows.items():
        ok = r["tokens_per_second"] is not None
        table.add_row(
            variant, f"{r['tokens_per_second']:,.0f}" if ok else "failed", f"{r['step_seconds']:.2f}" if ok else "",
            f"{r['added_mb']:,.0f}" if ok else "",
            f"{r['tokens_per_second'] / reference:.2f}x" if ok and reference else "",
        )  # fmt: skip
    console.print(table)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "mode"}
    meta.update(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, threads=torch.get_num_threads())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
