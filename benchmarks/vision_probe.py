"""Can a Glm4v of the screenshot demo's teacher shape, trained from scratch on CPU, learn to read a launcher page?

    python benchmarks/vision_probe.py                  # ~6 min on 2 cores
    python benchmarks/vision_probe.py --steps 1000     # longer curves

Small questions about one screenshot, each answered in a few tokens, trained with AdamW from a random init
(``conf/teacher/scratch_vision.yaml``'s shape, batch 16, constant LR, fresh samples every step):

- ``colour_full``: the whole screen is one icon colour; answer it. The image path works at all.
- ``colour_text``: the same answer, with 3 of 32 word slots naming the colour and the rest ``wall``: picking a
  few tokens out of many, in text.
- ``colour_tile``: one icon tile (``autoglm_distill.data.launcher``) on the wallpaper; answer its colour. Picking
  one image token out of 32.
- ``position_tile``: one tile; answer its row and column. What a tap needs.

Also measured once, before any training: whether the tile's row can be read linearly from the mean of the image
tokens (a logistic-regression probe on held-out screens), i.e. whether the random vision tower passes the
position on at all. Prints a table (final loss, chance loss, share of 64 fresh examples answered right), writes JSON and
a plot of the learning curves to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoglm_distill.data import launcher, synth  # noqa: E402
from autoglm_distill.models import build_model  # noqa: E402
from autoglm_distill.tokenizer import build_image_processor, train_glm_tokenizer  # noqa: E402

SIZE = (112, 224)
IMAGE = "<|begin_of_image|>" + "<|image|>" * 32 + "<|end_of_image|>"  # 112 x 224: 4 x 8 merged tokens
COLOURS = tuple(launcher.COLOURS)
# (task, learning rate): the demo teacher's LR, and a 10x lower one where it matters
RUNS = (
    ("colour_full", 3e-3),
    ("colour_text", 3e-3),
    ("colour_tile", 3e-3),
    ("colour_tile", 3e-4),
    ("position_tile", 3e-3),
    ("position_tile", 3e-4),
)


def chance_losses(tokenizer) -> dict[str, float]:
    """Mean loss per answer token when guessing uniformly: a colour is one token; a position's log(7) + log(4) is
    spread over the answer's tokens."""
    position_tokens = len(tokenizer(" 3, column 2", add_special_tokens=False)["input_ids"])
    chance = {task: math.log(len(COLOURS)) for task, _ in RUNS if task != "position_tile"}
    return chance | {"position_tile": (math.log(launcher.ROWS) + math.log(launcher.COLUMNS)) / position_tokens}


def sample(task: str, rng: random.Random) -> tuple[Image.Image | None, str, str]:
    """(screenshot or None, prompt, answer) for one example of ``task``."""
    app = rng.choice(synth.APPS)
    colour = launcher.ICONS[app][0]
    if task == "colour_full":
        return (
            Image.new("RGB", SIZE, launcher.COLOURS[colour]),
            f"<|user|>Colour?{IMAGE}<|assistant|>It is",
            f" {colour}",
        )
    if task == "colour_text":
        words = ["wall"] * 32
        for i in rng.sample(range(32), 3):
            words[i] = colour
        return None, f"<|user|>Colour? {' '.join(words)}<|assistant|>It is", f" {colour}"
    cell = rng.randrange(launcher.COLUMNS * launcher.ROWS)
    screen = launcher.render(launcher.page(rng, [app], {app: cell}), SIZE)
    if task == "colour_tile":
        return screen, f"<|user|>Colour?{IMAGE}<|assistant|>It is", f" {colour}"
    row, col = divmod(cell, launcher.COLUMNS)
    return screen, f"<|user|>Where?{IMAGE}<|assistant|>In row", f" {row + 1}, column {col + 1}"


def batch_inputs(examples, tokenizer, image_processor) -> dict[str, torch.Tensor]:
    ids, labels = [], []
    for _, prompt, answer in examples:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    out = {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
    }
    if examples[0][0] is not None:
        out.update(image_processor(images=[e[0] for e in examples], return_tensors="pt"))
        out["mm_token_type_ids"] = (out["input_ids"] == tokenizer.convert_tokens_to_ids("<|image|>")).long()
    return out


