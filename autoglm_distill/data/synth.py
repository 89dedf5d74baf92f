"""Deterministic synthetic phone episodes in Open-AutoGLM's layout (``autoglm_distill/data/episodes.py``).

Each line of a split is one multi-step task on a small simulated phone: Settings (turn a switch on or off), Shop
(search, open a result, add it to the cart or buy it), Messages (open a chat, type, send), Photos (like a photo
with a double tap, delete one through its long-press menu) and Maps (search a place, ask for directions). An
episode starts on the home screen (tap the app's icon, or Launch it by name when the icon is not there), in
another app (Launch) or on a wrong page of the right app (Back), and may have to scroll (Swipe), wait for a page
to load (Wait), hand over to the user for a payment password (Take_over) and return home (Home) before its
``finish``. Every step records the screen's accessibility elements (title first, boxes on Open-AutoGLM's 0-999
grid), the thinking and the action an expert takes; the screen alone decides the action, so a text-only student
reading the element list can learn it too (``data.elements_in_text``). Screenshots are drawn with Pillow.

The validation and test splits are held out: their tasks ask for settings, contacts, messages, products, places and
photos that no training task asks for (new settings; new pairs of known words for the others), and they start in apps
no training episode starts in.

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
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from autoglm_distill.data import SPLITS, SYSTEM_PROMPT

# 1: one-step chats, 0-1000 grid; 2: episodes, Open-AutoGLM's 0-999 grid; 3: entity pools too large to memorise
FORMAT_VERSION = 3
# What the episodes are: phone tasks (this module) or launcher pages of coloured icon tiles (``launcher``: the
# screenshot demo, where the model must find things by their look).
KINDS = ("phone", "launcher")
# The parameters a folder was generated with; the folder appears whole (renamed into place), this file with it.
META_FILE = "synth_meta.json"
TOP, BOTTOM, RIGHT = 110, 960, 959  # the content area below the status bar and title, on the 0-999 grid
SWIPE_UP = 'do(action="Swipe", start=[500,800], end=[500,300])'  # the finger moves up: the list scrolls down
LOADING = "Loading..."

# The apps the tasks are about, and the other apps an episode may start in (the last three only in val/test).
TASK_APPS = ("Settings", "Shop", "Messages", "Photos", "Maps")
OTHER_APPS = {
    "Clock": ("Alarm 07:00", "Timer", "Stopwatch", "World clock", "Bedtime"),
    "Calendar": ("Today", "Meeting 10:00", "Lunch 12:30", "Gym 18:00", "Add event"),
    "Music": ("Playlists", "Albums", "Artists", "Songs", "Now playing"),
    "Mail": ("Inbox", "Sent", "Drafts", "Spam", "Compose"),
    "Weather": ("Today 18 C", "Tomorrow 21 C", "Wind 12 km/h", "Humidity 60%", "Weekly forecast"),
    "Notes": ("Shopping list", "Ideas", "Trip plan", "Recipes", "New note"),
    "Camera": ("Photo", "Video", "Portrait", "Shutter", "Switch camera"),
    "Browser": ("Address bar", "Bookmarks", "History", "Tabs", "New tab"),
    "Phone": ("Keypad", "Recents", "Contacts", "Voicemail", "Favourites"),
    "Calculator": ("Seven", "Eight", "Nine", "Plus", "Equals"),
}
APPS = TASK_APPS + tuple(OTHER_APPS)


def combine(firsts: tuple[str, ...], seconds: tuple[str, ...]) -> tuple[str, ...]:
    """Every ``"first second"`` name, in a fixed shuffled order: the held-out last quarter is then new pairs of words
    that training tasks also use, so a model can only pass the held-out tasks by reading the names, not by
    remembering them."""
    names = [f"{a} {b}" for a in firsts for b in seconds]
    random.Random(0).shuffle(names)
    return tuple(names)


# What tasks ask for: 48 to 288 values per kind, too many to memorise, so a model has to copy the name from the
# task and find it on the screen. The last quarter of each tuple is held out: only val/test tasks ask for it
# (screens show any).
SETTINGS = (
    "Wi-Fi", "Bluetooth", "Dark mode", "Location", "Airplane mode", "Auto-rotate", "Battery saver", "Do not disturb",
    "Hotspot", "NFC", "Night light", "Vibration", "Mobile data", "Data saver", "Screen lock", "Face unlock",
    "Fingerprint", "Live captions", "Flashlight", "Eye comfort", "Adaptive brightness", "Always-on display",
    "Touch sounds", "Keyboard vibration", "Auto-update apps", "Background data", "Roaming", "Wi-Fi calling",
    "Screen saver", "Nearby share", "Magnification", "Color inversion", "Mono audio", "Auto time", "24-hour time",
    "Notification dots", "Bubbles", "Lift to wake", "Tap to wake", "Extra dim", "Private DNS", "VPN", "Printing",
    "USB debugging", "Smart lock", "Caller ID", "Call waiting", "Dial pad tones",
)  # fmt: skip
FIRST_NAMES = (
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack", "Kate", "Liam", "Mia", "Noah",
    "Olivia", "Paul", "Quinn", "Rosa", "Sam", "Tina", "Umar", "Vera", "Will", "Zoe",
)  # fmt: skip
LAST_NAMES = ("Chen", "Smith", "Garcia", "Kim", "Novak", "Okafor", "Rossi", "Silva", "Tanaka", "Weber", "Young", "Ali")
ENTITIES = {
    "setting": SETTINGS,
    "contact": combine(FIRST_NAMES, LAST_NAMES),
    "message": combine(
        ("See you", "Call me", "Meet me", "Running late", "Back home", "Free", "Lunch", "Dinner", "Coffee", "Home"),
        ("at 5", "tonight", "tomorrow", "after work", "soon", "on Friday", "at noon", "later", "this week"),
    ),
    "product": combine(
        ("red", "blue", "black", "white", "green", "grey", "leather", "steel", "wooden", "bamboo"),
        ("headphones", "backpack", "sneakers", "desk lamp", "coffee maker", "water bottle", "sunglasses", "phone case")
        + ("yoga mat", "rain jacket", "usb cable", "tea kettle", "wallet", "umbrella", "notebook", "watch"),
    ),
    "place": combine(
        ("Central", "Lakeside", "Harbour", "North", "Old Town", "Riverside", "Hillside", "West End", "Kings", "Union"),
        ("Station", "Museum", "Park", "Library", "Market", "Beach", "Hotel", "Stadium", "Gallery", "Zoo"),
    ),
    "photo": combine(
        ("Beach", "Mountain", "City", "Garden", "Lake", "Forest", "Snowy", "Desert", "Harbour", "Family"),
        ("sunset", "hike", "lights", "picnic", "view", "dinner", "walk", "party", "morning", "trip"),
    ),
}
VARIANTS = ("Classic", "Pro", "Lite", "Max", "Sport", "Mini")
SETTINGS_EXTRA = ("About this setting", "Advanced options", "Help")
PHOTO_MENU = ("Share", "Delete", "Add to album")
CHAT_LINES = ("Hi!", "How are you?", "Sounds good", "See you soon", "Ok, thanks")
MAP_CATEGORIES = ("Restaurants", "Cafes", "Hotels", "Parking", "Pharmacies", "Museums")
# Relative frequency of each flow; taps dominate the action mix, as in real agent traces.
FLOWS = {"settings": 3, "shop_cart": 2, "shop_buy": 1, "message": 3, "photo_like": 1, "photo_delete": 1, "maps": 2}
APP_COLOURS = {"Settings": (225, 232, 240), "Home": (214, 234, 223), "Messages": (232, 224, 245)}
APP_COLOURS |= {"Shop": (250, 232, 214), "Maps": (222, 240, 214), "Photos": (245, 226, 230)}


def held_out(values: tuple[str, ...]) -> tuple[str, ...]:
    """The values only val/test tasks ask for: the last quarter (at least one)."""
    return values[-max(1, len(values) // 4) :]


@dataclass
class Element:
    """One UI element; ``box`` is ``(x1, y1, x2, y2)`` on the 0-999 grid."""

    text: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[int, int]:
        return (self.box[0] + self.box[2]) // 2, (self.box[1] + self.box[3]) // 2


@dataclass
class Screen:
    """What the phone shows: the app in front and its elements in reading order, the title first."""

    app: str
    elements: list[Element]

    @property
    def title(self) -> str:
        return self.elements[0].text

    def find(self, text: str) -> Element:
        return next(e for e in self.elements if e.text == text)

    def relabel(self, text: str, new_text: str) -> Screen:
        """The same screen with element ``text`` showing ``new_text`` (a field focused or filled in)."""
        return Screen(self.app, [Element(new_text, e.box) if e.text == text else e for e in self.elements])


@dataclass
class Step:
    screen: Screen
    thinking: str
    action: str
    target: Element | None  # the element a Tap / Long Press / Double Tap must land in


@dataclass
class Episode:
    task: str
    flow: str
    steps: list[Step] = field(default_factory=list)

    def act(self, screen: Screen, thinking: str, action: str, target: Element | None = None) -> None:
        self.steps.append(Step(screen, thinking, action, target))

    def press(self, screen: Screen, thinking: str, element: Element, kind: str = "Tap") -> None:
        """A point action (Tap, Long Press, Double Tap) on ``element``'s centre, with it as the target."""
        self.act(screen, thinking, point(kind, element), element)


