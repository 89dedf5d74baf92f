"""TRL side of the KD-step benchmark: time TRL's GKDTrainer on the same models and examples as the project's step.

Trains a student against a frozen teacher with ``trl.experimental.gkd.GKDTrainer`` configured as plain
supervised (off-policy) KD on fixed completions, and reports the cost of one optimizer step:

* ``lmbda=0`` and ``seq_kd=False``: no generation, every step uses the dataset's completions;
* ``beta=0``: TRL's generalized JSD reduces to the forward KL(teacher || student) per supervised token
  (``F.kl_div(student_log_probs, teacher_log_probs, log_target=True)``); ``beta=1`` would be KL(student || teacher);
* the KL is taken at ``--temperature``. Stock TRL 1.16 only uses ``GKDConfig.temperature`` for sampling: its
  ``compute_loss`` calls ``generalized_jsd_loss`` without a temperature, i.e. at T=1. A one-line override forwards
  the configured temperature (two elementwise divisions, as in the project's loss); ``--stock-loss`` keeps TRL's
  behaviour. Either way TRL does not multiply by T**2 and adds no hard-label CE term;
* AdamW (``torch.optim.AdamW``, not the fused variant), constant learning rate, gradient clipping at
  ``--max-grad-norm``, fp32 on CPU, no gradient checkpointing (TRL's default is on), no bf16 (TRL's default is on),
  no evaluation, saving, logging integrations or telemetry, examples in file order.

Examples are the project's pre-tokenized ones, right-padded by `RightPadCollator`; no chat template is applied.

A step is the time between ``on_step_begin`` and ``on_step_end`` of a `TrainerCallback`: student and teacher
forward, loss, backward, clipping, optimizer and scheduler step. Fetching and collating the batch happen before
``on_step_begin`` and are not included. The first step is warm-up and excluded from the figures.

Run it with TRL's own environment (``bash benchmarks/trl_env.sh``); TRL is never installed in the project's
``.venv``. A comparison harness runs it as a subprocess, with the same models, data, batch size and temperature as
the project's step, and reads the JSON it writes:

    .venv-trl/bin/python benchmarks/trl_gkd_step.py --teacher DIR --student DIR --data FILE \
        --steps 20 --batch-size 8 --temperature 2.0 --out benchmarks/results/trl_gkd_step.json

JSON fields: ``median_step_seconds`` and ``supervised_tokens_per_second`` (warm-up excluded), the per-step lists
(``step_seconds``, ``supervised_tokens``, ``losses``; warm-up included), ``rss_after_load_mb`` (resident set just
after both models are loaded) and ``peak_rss_mb`` (the process high-water mark at the end, ``ru_maxrss``, Linux
KiB / 1024). ``peak_rss_mb - rss_after_load_mb`` is what training added on top of the two models.
"""

from __future__ import annotations

import os

# Before any Hugging Face import: no network (TRL pings telemetry on trainer start), no experimental-API notice.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
import trl
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from trl.experimental.gkd import GKDConfig, GKDTrainer

IGNORE_INDEX = -100
WARMUP_STEPS = 1


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux ``/proc``; falls back to the high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """High-water mark of this process's resident set, in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on; transformers 5 renamed the attribute."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def load_examples(path: Path) -> list[dict[str, list[int]]]:
    """The project's pre-tokenized examples: a ``torch.save``d list of ``{"input_ids", "labels"}`` dicts."""
    records = torch.load(path, weights_only=True)
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty list of examples, got {type(records).__name__}.")
    examples = []
    for i, record in enumerate(records):
        input_ids, labels = list(map(int, record["input_ids"])), list(map(int, record["labels"]))
        if len(input_ids) != len(labels):
            raise ValueError(f"{path}: example {i} has {len(input_ids)} input_ids but {len(labels)} labels.")
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


