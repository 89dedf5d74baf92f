"""Deterministic synthetic phone tasks in Open-AutoGLM's chat format.

Each example is one agent step: a screen (app name + 4-8 UI elements on the 0-1000 grid, optionally drawn
as a PNG), a task, and a reference answer ``<think>…</think><answer>ACTION</answer>``. The task wording
and the element list alone determine the action, so text-only students can learn it too.

Usage::

    python -m autoglm_distill.data.synth --out data/synth --n-train 2000 --seed 0
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from autoglm_distill.data import SPLITS, SYSTEM_PROMPT

FORMAT_VERSION = 1
# The parameters a folder was generated with; the folder appears whole (renamed into place), this file with it.
META_FILE = "synth_meta.json"
# Roughly the task mix of real agent traces: mostly taps, some typing and navigation.
ACTION_WEIGHTS = {
    "Tap": 45,
    "Long Press": 5,
    "Type": 12,
    "Swipe": 8,
    "Launch": 10,
    "Back": 6,
    "Home": 5,
    "Wait": 3,
    "finish": 6,
}
APPS = ("Settings", "Messages", "Shop", "Maps", "Camera", "Clock", "Calendar", "Photos", "Music", "Mail")
APPS += ("Weather", "Notes", "Calculator", "Phone", "Browser")
SWIPES = {"down": ([500, 800], [500, 200]), "up": ([500, 200], [500, 800])}  # scroll direction -> finger path
LOADING = "Loading..."


@dataclass(frozen=True)
class ScreenKind:
    """A kind of screen: its app, the item labels it may show and how items are laid out."""

    app: str
    items: tuple[str, ...]
    layout: str  # "list" (full-width rows), "grid2" or "grid4" (columns of cards/icons)
    noun: str  # how the thinking refers to an item
    tap: str  # task wording for a Tap on {label}
    press: str = "Long-press {label}"  # task wording for a Long Press on {label}
    field: str | None = None  # label of the text field, if the screen has one
    field_y: int = 0  # centre y of that field
    queries: tuple[str, ...] = ()  # texts a Type task may ask for
    type_task: str = ""  # task wording for a Type of {text}


SCREENS = {
    "settings": ScreenKind(
        "Settings",
        ("Wi-Fi", "Bluetooth", "Display", "Sound", "Battery", "Storage", "Notifications", "Privacy"),
        "list",
        "row",
        "Open {label} settings",
    ),
    "home": ScreenKind("Home", APPS, "grid4", "icon", "Open the {label} app", "Press and hold the {label} icon"),
    "messages": ScreenKind(
        "Messages",
        ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack"),
        "list",
        "chat",
        "Open the chat with {label}",
        "Long-press the chat with {label}",
    ),
    "chat": ScreenKind(
        "Messages",
        ("Call", "Video call", "Attach", "Emoji", "Gallery", "Voice note", "Stickers", "Info"),
        "grid2",
        "button",
        "Tap the {label} button",
        field="Message field",
        field_y=900,
        queries=("See you at 5, ok?", "On my way!", "Thanks, talk soon", "Lunch tomorrow?", "Call me later"),
        type_task="Write the message: {text}",
    ),
    "shop": ScreenKind(
        "Shop",
        ("Headphones", "Backpack", "Sneakers", "Desk lamp", "Coffee maker", "Water bottle", "Sunglasses"),
        "grid2",
        "listing",
        "Open the {label} listing",
        field="Search field",
        field_y=130,
        queries=("running shoes", "phone case", "yoga mat", "coffee beans", "usb cable", "rain jacket"),
        type_task="Search the shop for {text}",
    ),
    "maps": ScreenKind(
        "Maps",
        ("Restaurants", "Cafes", "Hotels", "Parking", "Pharmacies", "Museums", "Parks"),
        "grid2",
        "button",
        "Show nearby {lower}",
        field="Search field",
        field_y=130,
        queries=("central station", "city museum", "the airport", "Main Street 12", "Lakeside park"),
        type_task="Search Maps for {text}",
    ),
}
APP_COLOURS = {"Settings": (225, 232, 240), "Home": (214, 234, 223), "Messages": (232, 224, 245)}
APP_COLOURS |= {"Shop": (250, 232, 214), "Maps": (222, 240, 214)}


@dataclass
class Element:
    """One UI element; ``box`` is ``(x1, y1, x2, y2)`` on the 0-1000 grid."""

    label: str
    box: tuple[int, int, int, int]
    focused: bool = False

    @property
    def center(self) -> tuple[int, int]:
        return (self.box[0] + self.box[2]) // 2, (self.box[1] + self.box[3]) // 2


@dataclass
class Example:
    """One agent step: screen, task and reference answer."""

    task: str
    app: str
    elements: list[Element]
    think: str
    answer: str
    bbox: list[int] | None

    def prompt(self) -> str:
        """The user text: task plus a text rendering of the screen."""
        lines = [f"Task: {self.task}", f"App: {self.app}", "Elements:"]
        for i, el in enumerate(self.elements):
            focus = " (focused)" if el.focused else ""
            lines.append(f"[{i}] {el.label}{focus} @ [{el.center[0]},{el.center[1]}]")
        return "\n".join(lines)


def _layout(rng: random.Random, kind: ScreenKind, labels: list[str]) -> list[Element]:
    """Place labels on a coarse grid: centres are multiples of 10 and boxes never overlap."""
    top, bottom = 100, 960  # the status bar and title take the top 10% of the screen
    elements = []
    if kind.field:
        elements.append(Element(kind.field, (40, kind.field_y - 30, 960, kind.field_y + 30)))
        if kind.field_y < 500:
            top = kind.field_y + 40
        else:
            bottom = kind.field_y - 40
    if kind.layout == "list":  # rows 60 high, pitch >= 80
        pitch = rng.choice((80, 90, 100))
        first = rng.randrange(top + 30, bottom - 30 - (len(labels) - 1) * pitch + 1, 10)
        boxes = [(40, first + i * pitch - 30, 960, first + i * pitch + 30) for i in range(len(labels))]
    else:  # cards/icons 120 high on a 160 pitch, in 2 or 4 columns
        cols, half_w = ((270, 730), 210) if kind.layout == "grid2" else ((140, 380, 620, 860), 80)
        first = rng.randrange(top + 60, top + 81, 10)
        rows = (bottom - 60 - first) // 160 + 1
        cells = sorted(rng.sample(range(rows * len(cols)), len(labels)))
        centres = [(cols[c % len(cols)], first + 160 * (c // len(cols))) for c in cells]
        boxes = [(x - half_w, y - 60, x + half_w, y + 60) for x, y in centres]
    elements += [Element(label, box) for label, box in zip(labels, boxes, strict=True)]
    return sorted(elements, key=lambda e: (e.box[1], e.box[0]))  # reading order, like a UI dump


def _sample(rng: random.Random) -> Example:
    """Draw one example: action type first, then a screen that makes that action the right one."""
    action = rng.choices(list(ACTION_WEIGHTS), weights=list(ACTION_WEIGHTS.values()))[0]
    if action == "Type":
        kinds = [k for k, v in SCREENS.items() if v.field]
    elif action in ("Back", "Home", "Wait", "finish"):  # these need an app in front, not the home screen
        kinds = [k for k in SCREENS if k != "home"]
    else:
        kinds = list(SCREENS)
    kind = SCREENS[rng.choice(kinds)]
    items = rng.sample(kind.items, rng.randint(4, 8) - bool(kind.field))
    if action == "Wait":
        items[rng.randrange(len(items))] = LOADING
    elements = _layout(rng, kind, items)
    app, bbox = kind.app, None

    if action in ("Tap", "Long Press"):
        label = rng.choice(items)
        target = next(e for e in elements if e.label == label)
        wording = kind.tap if action == "Tap" else kind.press
        task = wording.format(label=label, lower=label.lower())
        verb = "tap it" if action == "Tap" else "long-press it"
        think = f"The {label} {kind.noun} is on screen, so I {verb}."
        answer = f'do(action="{action}", element=[{target.center[0]},{target.center[1]}])'
        bbox = list(target.box)
    elif action == "Type":
        field = elements[[e.label for e in elements].index(kind.field)]
        field.focused = True
        text = rng.choice(kind.queries)
        task = kind.type_task.format(text=text)
        think = f"The {field.label.lower()} is focused, so I type the text."
        answer = f'do(action="Type", text="{text}")'
    elif action == "Swipe":
        direction = rng.choice(sorted(SWIPES))
        start, end = SWIPES[direction]
        task = f"Scroll {direction} the {app} screen"
        think = f"To scroll {direction} I swipe {'up' if direction == 'down' else 'down'} on the screen."
        answer = f'do(action="Swipe", start=[{start[0]},{start[1]}], end=[{end[0]},{end[1]}])'
    elif action == "Launch":
        target_app = rng.choice([a for a in APPS if a != app and a not in items])
        task = f"Open the {target_app} app"
        think = f"{target_app} is not on this screen, so I launch it."
        answer = f'do(action="Launch", app="{target_app}")'
    elif action == "Back":
        task = rng.choice(("Go back", "Go back to the previous screen", "Return to the previous page"))
        think = "The task asks to go back, so I press Back."
        answer = 'do(action="Back")'
    elif action == "Home":
        task = rng.choice(("Go to the home screen", "Return to the home screen"))
        think = "The task asks for the home screen, so I press Home."
        answer = 'do(action="Home")'
    elif action == "Wait":
        task = f"Wait for {app} to finish loading"
        think = f"{app} is still loading, so I wait."
        answer = 'do(action="Wait", duration="2 seconds")'
    else:  # finish: the task asks for the app that is already open
        task = f"Open the {app} app"
        think = f"{app} is already open, so the task is done."
        answer = f'finish(message="{app} is open.")'
    return Example(task, app, elements, think, answer, bbox)


@functools.lru_cache(maxsize=8)
def _font(height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font, scaled to the screenshot (falls back to the bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=max(6, round(height * 0.03)))
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def render(ex: Example, size: tuple[int, int]) -> Image.Image:
    """Draw the example's screen as a phone screenshot of ``size`` = (width, height) pixels."""
    w, h = size
    img = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(img)
    font = _font(h)

    def px(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        return box[0] * w // 1000, box[1] * h // 1000, box[2] * w // 1000, box[3] * h // 1000

    def text_at(x: int, y: int, text: str, fill: tuple[int, int, int]) -> None:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text((x - (right - left) // 2 - left, y - (bottom - top) // 2 - top), text, fill=fill, font=font)

    draw.rectangle(px((0, 0, 1000, 40)), fill=(30, 30, 30))  # status bar
    text_at(w // 2, 20 * h // 1000, "12:00", (255, 255, 255))
    text_at(w // 2, 70 * h // 1000, ex.app, (20, 20, 20))  # title
    colour = APP_COLOURS.get(ex.app, (230, 230, 230))
    for el in ex.elements:
        box = px(el.box)
        radius = max(1, min(box[2] - box[0], box[3] - box[1]) // 4)
        if el.focused:  # white with a thick blue border, like a field with the cursor in it
            draw.rounded_rectangle(box, radius, fill=(255, 255, 255), outline=(25, 118, 210), width=max(2, w // 60))
        else:
            draw.rounded_rectangle(box, radius, fill=colour, outline=(140, 140, 140))
        text_at((box[0] + box[2]) // 2, (box[1] + box[3]) // 2, el.label, (20, 20, 20))
    return img


def _record(ex_id: str, ex: Example, images: bool) -> dict:
    """The JSONL record of one example, in OpenAI-style chat format."""
    text = ex.prompt()
    user = [{"type": "image", "image": f"images/{ex_id}.png"}, {"type": "text", "text": text}] if images else text
    return {
        "id": ex_id,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
            {"role": "assistant", "content": f"<think>{ex.think}</think><answer>{ex.answer}</answer>"},
        ],
        "target": {"bbox": ex.bbox},
    }


def sample_chats(n: int, seed: int = 0) -> list[list[dict]]:
    """``n`` seeded text-only chats (system, user, assistant) without writing anything: golden prompts for export
    checks when no data folder is at hand."""
    rng = random.Random(seed)
    return [_record(f"sample-{i:05d}", _sample(rng), images=False)["messages"] for i in range(n)]


def _write(folder: Path, params: dict) -> None:
    """Write all splits, images and the meta file into ``folder``."""
    if params["images"]:
        (folder / "images").mkdir()
    seen: set[str] = set()  # prompts of all earlier examples: splits never share a prompt
    sizes = (params["n_train"], params["n_val"], params["n_test"])
    for split, n in zip(SPLITS, sizes, strict=True):
        rng = random.Random(f"autoglm-synth/{params['seed']}/{split}")  # own stream per split
        lines = []
        for idx in range(n):
            for _ in range(1000):
                ex = _sample(rng)
                if ex.prompt() not in seen:
                    break
            else:
                raise RuntimeError(f"could not draw a new unique example for {split}; the task space is exhausted")
            seen.add(ex.prompt())
            ex_id = f"{split}-{idx:05d}"
            if params["images"]:
                render(ex, tuple(params["image_size"])).save(folder / "images" / f"{ex_id}.png")
            lines.append(json.dumps(_record(ex_id, ex, params["images"]), ensure_ascii=False) + "\n")
        (folder / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    (folder / META_FILE).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def generate(
    out_dir: str | Path,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 200,
    seed: int = 0,
    images: bool = True,
    image_size: tuple[int, int] = (112, 224),
) -> Path:
    """Generate the dataset into ``out_dir``, or reuse it if it was generated with the same parameters.

    Everything is written to a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a complete-looking folder behind.

    Args:
        out_dir: Output folder (must not exist, be empty, or hold data from identical parameters).
        n_train: Number of training examples.
        n_val: Number of validation examples.
        n_test: Number of test examples.
        seed: Random seed; the same seed gives byte-identical files.
        images: Whether to draw PNG screenshots and reference them from the user message.
        image_size: Screenshot size in pixels, (width, height).

    Returns:
        The output folder.

    Raises:
        FileExistsError: If ``out_dir`` holds other data.
    """
    out = Path(out_dir)
    params = {
        "format_version": FORMAT_VERSION,
        "n_train": int(n_train),
        "n_val": int(n_val),
        "n_test": int(n_test),
        "seed": int(seed),
        "images": bool(images),
        "image_size": [int(image_size[0]), int(image_size[1])],
    }
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        existing = _read_meta(out)
        if existing == params:
            return out
        what = "data generated with different parameters" if existing else f"other data (no {META_FILE})"
        raise FileExistsError(
            f"{out} already holds {what}:\n  existing:  {existing}\n  requested: {params}\n"
            "Pick another --out or delete that folder."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset should not be
        _write(tmp, params)
        if out.exists():  # an empty folder, e.g. made by the user: replace it
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _image_size(text: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT`` (pixels) for argparse."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 112x224, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return w, h


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m autoglm_distill.data.synth", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", action=argparse.BooleanOptionalAction, default=True, help="draw PNG screens")
    parser.add_argument("--image-size", type=_image_size, default=(112, 224), help="WIDTHxHEIGHT in pixels")
    args = parser.parse_args(argv)
    try:
        out = generate(args.out, args.n_train, args.n_val, args.n_test, args.seed, args.images, args.image_size)
    except FileExistsError as e:
        parser.exit(1, f"error: {e}\n")
    print(out)


if __name__ == "__main__":
    main()
