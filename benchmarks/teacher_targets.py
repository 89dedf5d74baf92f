"""How much the teacher's soft targets say beyond the hard labels, on the answer tokens of each split.

    python benchmarks/teacher_targets.py --teacher outputs/demo/<time>/teacher --data data/synth_phone \
        --history-steps 1 --elements-in-text

Per split: mean entropy of the teacher's next-token distribution (nats), mean probability it gives the reference
token, and the share of tokens where that probability exceeds 0.99. Near-one-hot targets on the training split
mean forward KD there is close to training on the labels. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from autoglm_distill.data.episodes import EpisodeFormat  # noqa: E402
from autoglm_distill.data.phone import ChatEncoder, Collator, load_split, model_inputs  # noqa: E402


@torch.no_grad()
def target_stats(model, encoder: ChatEncoder, data: Path, split: str, fmt: EpisodeFormat, limit: int) -> dict:
    rows, _ = load_split(data, split, encoder, fmt=fmt)
    collate = Collator(encoder, data)
    entropy = p_ref = sharp = 0.0
    tokens = 0
    for start in range(0, min(len(rows), limit), 32):
        batch = collate([rows[i] for i in range(start, min(start + 32, len(rows), limit))])
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        logp = model(**model_inputs(batch)).logits[:, :-1][mask].float().log_softmax(-1)
        entropy += float(-(logp.exp() * logp).sum())
        p = logp.gather(1, labels[mask][:, None]).squeeze(1).exp()
        p_ref += float(p.sum())
        sharp += float((p > 0.99).sum())
        tokens += int(mask.sum())
    return {
        "entropy_nats": entropy / tokens,
        "p_reference": p_ref / tokens,
        "share_p_reference_over_0.99": sharp / tokens,
        "tokens": tokens,
        "examples": min(len(rows), limit),
    }


def add_teacher_args(parser: argparse.ArgumentParser, out: str) -> None:
    """The options of a benchmark that runs a text teacher over data splits in a run's chat format."""
    parser.add_argument("--teacher", type=Path, required=True, help="a text teacher folder (from_pretrained)")
    parser.add_argument("--data", type=Path, required=True, help="a data folder with train/val/test.jsonl")
    parser.add_argument("--splits", nargs="+", default=["train", "test"])
    parser.add_argument("--history-steps", type=int, default=None)
    parser.add_argument("--elements-in-text", action="store_true")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path(out))


def load_teacher(args: argparse.Namespace) -> tuple:
    """The teacher (eval mode), its chat encoder and the episode format named by ``add_teacher_args``'s options."""
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    model = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    encoder = ChatEncoder(tokenizer, max_length=args.max_length)
    return model, encoder, EpisodeFormat(history_steps=args.history_steps, elements_in_text=args.elements_in_text)


def write_result(args: argparse.Namespace, result: dict) -> None:
    """``result`` per split, with the teacher and data it was measured on, to ``--out`` as JSON."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"teacher": str(args.teacher), "data": str(args.data), **result}, indent=2))
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_args(parser, "benchmarks/results/teacher_targets.json")
    parser.add_argument("--limit", type=int, default=800, help="examples per split")
    args = parser.parse_args()
    model, encoder, fmt = load_teacher(args)
    result = {s: target_stats(model, encoder, args.data, s, fmt, args.limit) for s in args.splits}
    print("| split | examples | answer tokens | entropy (nats) | p(reference) | share p(reference) > 0.99 |")
    print("|---|---|---|---|---|---|")
    for split, r in result.items():
        print(
            f"| {split} | {r['examples']} | {r['tokens']} | {r['entropy_nats']:.3f} | {r['p_reference']:.3f} "
            f"| {r['share_p_reference_over_0.99']:.3f} |"
        )
    write_result(args, result)


if __name__ == "__main__":
    main()
