"""Launcher episodes for the screenshot demo (``recipe=demo_vision``): find an app's icon by its look and open it.

The phone shows pages of unlabelled app icons. Every app has one icon, a tile of its colour with a white shape on
it (Maps is a purple circle, Shop a green square; ``ICONS``), and a page shows icons in random cells of a 4 x 7
grid. The task names the app; the agent must find its icon in the screenshot (the element list is not given to
the model), tap it, and finish once the app is open. When the icon is not on the first page it swipes to the next
one, where it is. The thinking names the icon's colour, shape, row and column, so the look the agent searches for
is written out before the coordinates. An episode is 2-3 steps: ``Tap`` or ``Swipe`` then ``Tap``, then ``finish``.

Why tiles of colour: a model trained from scratch for minutes on 2 CPU cores cannot learn to read rendered text,
and colours are the easiest look to tell apart. The grid is laid out for the 112 x 224 screenshots the demo uses:
with GLM-4.1V's 14-pixel patches and 2 x 2 merge, each merged image token covers one 250 x 125 cell of the 0-999
grid, and each icon fills one such token. Whether a small Glm4v learns to find them in the CPU budget is measured
in ``benchmarks/vision_probe.py``.

Training pages show 1-12 icons (a page with one icon teaches where it is before which one it is); val and test
pages show 6-12. The val and test splits use the same apps on page layouts no training episode starts with
(``synth.generate`` deduplicates episodes across splits), and they hold out where icons are: in training, an app's
icon is never asked for in the cells ``held_out_cells`` gives it, and the val/test tasks ask for an app whose icon
is in one of them. A model that memorised "Maps is usually at row 3" fails there; one that finds the purple circle
passes.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from autoglm_distill.data.synth import APPS, Element, Episode, Screen, finish, pixel_box

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "orange": (245, 150, 20),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Each app's icon: colours and shapes cycle with coprime periods (5, 4), so the 15 apps get 15 distinct icons.
ICONS = {app: (tuple(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)]) for i, app in enumerate(APPS)}
COLUMNS, ROWS = 4, 7
CELL_W, CELL_H = 250, 125  # one merged image token of a 112 x 224 screenshot, on the 0-999 grid
HALF_W, HALF_H = 124, 62  # an icon fills its cell: one merged image token, 28 x 28 pixels at 112 x 224
SWIPE_LEFT = 'do(action="Swipe", start=[800,500], end=[200,500])'  # the next page of icons
TASKS = ("Open {app}", "Open the {app} app", "Go to {app}")
WALLPAPER = (236, 240, 244)
STATUS_BAR = Element("Home", (0, 0, 999, 40))  # the title element: the launcher has no heading but its status bar


def cell_box(cell: int) -> tuple[int, int, int, int]:
    """The icon box of grid cell ``cell`` (row-major; rows start below the status bar's token row)."""
    row, col = divmod(cell, COLUMNS)
    x, y = col * CELL_W + CELL_W // 2, (row + 1) * CELL_H + CELL_H // 2
    return x - HALF_W, y - HALF_H, x + HALF_W, y + HALF_H


def held_out_cells(app: str) -> frozenset[int]:
    """The 4 of the 28 cells where a task asks for ``app``'s icon only in val/test (train asks for it elsewhere)."""
    i = APPS.index(app)
    return frozenset((i * 5 + k * 7) % (COLUMNS * ROWS) for k in range(4))


def describe(app: str) -> str:
    colour, shape = ICONS[app]
    return f"{colour} {shape}"


def page(rng: random.Random, apps: list[str], cells: dict[str, int] | None = None) -> Screen:
    """A launcher page showing ``apps`` in random free cells (``cells`` fixes some of them)."""
    fixed = dict(cells or {})
    free = [c for c in range(COLUMNS * ROWS) if c not in fixed.values()]
    chosen = rng.sample(free, len(apps) - len(fixed))
    placed = fixed | dict(zip([a for a in apps if a not in fixed], chosen, strict=True))
    icons = sorted((cell, app) for app, cell in placed.items())  # reading order
    return Screen("Home", [STATUS_BAR, *(Element(app, cell_box(cell)) for cell, app in icons)])


def target_cell(rng: random.Random, app: str, held: bool) -> int:
    """Where the task's icon is: in one of its held-out cells for val/test, anywhere else for train."""
    cells = held_out_cells(app)
    return rng.choice(sorted(cells if held else set(range(COLUMNS * ROWS)) - cells))


def other_apps(rng: random.Random, app: str, k: int) -> list[str]:
    return rng.sample([a for a in APPS if a != app], k)


def app_screen(app: str) -> Screen:
    """The app just opened: a light tint of its colour, its icon large in the middle."""
    return Screen(app, [Element(app, STATUS_BAR.box), Element(f"{app} icon", (250, 300, 750, 600))])


def sample_episode(rng: random.Random, held: bool) -> Episode:
    """One task: open an app, swiping to the second page first when its icon is not on the first."""
    app = rng.choice(APPS)
    ep = Episode(rng.choice(TASKS).format(app=app), "launcher")
    look = describe(app)
    fewest = 6 if held else 1  # training pages may show a single icon: where it is, before which one it is
    if rng.random() < 0.3:  # not on the first page
        first = page(rng, other_apps(rng, app, rng.randint(fewest, 12)))
        ep.act(first, f"No {look} on this page, so {app} is not here; I swipe to the next page.", SWIPE_LEFT)
    cell = target_cell(rng, app, held)
    home = page(rng, [app, *other_apps(rng, app, rng.randint(fewest - 1, 11))], {app: cell})
    row, col = divmod(cell, COLUMNS)
    ep.press(home, f"{app} is the {look}, in row {row + 1}, column {col + 1}, so I tap it.", home.find(app))
    ep.act(app_screen(app), f"{app} is open, so the task is done.", finish(f"{app} is open."))
    return ep


def draw_icon(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colour: str, shape: str) -> None:
    """A tile of the app's colour filling ``box``, with its shape in white inside."""
    draw.rectangle(box, fill=COLOURS[colour])
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) // 5, (y2 - y1) // 5
    x1, y1, x2, y2 = x1 + mx, y1 + my, x2 - mx, y2 - my
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    white = (255, 255, 255)
    if shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=white)
    elif shape == "square":
        draw.rectangle((x1, y1, x2, y2), fill=white)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=white)
    else:
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=white)


def render(screen: Screen, size: tuple[int, int]) -> Image.Image:
    """Draw a launcher page (unlabelled icons) or an opened app (its colour, its icon large), ``size`` = (w, h)."""
    if screen.app == "Home":
        img = Image.new("RGB", size, WALLPAPER)
        draw = ImageDraw.Draw(img)
        for el in screen.elements[1:]:
            draw_icon(draw, pixel_box(el.box, size), *ICONS[el.text])
    else:
        colour, shape = ICONS[screen.app]
        img = Image.new("RGB", size, tuple(255 - (255 - c) // 4 for c in COLOURS[colour]))  # a light tint
        draw = ImageDraw.Draw(img)
        draw_icon(draw, pixel_box(screen.elements[1].box, size), colour, shape)
    draw.rectangle(pixel_box(STATUS_BAR.box, size), fill=(30, 30, 30))
    return img