@dataclass
class RightPadCollator:
    """Right-pads pre-tokenized examples into the batch `GKDTrainer` consumes.

    ``compute_loss`` reads ``input_ids``, ``attention_mask`` and ``labels`` (unshifted, ``-100`` where there is no
    target; it shifts them itself). ``prompts`` / ``prompt_attention_mask`` are read only by the generation branch
    of ``training_step`` (``lmbda > 0`` or ``seq_kd``), never taken here; they are built anyway, left-padded like
    TRL's own ``DataCollatorForChatML``, so the batch honours the trainer's full contract. The prompt is the prefix
    before the first supervised label. Right padding (unlike TRL's left-padding collator) keeps every real token at
    the position id it has unpadded, as in the project's collator, so both sides compute the same logits.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n, width = len(examples), max(len(e["input_ids"]) for e in examples)
        prompt_lens = [
            next((i for i, y in enumerate(e["labels"]) if y != IGNORE_INDEX), len(e["labels"])) for e in examples
        ]
        prompt_width = max(max(prompt_lens), 1)

        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        prompts = torch.full((n, prompt_width), self.pad_token_id, dtype=torch.long)
        prompt_attention_mask = torch.zeros((n, prompt_width), dtype=torch.long)
        for row, (example, prompt_len) in enumerate(zip(examples, prompt_lens)):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"])
            attention_mask[row, :length] = 1
            labels[row, :length] = torch.tensor(example["labels"])
            if prompt_len:
                prompts[row, -prompt_len:] = input_ids[row, :prompt_len]
                prompt_attention_mask[row, -prompt_len:] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompts": prompts,
            "prompt_attention_mask": prompt_attention_mask,
        }


class BenchmarkGKDTrainer(GKDTrainer):
    """`GKDTrainer` with bookkeeping that stays outside the timed step, and optionally the distillation temperature.

    * ``get_batch_samples`` (called once per optimizer step, before ``on_step_begin``) records the number of
      supervised tokens of the step: ``labels[:, 1:] != -100``, the positions ``compute_loss`` keeps after its shift.
    * ``training_step`` records the (detached) loss tensor; it is read only after training.
    * With ``loss_temperature=True``, ``generalized_jsd_loss`` is called with ``temperature=args.temperature``;
      stock ``compute_loss`` leaves it at its default of 1.0.
    """

    def __init__(self, *args: Any, loss_temperature: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_temperature = loss_temperature
        self.step_supervised_tokens: list[int] = []
        self.loss_tokens: list[int] = []
        self.step_losses: list[torch.Tensor] = []

    def generalized_jsd_loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # shadows TRL's staticmethod
        if self.loss_temperature:
            kwargs["temperature"] = self.temperature
        return GKDTrainer.generalized_jsd_loss(*args, **kwargs)

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> tuple[list[dict[str, Any]], torch.Tensor | int | None]:
        batch_samples, num_items_in_batch = super().get_batch_samples(*args, **kwargs)
        self.step_supervised_tokens.append(
            sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batch_samples)
        )
        return batch_samples, num_items_in_batch

    def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """Records the supervised tokens the loss is taken on: on an on-policy step, the student's samples."""
        self.loss_tokens.append(int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()))
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        self.step_losses.append(loss.detach())
        return loss


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, from ``on_step_begin`` to ``on_step_end`` (``time.perf_counter``)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, type=Path, help="teacher folder (save_pretrained)")
    parser.add_argument("--student", required=True, type=Path, help="student folder, with its tokenizer")
    parser.add_argument("--data", required=True, type=Path, help="torch.save'd list of {input_ids, labels}")
    parser.add_argument("--steps", required=True, type=int, help="optimizer steps, the first is warm-up (>= 2)")
    parser.add_argument("--batch-size", required=True, type=int)
    parser.add_argument("--temperature", required=True, type=float)
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument("--lmbda", type=float, default=0.0, help="GKD's on-policy share (student samples)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="sampled tokens per prompt when on-policy")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--stock-loss",
        action="store_true",
        help="TRL's loss as shipped: the KL at T=1 whatever --temperature is (which then only sets sampling)",
    )
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be > {WARMUP_STEPS}: the first step is warm-up and not measured.")
    if args.batch_size < 1 or args.temperature <= 0:
        parser.error("--batch-size must be >= 1 and --temperature > 0.")
    return args


