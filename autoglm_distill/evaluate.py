"""Evaluation: greedy generation scored with Open-AutoGLM's action parser, teacher-forced CE and agreement, and the
run's eval tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import datasets
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table
from transformers import PreTrainedModel

from autoglm_distill import environment
from autoglm_distill.actions import ActionMetrics
from autoglm_distill.data.phone import ChatEncoder, Collator, PhoneDataModule, model_inputs
from autoglm_distill.models import count_parameters
from autoglm_distill.utils import rank_zero_logger, write_json_atomic

log = rank_zero_logger(__name__)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, length - len(p) :] = torch.as_tensor(p)
        attention_mask[i, length - len(p) :] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate_batch(
    model: PreTrainedModel, encoder: ChatEncoder, chats: list[list[dict]], root: Path, max_new_tokens: int
) -> list[str]:
    """Greedy answers of ``model`` to one batch of chats (each ending in the turn to answer; left-padded, KV cache)."""
    tokenizer = encoder.tokenizer
    prompts, images = [], []
    for messages in chats:
        ids, paths = encoder.encode_prompt(messages, root)
        prompts.append(ids)
        images += paths
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if images:
        inputs.update(encoder.pixels(images, root))
        inputs["mm_token_type_ids"] = (input_ids == encoder.image_token_id).long()
    device = next(model.parameters()).device
    out = model.generate(
        **{k: v.to(device) for k, v in inputs.items()},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)


def generate_answers(
    model: PreTrainedModel,
    encoder: ChatEncoder,
    split: datasets.Dataset,
    root: Path,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers of ``model`` to every prompt of ``split``, ``batch_size`` at a time."""
    model.eval()
    answers: list[str] = []
    for start in track(range(0, len(split), batch_size), description=desc, transient=True):
        chats = [json.loads(m) for m in split[start : start + batch_size]["messages"]]
        answers += generate_batch(model, encoder, chats, root, max_new_tokens)
    return answers


def score_answers(answers: list[str], split: datasets.Dataset) -> dict[str, float]:
    """``ActionMetrics`` of ``answers`` against the split's references (with episode success when it has episodes)."""
    references = [json.loads(m)[-1]["content"] for m in split["messages"]]
    bboxes = [b or None for b in split["bbox"]]
    # Episode success when the split holds episodes; a one-chat line counts as an episode of one step.
    has_episodes = "episode" in split.column_names and any(split["episode"])
    episodes = [e or i for e, i in zip(split["episode"], split["id"])] if has_episodes else None
    metric = ActionMetrics(sync_on_compute=False)  # all of the split is here (rank 0 evaluates alone)
    metric.update(answers, references, bboxes, episodes)
    return {k: float(v) for k, v in metric.compute().items()}


@torch.no_grad()
def teacher_forced(
    model: PreTrainedModel,
    teacher: PreTrainedModel | None,
    encoder: ChatEncoder,
    split: datasets.Dataset,
    root: Path,
    batch_size: int = 32,
) -> dict[str, float]:
    """Per-token CE on the reference answers and top-1 agreement with the teacher (same positions)."""
    model.eval()
    device = next(model.parameters()).device
    collate = Collator(encoder, root)
    ce_sum, agree_sum, n = 0.0, 0.0, 0
    for start in range(0, len(split), batch_size):
        batch = collate([split[i] for i in range(start, min(start + batch_size, len(split)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = model_inputs(batch)
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        logits = model(**inputs).logits[:, :-1][mask].float()
        ce_sum += torch.nn.functional.cross_entropy(logits, labels[mask], reduction="sum").item()
        if teacher is not None:
            teacher_logits = teacher(**inputs).logits[:, :-1][mask]
            agree_sum += (logits.argmax(-1) == teacher_logits.argmax(-1)).sum().item()
        n += int(mask.sum())
    result = {"ce": ce_sum / max(n, 1)}
    if teacher is not None:
        result["top1_agreement"] = agree_sum / max(n, 1)
    return result


def evaluate_models(
    models: dict[str, PreTrainedModel],
    teacher: PreTrainedModel | None,
    datamodule: PhoneDataModule,
    splits: Sequence[str],
    out_dir: Path,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    closed_loop: bool = False,
) -> dict[str, dict]:
    """Greedy-generation action metrics and teacher-forced metrics for every model on every split; each model's
    answers are written to ``<out_dir>/predictions/<model>_<split>.json``. With ``closed_loop``, also each split's
    episodes played on the synthetic phone (`autoglm_distill.environment`): ``closed_loop_success``,
    ``closed_loop_progress``."""

    results: dict[str, dict] = {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = datamodule.encoder
    for name, model in models.items():
        model.to(device)
        results[name] = {"params": count_parameters(model)}
        for split in splits:
            data = datamodule.splits[split]
            if limit is not None:
                data = data.select(range(min(limit, len(data))))
            answers = generate_answers(
                model, encoder, data, datamodule.root, batch_size, max_new_tokens, desc=f"{name} on {split}"
            )
            metrics = score_answers(answers, data)
            reference = None if name == "teacher" or teacher is None else teacher.to(device)
            metrics.update(teacher_forced(model, reference, encoder, data, datamodule.root, batch_size))
            if closed_loop:
                episodes = environment.read_episodes(datamodule.root, split)
                answer = partial(generate_batch, model, encoder, root=datamodule.root, max_new_tokens=max_new_tokens)
                played = environment.closed_loop(answer, episodes, datamodule.episode_format, batch_size)
                metrics.update(closed_loop_success=played["episode_success"], closed_loop_progress=played["progress"])
            results[name][split] = metrics
            write_json_atomic(
                out_dir / "predictions" / f"{name}_{split}.json",
                [{"id": i, "answer": a} for i, a in zip(data["id"], answers)],
            )
            log.info("%s on %s: %s", name, split, {k: round(v, 4) for k, v in metrics.items()})
    return results


TABLE_COLUMNS = [
    "params",
    "action_type_acc",
    "tap_in_element",
    "tap_within_14pct",
    "step_success",
    "episode_success",  # "-" for a split without episodes
    "exact_match",
    "parse_rate",
    "top1_agreement",
    "ce",
]
CLOSED_LOOP_COLUMNS = ["closed_loop_success", "closed_loop_progress"]  # shown when measured (eval.closed_loop)


def table_columns(results: dict[str, dict], split: str) -> list[str]:
    """TABLE_COLUMNS, then the closed-loop ones when any model has them on ``split``."""
    measured = [c for c in CLOSED_LOOP_COLUMNS if any(c in r.get(split, {}) for r in results.values())]
    return TABLE_COLUMNS + measured


def eval_rows(results: dict[str, dict], split: str) -> list[list[str]]:
    """One row of formatted cells per model: name, then `table_columns`."""
    rows = []
    for name, r in results.items():
        m = r.get(split, {})
        cells = [f"{m[c]:.3f}" if c in m else "-" for c in table_columns(results, split)[1:]]
        rows.append([name, f"{r['params']:,}", *cells])
    return rows


def report_tables(results: dict[str, dict], splits: Sequence[str], out_dir: Path) -> None:
    """Print the eval table of every split and write it as Markdown to <run dir>/results.md."""
    markdown = []
    for split in splits:
        table = Table(title=f"autoglm_distill: {split} split")
        table.add_column("model")
        columns = table_columns(results, split)
        for c in columns:
            table.add_column(c, justify="right")
        rows = eval_rows(results, split)
        for row in rows:
            table.add_row(*row)
        Console(width=140).print(table)
        header = ["model", *columns]
        markdown += [f"**{split} split**", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        markdown += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    (out_dir / "results.md").write_text("\n".join(markdown))