def point(kind: str, element: Element) -> str:
    return f'do(action="{kind}", element=[{element.center[0]},{element.center[1]}])'


def finish(message: str) -> str:
    return f'finish(message="{message}")'


# --- Screens ---------------------------------------------------------------------------------------------------


def title(text: str) -> Element:
    return Element(text, (40, 50, RIGHT, 90))


def rows(rng: random.Random, labels: list[str], top: int = TOP) -> tuple[list[Element], list[str]]:
    """Full-width rows 60 high from ``top`` at a random pitch; returns the rows that fit and the labels that do not."""
    pitch = rng.choice((80, 90, 100))
    first = rng.randrange(top + 30, top + 61, 10)
    fit = (BOTTOM - 30 - first) // pitch + 1
    placed = [
        Element(label, (40, first + i * pitch - 30, RIGHT, first + i * pitch + 30))
        for i, label in enumerate(labels[:fit])
    ]
    return placed, labels[fit:]


def cards(rng: random.Random, labels: list[str], columns: int, top: int = TOP) -> list[Element]:
    """Cards (2 columns) or icons (4 columns) 120 high on a 160 pitch, in randomly chosen cells."""
    xs, half_w = ((270, 730), 210) if columns == 2 else ((130, 370, 620, 870), 85)
    first = rng.randrange(top + 70, top + 91, 10)
    n_rows = (BOTTOM - 60 - first) // 160 + 1
    cells = sorted(rng.sample(range(n_rows * len(xs)), len(labels)))
    centres = [(xs[c % len(xs)], first + 160 * (c // len(xs))) for c in cells]
    return [Element(label, (x - half_w, y - 60, x + half_w, y + 60)) for label, (x, y) in zip(labels, centres)]


def bar(text: str, y: int, x1: int = 40, x2: int = RIGHT) -> Element:
    """A full-width field or button 60 high centred on ``y``."""
    return Element(text, (x1, y - 30, x2, y + 30))


def home_screen(rng: random.Random, apps: list[str]) -> Screen:
    return Screen("Home", [title("Home"), *cards(rng, apps, columns=4)])


def loading_screen(app: str, heading: str) -> Screen:
    return Screen(app, [title(heading), Element(LOADING, (300, 470, 700, 530))])


class Pools:
    """Where a split's episodes draw what their tasks ask for: training values only, or held-out values only."""

    def __init__(self, held: bool):
        self.held = held
        self.start_apps = [a for a in OTHER_APPS if (a in held_out(tuple(OTHER_APPS))) == held]

    def task_value(self, rng: random.Random, kind: str) -> str:
        values = ENTITIES[kind]
        return rng.choice([v for v in values if (v in held_out(values)) == self.held])

    @staticmethod
    def others(rng: random.Random, kind: str, k: int, keep: str) -> list[str]:
        """``k`` values of ``kind`` including ``keep``, in random order (screens show held-out values too)."""
        picked = rng.sample([v for v in ENTITIES[kind] if v != keep], k - 1) + [keep]
        rng.shuffle(picked)
        return picked


# --- The parts every flow shares -------------------------------------------------------------------------------


def open_app(ep: Episode, rng: random.Random, pools: Pools, app: str, wrong_page: Screen) -> None:
    """The first step(s): get ``app``'s main page in front from the home screen, another app or ``wrong_page``."""
    start = rng.choices(("home", "other", "inside"), weights=(4, 3, 2))[0]
    if start == "home":
        shown = rng.sample(APPS, rng.randint(6, 12))
        screen = home_screen(rng, shown)
        if app in shown:
            ep.press(screen, f"The {app} icon is on the home screen, so I tap it.", screen.find(app))
        else:
            ep.act(
                screen, f"{app} is not on the home screen, so I launch it by name.", f'do(action="Launch", app="{app}")'
            )
    elif start == "other":
        other = rng.choice(pools.start_apps)
        screen = Screen(other, [title(other), *rows(rng, rng.sample(OTHER_APPS[other], 4))[0]])
        ep.act(screen, f"{other} is open, not {app}, so I launch {app}.", f'do(action="Launch", app="{app}")')
    else:
        ep.act(
            wrong_page, f"This is {wrong_page.title} in {app}, not its main page, so I go back.", 'do(action="Back")'
        )


def scroll_to(
    ep: Episode, rng: random.Random, app: str, heading: str, labels: list[str], want: str, top: int = TOP
) -> Screen:
    """A list page; when ``want`` is below the visible rows, one Swipe brings the rest. Returns the page with it."""
    placed, rest = rows(rng, labels, top)
    screen = Screen(app, [title(heading), *placed])
    if want in rest:
        ep.act(screen, f"{want} is not among the visible rows, so I swipe up to scroll down.", SWIPE_UP)
        placed, _ = rows(rng, labels[len(labels) - len(rest) - 2 :], top)
        screen = Screen(app, [title(heading), *placed])
    return screen


def search(ep: Episode, rng: random.Random, app: str, main: Screen, field_name: str, query: str) -> None:
    """Tap the search field of ``main``, type ``query``, and wait when the results are still loading."""
    ep.press(main, f"I tap the {field_name.lower()} to search for {query}.", main.find(field_name))
    focused = main.relabel(field_name, f"{field_name} (focused)")
    ep.act(focused, f"The {field_name.lower()} is focused, so I type {query}.", f'do(action="Type", text="{query}")')
    if rng.random() < 0.5:
        ep.act(
            loading_screen(app, "Results"),
            "The results are still loading, so I wait.",
            'do(action="Wait", duration="2 seconds")',
        )


def done(ep: Episode, rng: random.Random, screen: Screen, thinking: str, message: str, go_home: bool) -> None:
    """The last step(s): finish, or press Home first when the task ends on the home screen."""
    if go_home:
        ep.act(screen, "That part is done and the task ends on the home screen, so I press Home.", 'do(action="Home")')
        screen = home_screen(rng, rng.sample(APPS, rng.randint(6, 12)))
        thinking = "The home screen is showing and the rest was done before, so the task is complete."
    ep.act(screen, thinking, finish(message))


# --- The flows ---------------------------------------------------------------------------------------------------


def settings_page(rng: random.Random, setting: str, on: bool) -> Screen:
    extra = rows(rng, list(SETTINGS_EXTRA), top=200)[0]
    return Screen("Settings", [title(setting), bar(f"{setting}: {'On' if on else 'Off'}", 160), *extra])


def flow_settings(rng: random.Random, pools: Pools, go_home: bool) -> Episode:
    setting = pools.task_value(rng, "setting")
    want = rng.random() < 0.5
    verb = rng.choice(("Turn on", "Switch on", "Enable") if want else ("Turn off", "Switch off", "Disable"))
    ep = Episode(f"{verb} {setting}", "settings")
    wrong = settings_page(rng, rng.choice([s for s in ENTITIES["setting"] if s != setting]), rng.random() < 0.5)
    open_app(ep, rng, pools, "Settings", wrong)
    labels = Pools.others(rng, "setting", rng.randint(8, 12), setting)
    screen = scroll_to(ep, rng, "Settings", "Settings", labels, setting)
    ep.press(screen, f"The {setting} row is on screen, so I tap it.", screen.find(setting))
    state = "on" if want else "off"
    if rng.random() >= 0.2:  # else it is already as asked
        screen = settings_page(rng, setting, not want)
        switch = screen.elements[1]
        ep.press(screen, f"{setting} is {'off' if want else 'on'}, so I tap its switch.", switch)
    # The same words whether it was already so or was just switched: the screen cannot tell the two apart.
    screen = settings_page(rng, setting, want)
    done(ep, rng, screen, f"{setting} is {state} as asked, so the task is done.", f"{setting} is {state}.", go_home)
    return ep


def item_page(rng: random.Random, name: str, extra: tuple[str, ...] = ()) -> Screen:
    price = Element(f"Price {rng.randrange(9, 200)} dollars", (40, 140, 500, 200))
    buttons = rows(rng, ["Add to cart", "Buy now", "Reviews", *extra], top=220)[0]
    return Screen("Shop", [title(name), price, *buttons])


def flow_shop(rng: random.Random, pools: Pools, go_home: bool, buy: bool) -> Episode:
    product, variant = pools.task_value(rng, "product"), rng.choice(VARIANTS)
    name = f"{variant} {product}"
    task = (
        f"Buy the {variant} {product} in Shop"
        if buy
        else f"Search Shop for {product} and add the {variant} one to the cart"
    )
    ep = Episode(task, "shop_buy" if buy else "shop_cart")
    other = f"{rng.choice(VARIANTS)} {rng.choice([p for p in ENTITIES['product'] if p != product])}"
    open_app(ep, rng, pools, "Shop", item_page(rng, other))
    listings = rng.sample([f"{rng.choice(VARIANTS)} {p}" for p in ENTITIES["product"] if p != product], 4)
    main = Screen("Shop", [title("Shop"), bar("Search field", 140), *cards(rng, listings, columns=2, top=170)])
    search(ep, rng, "Shop", main, "Search field", product)
    results = [f"{v} {product}" for v in rng.sample(VARIANTS, rng.randint(3, 5))]
    if name not in results:
        results[rng.randrange(len(results))] = name
    screen = Screen("Shop", [title(f"Results for {product}"), *rows(rng, results)[0]])
    ep.press(screen, f"The {name} is in the results, so I open it.", screen.find(name))
    screen = item_page(rng, name)
    button = "Buy now" if buy else "Add to cart"
    ep.press(screen, f"This is the {name} page, so I tap {button}.", screen.find(button))
    if buy:
        screen = Screen("Shop", [title("Payment"), bar("Payment password", 300), bar("Pay", 420)])
        ep.act(
            screen,
            "Paying needs the user's password, which I must not enter, so I hand over to the user.",
            'do(action="Take_over", message="Please enter your payment password.")',
        )
        screen = Screen(
            "Shop", [title("Order placed"), bar(f"Order {rng.randrange(1000, 9999)}", 200), bar("Back to shop", 300)]
        )
        done(ep, rng, screen, "The order is placed, so the task is done.", f"Bought the {name}.", go_home)
    else:
        screen = item_page(rng, name, extra=("Added to cart",))
        done(
            ep,
            rng,
            screen,
            f"The {name} is in the cart, so the task is done.",
            f"Added the {name} to the cart.",
            go_home,
        )
    return ep


def chat_page(rng: random.Random, contact: str, field_text: str, sent: str | None = None) -> Screen:
    bubbles = rng.sample(CHAT_LINES, 2) + ([sent] if sent else [])
    placed = [
        Element(line, (40 + 380 * (i % 2), 150 + 90 * i, 600 + 359 * (i % 2), 210 + 90 * i))
        for i, line in enumerate(bubbles)
    ]
    return Screen(
        "Messages",
        [title(contact), *placed, Element(field_text, (40, 870, 780, 930)), Element("Send", (800, 870, RIGHT, 930))],
    )


def flow_message(rng: random.Random, pools: Pools, go_home: bool) -> Episode:
    contact, text = pools.task_value(rng, "contact"), pools.task_value(rng, "message")
    ep = Episode(f"Send {contact} the message: {text}", "message")
    wrong = chat_page(rng, rng.choice([c for c in ENTITIES["contact"] if c != contact]), "Message field")
    open_app(ep, rng, pools, "Messages", wrong)
    screen = scroll_to(ep, rng, "Messages", "Chats", Pools.others(rng, "contact", rng.randint(8, 12), contact), contact)
    ep.press(screen, f"The chat with {contact} is on screen, so I open it.", screen.find(contact))
    screen = chat_page(rng, contact, "Message field")
    ep.press(screen, "I tap the message field to write.", screen.find("Message field"))
    screen = screen.relabel("Message field", "Message field (focused)")
    ep.act(screen, "The message field is focused, so I type the message.", f'do(action="Type", text="{text}")')
    screen = screen.relabel("Message field (focused)", text)
    ep.press(screen, "The message is written, so I tap Send.", screen.find("Send"))
    screen = chat_page(rng, contact, "Message field", sent=text)
    done(ep, rng, screen, "The message is sent, so the task is done.", f"Sent the message to {contact}.", go_home)
    return ep


def photos_page(rng: random.Random, photos: list[str]) -> Screen:
    return Screen("Photos", [title("Photos"), *cards(rng, photos, columns=2)])


def photo_view(photo: str, liked: bool) -> Screen:
    buttons = [
        Element(text, (40 + 310 * i, 760, 329 + 310 * i, 840)) for i, text in enumerate(("Share", "Edit", "Info"))
    ]
    return Screen(
        "Photos",
        [title(photo), Element(f"Photo: {photo}", (40, 130, RIGHT, 730)), *buttons]
        + ([Element("Liked", (40, 880, 400, 940))] if liked else []),
    )


def flow_photo(rng: random.Random, pools: Pools, go_home: bool, like: bool) -> Episode:
    photo = pools.task_value(rng, "photo")
    task = f"Like the photo {photo}" if like else f"Delete the photo {photo}"
    ep = Episode(task, "photo_like" if like else "photo_delete")
    open_app(ep, rng, pools, "Photos", photo_view(rng.choice([p for p in ENTITIES["photo"] if p != photo]), False))
    photos = Pools.others(rng, "photo", rng.randint(4, 8), photo)
    screen = photos_page(rng, photos)
    if like:
        ep.press(screen, f"The {photo} photo is on screen, so I open it.", screen.find(photo))
        screen = photo_view(photo, liked=False)
        big = screen.elements[1]
        ep.press(screen, "The photo is open; a double tap on it likes it.", big, "Double Tap")
        done(
            ep,
            rng,
            photo_view(photo, liked=True),
            "The photo is liked, so the task is done.",
            f"Liked {photo}.",
            go_home,
        )
        return ep
    ep.press(screen, f"Long-pressing the {photo} photo opens its menu.", screen.find(photo), "Long Press")
    menu = [Element(text, (40, 700 + 90 * i, RIGHT, 760 + 90 * i)) for i, text in enumerate(PHOTO_MENU)]
    screen = Screen("Photos", [*screen.elements, *menu])
    ep.press(screen, "The menu is open, so I tap Delete.", screen.find("Delete"))
    screen = photos_page(rng, [p for p in photos if p != photo])
    done(ep, rng, screen, f"The {photo} photo is gone, so the task is done.", f"Deleted {photo}.", go_home)
    return ep


def place_page(rng: random.Random, place: str) -> Screen:
    return Screen("Maps", [title(place), *rows(rng, ["Directions", "Call", "Save", "Reviews"])[0]])


def flow_maps(rng: random.Random, pools: Pools, go_home: bool) -> Episode:
    place = pools.task_value(rng, "place")
    ep = Episode(f"Get directions to {place} in Maps", "maps")
    open_app(ep, rng, pools, "Maps", place_page(rng, rng.choice([p for p in ENTITIES["place"] if p != place])))
    buttons = cards(rng, rng.sample(MAP_CATEGORIES, 4), columns=2, top=170)
    main = Screen("Maps", [title("Maps"), bar("Search field", 140), *buttons])
    search(ep, rng, "Maps", main, "Search field", place)
    screen = Screen("Maps", [title(f"Results for {place}"), *rows(rng, Pools.others(rng, "place", 4, place))[0]])
    ep.press(screen, f"{place} is in the results, so I open it.", screen.find(place))
    screen = place_page(rng, place)
    ep.press(screen, f"This is the {place} page, so I tap Directions.", screen.find("Directions"))
    screen = Screen("Maps", [title(f"Route to {place}"), bar(f"{rng.randrange(5, 60)} min", 200), bar("Start", 880)])
    done(
        ep,
        rng,
        screen,
        "The route is on screen, so the task is done.",
        f"Directions to {place} are on screen.",
        go_home,
    )
    return ep


def sample_episode(rng: random.Random, pools: Pools) -> Episode:
    """Draw one episode: a flow by ``FLOWS`` weight, then its task, start and screens."""
    flow = rng.choices(list(FLOWS), weights=list(FLOWS.values()))[0]
    go_home = rng.random() < 0.15  # the task ends on the home screen: done() presses Home before finishing
    if flow == "settings":
        ep = flow_settings(rng, pools, go_home)
    elif flow in ("shop_cart", "shop_buy"):
        ep = flow_shop(rng, pools, go_home, buy=flow == "shop_buy")
    elif flow == "message":
        ep = flow_message(rng, pools, go_home)
    elif flow in ("photo_like", "photo_delete"):
        ep = flow_photo(rng, pools, go_home, like=flow == "photo_like")
    else:
        ep = flow_maps(rng, pools, go_home)
    if go_home:
        ep.task += " and then go to the home screen"
    return ep


# --- Files -------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _font(height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font, scaled to the screenshot (falls back to the bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=max(6, round(height * 0.03)))
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def pixel_box(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A 0-999 grid box in pixels of a ``size`` = (width, height) screenshot."""
    w, h = size
    return box[0] * w // 1000, box[1] * h // 1000, box[2] * w // 1000, box[3] * h // 1000


def render(screen: Screen, size: tuple[int, int]) -> Image.Image:
    """Draw ``screen`` as a phone screenshot of ``size`` = (width, height) pixels."""
    w, h = size
    img = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(img)
    font = _font(h)

    def text_at(x: int, y: int, text: str, fill: tuple[int, int, int]) -> None:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text((x - (right - left) // 2 - left, y - (bottom - top) // 2 - top), text, fill=fill, font=font)

    draw.rectangle(pixel_box((0, 0, 999, 40), size), fill=(30, 30, 30))  # status bar
    text_at(w // 2, 20 * h // 1000, "12:00", (255, 255, 255))
    heading, *elements = screen.elements
    text_at(w // 2, heading.center[1] * h // 1000, heading.text, (20, 20, 20))
    colour = APP_COLOURS.get(screen.app, (230, 230, 230))
    for el in elements:
        box = pixel_box(el.box, size)
        radius = max(1, min(box[2] - box[0], box[3] - box[1]) // 4)
        if el.text.endswith("(focused)"):  # white with a thick blue border, like a field with the cursor in it
            draw.rounded_rectangle(box, radius, fill=(255, 255, 255), outline=(25, 118, 210), width=max(2, w // 60))
        elif el.text.endswith(": On"):  # a switch that is on
            draw.rounded_rectangle(box, radius, fill=(190, 230, 190), outline=(40, 140, 60), width=max(1, w // 100))
        else:
            draw.rounded_rectangle(box, radius, fill=colour, outline=(140, 140, 140))
        text_at((box[0] + box[2]) // 2, (box[1] + box[3]) // 2, el.text, (20, 20, 20))
    return img


def episode_record(ep_id: str, ep: Episode, images: bool) -> dict:
    """The JSONL line of an episode (the layout ``autoglm_distill/data/episodes.py`` reads)."""
    steps = []
    for t, step in enumerate(ep.steps):
        record = {
            "current_app": step.screen.app,
            "elements": [{"text": e.text, "bbox": list(e.box)} for e in step.screen.elements],
            "thinking": step.thinking,
            "action": step.action,
        }
        if images:
            record = {"screenshot": f"images/{ep_id}/{t}.png", **record}
        if step.target is not None:
            record["target"] = {"bbox": list(step.target.box)}
        steps.append(record)
    return {"id": ep_id, "task": ep.task, "source": "synth", "flow": ep.flow, "steps": steps}


def sample_chats(n: int, seed: int = 0) -> list[list[dict]]:
    """``n`` seeded short text chats without writing anything: golden prompts for export checks when no data folder
    is at hand. One per episode step, each without earlier turns or element list (the shortest prompts the agent
    sends: system prompt, task or screen info, answer)."""
    from autoglm_distill.data.episodes import EpisodeFormat, check_episode, step_chats  # imports torch

    rng, pools, chats = random.Random(seed), Pools(held=False), []
    fmt = EpisodeFormat(SYSTEM_PROMPT, history_steps=0)
    while len(chats) < n:
        record = episode_record(f"sample-{len(chats)}", sample_episode(rng, pools), images=False)
        chats += [s["messages"] for s in step_chats(check_episode(record, Path(".")), fmt)]
    return chats[:n]


def _key(ep: Episode) -> str:
    """What makes two episodes the same: the task and the first screen."""
    first = ep.steps[0].screen
    return json.dumps([ep.task, first.app, [(e.text, e.box) for e in first.elements]])


def _kind(kind: str):
    """The episode sampler and screenshot renderer of a data kind: ``phone`` (this module) or ``launcher``."""
    if kind == "launcher":
        from autoglm_distill.data import launcher

        return (lambda rng, pools: launcher.sample_episode(rng, pools.held)), launcher.render
    return sample_episode, render


def _write(folder: Path, params: dict) -> None:
    """Write all splits, images and the meta file into ``folder``."""
    sample, draw = _kind(params.get("kind", "phone"))
    seen: set[str] = set()  # episodes of all earlier splits: splits never share one
    sizes = (params["n_train"], params["n_val"], params["n_test"])
    for split, n in zip(SPLITS, sizes, strict=True):
        rng = random.Random(f"autoglm-synth/{params['seed']}/{split}")  # own stream per split
        pools = Pools(held=split != "train")
        lines = []
        for idx in range(n):
            for _ in range(1000):
                ep = sample(rng, pools)
                if _key(ep) not in seen:
                    break
            else:
                raise RuntimeError(f"could not draw a new unique episode for {split}; the task space is exhausted")
            seen.add(_key(ep))
            ep_id = f"{split}-{idx:05d}"
            if params["images"]:
                (folder / "images" / ep_id).mkdir(parents=True)
                for t, step in enumerate(ep.steps):
                    draw(step.screen, tuple(params["image_size"])).save(folder / "images" / ep_id / f"{t}.png")
            lines.append(json.dumps(episode_record(ep_id, ep, params["images"]), ensure_ascii=False) + "\n")
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
    kind: str = "phone",
) -> Path:
    """Generate the episodes into ``out_dir``, or reuse it if it was generated with the same parameters.

    Everything is written to a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a complete-looking folder behind.

    Args:
        out_dir: Output folder (must not exist, be empty, or hold data from identical parameters).
        n_train: Number of training episodes (each has 3-10 steps).
        n_val: Number of validation episodes (held-out tasks).
        n_test: Number of test episodes (held-out tasks).
        seed: Random seed; the same seed gives byte-identical files.
        images: Whether to draw a PNG screenshot per step and reference it from the step.
        image_size: Screenshot size in pixels, (width, height).
        kind: ``phone`` (multi-step phone tasks) or ``launcher`` (find an app's icon by its look; see ``launcher``).

    Returns:
        The output folder.

    Raises:
        FileExistsError: If ``out_dir`` holds other data.
        ValueError: If ``kind`` is not one of ``KINDS``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic data kind {kind!r}; use one of {KINDS} (data.generate.kind)")
    out = Path(out_dir)
    params = {
        "format_version": FORMAT_VERSION,
        "n_train": int(n_train),
        "n_val": int(n_val),
        "n_test": int(n_test),
        "seed": int(seed),
        "images": bool(images),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "kind": kind,
    }
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        existing = _read_meta(out)
        if existing is not None:
            existing.setdefault("kind", "phone")  # folders written before launcher data existed
        if existing == params:
            return out
        what = "data generated with different parameters" if existing else f"other data (no {META_FILE})"
        raise FileExistsError(
            f"{out} already holds {what}:\n  existing:  {existing}\n  requested: {params}\n"
            "Pick another output folder or delete that one."
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
    parser.add_argument("--n-train", type=int, default=2000, help="training episodes")
    parser.add_argument("--n-val", type=int, default=200, help="validation episodes (held-out tasks)")
    parser.add_argument("--n-test", type=int, default=200, help="test episodes (held-out tasks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", action=argparse.BooleanOptionalAction, default=True, help="draw PNG screens")
    parser.add_argument("--image-size", type=_image_size, default=(112, 224), help="WIDTHxHEIGHT in pixels")
    parser.add_argument("--kind", choices=KINDS, default="phone", help="phone tasks, or launcher icons (vision demo)")
    args = parser.parse_args(argv)
    try:
        out = generate(
            args.out, args.n_train, args.n_val, args.n_test, args.seed, args.images, args.image_size, args.kind
        )
    except FileExistsError as e:
        parser.exit(1, f"error: {e}\n")
    print(out)


if __name__ == "__main__":
    main()