def answer_accuracy(model, batch: dict[str, torch.Tensor]) -> float:
    """Share of examples whose every answer token the model ranks first (teacher forcing)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    target = batch["labels"][:, 1:]
    right = (logits.argmax(-1) == target) | (target == -100)
    return float(right.all(dim=1).float().mean())


def train_curve(task: str, lr: float, steps: int, config: dict, tokenizer, image_processor, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build_model("glm4v", config, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = random.Random(seed)
    curve, window, started = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        loss = model(**batch_inputs([sample(task, rng) for _ in range(16)], tokenizer, image_processor)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        window.append(loss.item())
        if step % 25 == 0:
            curve.append((step, sum(window) / len(window)))
            window = []
    fresh = random.Random(seed + 1)
    held = batch_inputs([sample(task, fresh) for _ in range(64)], tokenizer, image_processor)
    return {
        "task": task,
        "lr": lr,
        "steps": steps,
        "curve": curve,
        "final_loss": curve[-1][1],
        "answer_accuracy": answer_accuracy(model, held),
        "seconds": round(time.perf_counter() - started, 1),
    }


def row_probe(config: dict, tokenizer, image_processor, seed: int) -> float:
    """Held-out accuracy of a linear probe reading the tile's row from the mean image token of a random init."""
    torch.manual_seed(seed)
    model = build_model("glm4v", config, tokenizer)
    rng = random.Random(seed)
    feats, rows = [], []
    with torch.no_grad():
        for _ in range(20):
            examples = [sample("position_tile", rng) for _ in range(16)]
            pixels = image_processor(images=[e[0] for e in examples], return_tensors="pt")
            tokens = model.model.get_image_features(**pixels).pooler_output
            feats += [t.mean(0) for t in tokens]
            rows += [int(e[2].split(",")[0]) - 1 for e in examples]
    x, y = torch.stack(feats), torch.tensor(rows)
    x = (x - x[:240].mean(0)) / (x[:240].std(0) + 1e-8)
    w = torch.zeros(x.shape[1], launcher.ROWS, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=0.05)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(x[:240] @ w, y[:240])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(((x[240:] @ w).argmax(1) == y[240:]).float().mean())


def plot(results: list[dict], chance: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, losses, label=f"{r['task']} lr={r['lr']:g}")
    for task, value in chance.items():
        ax.axhline(value, color="grey", lw=0.6, ls=":")
        ax.annotate(f"chance {task}", (0, value), fontsize=7, color="grey", va="bottom")
    ax.set(xlabel="step (batch 16)", ylabel="answer-token loss (nats)", yscale="log", title=__doc__.splitlines()[0])
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vision_probe.json")
    args = parser.parse_args()

    config = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "teacher" / "scratch_vision.yaml").scratch.config)
    corpus = [p + a for task, _ in RUNS for p, a in (sample(task, random.Random(i))[1:] for i in range(200))]
    tokenizer = train_glm_tokenizer(corpus, vocab_size=512)
    image_processor = build_image_processor(SIZE)
    chance = chance_losses(tokenizer)

    probe = row_probe(config, tokenizer, image_processor, args.seed)
    results = []
    for task, lr in RUNS:
        results.append(train_curve(task, lr, args.steps, config, tokenizer, image_processor, args.seed))
        r = results[-1]
        print(
            f"{task} lr={lr:g}: loss {r['final_loss']:.3f} (chance {chance[task]:.3f}) in {r['seconds']} s", flush=True
        )

    print(f"\nrow of the tile read linearly from the mean image token at init (held-out screens): {probe:.2f}")
    print(f"\n| task | lr | loss after {args.steps} steps | chance loss | answers right (64 fresh) | by chance |")
    print("|---|---|---|---|---|---|")
    for r in results:
        odds = 1 / (launcher.ROWS * launcher.COLUMNS) if r["task"] == "position_tile" else 1 / len(COLOURS)
        print(
            f"| {r['task']} | {r['lr']:g} | {r['final_loss']:.3f} | {chance[r['task']]:.3f} | "
            f"{r['answer_accuracy']:.2f} | {odds:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"steps": args.steps, "row_probe_at_init": probe, "chance": chance, "runs": results}, indent=1)
        + "\n"
    )
    plot(results, chance, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
