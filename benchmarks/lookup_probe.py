"""Can the demo teacher's shape learn to look an element up by its name, the step its home-screen taps fail on?

    python benchmarks/lookup_probe.py                 # ~9 min on 2 cores
    python benchmarks/lookup_probe.py --steps 8000 --tasks icon_lookup --out benchmarks/results/lookup_probe_long.json
    python benchmarks/lookup_probe.py --steps 1500 --tasks icon_lookup --recall-first 2500 \
        --out benchmarks/results/lookup_probe_transfer.json

A tap on a named element needs the model to find the line ``[k] Settings @ [870,200]`` whose name is the one in
its thought and copy the coordinates after it: associative recall (a key, then its value a few tokens later). The
demo teacher lands 15 of 122 home-screen icon taps on its own *training* steps (``benchmarks/teacher_errors.py``).
Four small runs of ``conf/teacher/scratch_text.yaml``'s GLM-4 shape from a random init (AdamW, constant LR, fresh
samples every step) separate "cannot copy" from "cannot find":

- ``icon_one``: the agent's prompt and answer (task, screen info, element list, reference thought, tap; no system
  prompt, no history) on a home screen with **one** icon: copy its coordinates. The control.
- ``icon_lookup``: the same with **2 or 3** icons: find the named one, copy its coordinates.
- ``recall_one``: raw tokens ``k1 v1 ; k2 v2 ; k3 v3 | kq`` -> ``vq`` (3 pairs, one query, loss on it only).
- ``recall_all``: the same pairs, then all three keys queried in random order, loss on every answer (denser
  supervision: three lookups per sequence instead of one). Accuracy on the first query (no earlier answer helps).

``--recall-first N`` starts every run from a model trained on ``recall_all`` for N steps: whether the recall
circuit, once made on raw tokens, carries over to the agent's element list.

Accuracy: share of fresh held-out examples whose coordinates (both) or value the model ranks first, teacher-forced.
Prints a table, writes JSON and a plot of the accuracy curves to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoglm_distill.data import synth  # noqa: E402
from autoglm_distill.data.episodes import EpisodeFormat, check_episode, step_chats  # noqa: E402
from autoglm_distill.models import build_model  # noqa: E402
from autoglm_distill.tokenizer import train_glm_tokenizer  # noqa: E402

# (task, batch size, share of --steps): the raw recall runs are cheap (12-tokens sequences), so they get 64 a batch
RUNS = (("icon_one", 16, 0.25), ("icon_lookup", 16, 1.0), ("recall_one", 64, 1.0), ("recall_all", 64, 1.0))
PAIRS, KEYS, VALUES = 3, 15, 40  # raw recall: pairs per sequence, key and value vocabularies


def icon_example(rng: random.Random, n_icons: int) -> str:
    """The chat text of one home-screen tap with ``n_icons`` icons on screen, answer included."""
    shown = rng.sample(synth.APPS, n_icons)
    app = rng.choice(shown)
    screen = synth.home_screen(rng, shown)
    episode = synth.Episode(f"Open {app}", "probe")
    episode.press(screen, f"The {app} icon is on the home screen, so I tap it.", screen.find(app))
    record = check_episode(synth.episode_record("probe", episode, images=False), Path("."))
    return step_chats(record, EpisodeFormat("", history_steps=0, elements_in_text=True))[0]["messages"]


def icon_batch(tokenizer, rng: random.Random, n: int, lookup: bool) -> tuple[dict, torch.Tensor]:
    """Inputs with labels on the answer, and a mask of the coordinate tokens (to score the tap)."""
    ids, labels, scored = [], [], []
    for _ in range(n):
        text = tokenizer.apply_chat_template(icon_example(rng, rng.choice((2, 3)) if lookup else 1), tokenize=False)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start = text.index("<|assistant|>")
        x_at = text.index("element=[") + len("element=[")
        end = text.index("]", x_at)
        starts = [s for s, _ in enc["offset_mapping"]]
        ids.append(enc["input_ids"])
        labels.append([t if s >= start else -100 for t, s in zip(enc["input_ids"], starts, strict=True)])
        scored.append([x_at <= s < end and text[s].isdigit() for s in starts])
    return pad(ids, labels, tokenizer.pad_token_id), pad_mask(scored)


def recall_batch(rng: random.Random, n: int, all_queries: bool, base: int) -> tuple[dict, torch.Tensor]:
    """Raw recall sequences over token ids ``base..``, and a mask of the scored answer (the first query's value)."""
    key, value, sep, bar = base, base + KEYS, base + KEYS + VALUES, base + KEYS + VALUES + 1
    ids, labels, scored = [], [], []
    for _ in range(n):
        keys = rng.sample(range(KEYS), PAIRS)
        values = [rng.randrange(VALUES) for _ in keys]
        seq = [t for k, v in zip(keys, values, strict=True) for t in (key + k, value + v, sep)] + [bar]
        lab = [-100] * len(seq)
        for q in rng.sample(range(PAIRS), PAIRS if all_queries else 1):
            seq += [key + keys[q], value + values[q]]
            lab += [-100, value + values[q]]
        ids.append(seq)
        labels.append(lab)
        scored.append([i == len(seq) - 2 * (PAIRS if all_queries else 1) + 1 for i in range(len(seq))])
    return pad(ids, labels, 0), pad_mask(scored)


def pad(ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict:
    width = max(map(len, ids))
    return {
        "input_ids": torch.tensor([x + [pad_id] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
    }


def pad_mask(rows: list[list[bool]]) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [False] * (width - len(r)) for r in rows])


def make_batch(task: str, tokenizer, rng: random.Random, n: int) -> tuple[dict, torch.Tensor]:
    if task.startswith("icon"):
        return icon_batch(tokenizer, rng, n, lookup=task == "icon_lookup")
    return recall_batch(rng, n, all_queries=task == "recall_all", base=len(tokenizer) - KEYS - VALUES - 2)


@torch.no_grad()
def accuracy(model, batch: dict, scored: torch.Tensor) -> float:
    """Share of examples whose scored tokens (the tap's digits, or the first recalled value) all rank first."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    right = (logits.argmax(-1) == batch["input_ids"][:, 1:]) | ~scored[:, 1:]
    return float(right.all(dim=1).float().mean())


def fit(model, optimizer, task: str, batch_size: int, steps: int, tokenizer, seed: int) -> list[tuple[int, float]]:
    """Train on fresh ``task`` samples; held-out accuracy at 8 points along the way."""
    rng, held = random.Random(seed), make_batch(task, tokenizer, random.Random(seed + 1), 256)
    curve = []
    for step in range(1, steps + 1):
        batch, _ = make_batch(task, tokenizer, rng, batch_size)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % max(1, steps // 8) == 0 or step == steps:
            curve.append((step, accuracy(model.eval(), *held)))
            model.train()
    return curve


def train_curve(
    task: str, batch_size: int, steps: int, lr: float, config: dict, tokenizer, seed: int, recall_first: int
) -> dict:
    """One run from a random init; with ``recall_first`` steps of ``recall_all`` (batch 64) before ``task``."""
    torch.manual_seed(seed)
    model = build_model("glm4", config, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    started, result = time.perf_counter(), {"task": task, "batch_size": batch_size, "steps": steps, "lr": lr}
    if recall_first:
        first = fit(model, optimizer, "recall_all", 64, recall_first, tokenizer, seed)
        result |= {"recall_first": recall_first, "recall_first_accuracy": first[-1][1]}
    curve = fit(model, optimizer, task, batch_size, steps, tokenizer, seed)
    return result | {"curve": curve, "accuracy": curve[-1][1], "seconds": round(time.perf_counter() - started, 1)}


def chance(task: str) -> float:
    """Accuracy of picking one of the pairs on screen or in the sequence at random."""
    return {"icon_one": 1.0, "icon_lookup": (1 / 2 + 1 / 3) / 2}.get(task, 1 / PAIRS)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        steps, acc = zip(*r["curve"], strict=True)
        line = ax.plot(steps, acc, marker="o", label=f"{r['task']} (batch {r['batch_size']})")[0]
        ax.axhline(chance(r["task"]), color=line.get_color(), lw=0.6, ls=":")
    ax.set(xlabel="step", ylabel="held-out accuracy (dotted: chance)", ylim=(0, 1.05), title=__doc__.splitlines()[0])
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3, help="the demo teacher's 3e-3 learns the probes worse")
    parser.add_argument("--tasks", nargs="+", default=[t for t, _, _ in RUNS], choices=[t for t, _, _ in RUNS])
    parser.add_argument(
        "--recall-first", type=int, default=0, help="train recall_all this many steps first: does the circuit transfer?"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lookup_probe.json")
    args = parser.parse_args()

    config = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "teacher" / "scratch_text.yaml").scratch.config)
    rng = random.Random(args.seed)
    chats = [icon_example(rng, rng.randint(1, 12)) for _ in range(300)]
    corpus = [c if isinstance(c, str) else c[0]["text"] for chat in chats for c in (m["content"] for m in chat)]
    tokenizer = train_glm_tokenizer(corpus, vocab_size=512)
    results = []
    for task, batch_size, share in (r for r in RUNS if r[0] in args.tasks):
        steps = max(1, round(args.steps * share))
        results.append(train_curve(task, batch_size, steps, args.lr, config, tokenizer, args.seed, args.recall_first))
        r = results[-1]
        made = r.get("recall_first_accuracy")
        first = f" (after {args.recall_first} steps of recall_all: {made:.2f})" if made is not None else ""
        print(f"{task}: accuracy {r['accuracy']:.2f} after {steps} steps{first}, {r['seconds']} s")

    print("\n| task | batch | steps | held-out accuracy | an icon or pair at random | curve (step: accuracy) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        curve = ", ".join(f"{s}: {a:.2f}" for s, a in r["curve"])
        odds = chance(r["task"])
        print(f"| {r['task']} | {r['batch_size']} | {r['steps']} | {r['accuracy']:.2f} | {odds:.2f} | {curve} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"lr": args.lr, "seed": args.seed, "config": config, "runs": results}, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