def main() -> None:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    rss_after_load = current_rss_mb()
    peak_rss_after_load = peak_rss_mb()

    train_dataset = datasets.Dataset.from_list(load_examples(args.data))

    with tempfile.TemporaryDirectory(prefix="trl_gkd_step_") as output_dir:  # nothing is saved; Trainer wants one
        config = GKDConfig(
            output_dir=output_dir,
            # Forward KL at the given temperature, on the dataset's completions (lmbda=0) or, with probability
            # lmbda per step, on completions the student samples at that temperature.
            lmbda=args.lmbda,
            max_new_tokens=args.max_new_tokens,
            seq_kd=False,
            beta=0.0,
            temperature=args.temperature,
            disable_dropout=True,
            # Optimizer: torch.optim.AdamW as the project uses it (transformers defaults to the fused variant).
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            optim="adamw_torch",
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=args.max_grad_norm,
            seed=args.seed,
            # fp32 on CPU; TRL defaults to bf16=True and gradient_checkpointing=True.
            use_cpu=True,
            bf16=False,
            fp16=False,
            activation_checkpointing=False,  # transformers 5.x name; TRL's `gradient_checkpointing=True` maps onto it
            # Examples in file order, collated in the main process, nothing dropped.
            train_sampling_strategy="sequential",
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            dataloader_drop_last=False,
            max_length=None,  # the examples are used as given (and the preparation that would truncate is skipped)
            # No evaluation, checkpoints, logging integrations or progress bars.
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        timer = StepTimer()
        trainer = BenchmarkGKDTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            data_collator=RightPadCollator(pad_token_id=tokenizer.pad_token_id),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=[timer],
            loss_temperature=not args.stock_loss,
        )
        trainer.remove_callback(PrinterCallback)  # stdout carries only the JSON
        if is_checkpointing(trainer.model):
            raise RuntimeError("Activation checkpointing is on; the benchmark measures the plain step.")
        trainer.train()

    if len(timer.seconds) != args.steps or len(trainer.step_supervised_tokens) < args.steps:
        raise RuntimeError(
            f"Expected {args.steps} timed steps, got {len(timer.seconds)} timings and "
            f"{len(trainer.step_supervised_tokens)} batches."
        )
    step_seconds = timer.seconds
    # On-policy, the loss is on the sampled tokens, known only once the student has written them.
    supervised = (trainer.loss_tokens if args.lmbda > 0 else trainer.step_supervised_tokens)[: args.steps]
    measured = slice(WARMUP_STEPS, None)
    results = {
        "framework": "trl.experimental.gkd.GKDTrainer",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "teacher": str(args.teacher),
        "student": str(args.student),
        "data": str(args.data),
        "examples": len(train_dataset),
        "steps": args.steps,
        "warmup_steps": WARMUP_STEPS,
        "batch_size": args.batch_size,
        "temperature": args.temperature,
        "temperature_in_loss": args.temperature if not args.stock_loss else 1.0,
        "lmbda": args.lmbda,
        "max_new_tokens": args.max_new_tokens,
        "loss": "forward KL(teacher||student) per supervised token (GKD beta=0), no T**2, no CE",
        "lr": args.lr,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "median_step_seconds": statistics.median(step_seconds[measured]),
        "mean_step_seconds": statistics.fmean(step_seconds[measured]),
        # Throughput over the measured steps: their supervised tokens over their total time.
        "supervised_tokens_per_second": sum(supervised[measured]) / sum(step_seconds[measured]),
        "rss_after_load_mb": rss_after_load,
        "peak_rss_after_load_mb": peak_rss_after_load,
        "peak_rss_mb": peak_rss_mb(),
        "step_seconds": step_seconds,
        "supervised_tokens": supervised,
        "losses": [float(loss) for loss in trainer.step_losses[: args.steps]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
