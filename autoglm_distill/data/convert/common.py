"""What the three converters share: the 0-999 grid, Open-AutoGLM action strings (each checked to parse), the report
and small field helpers for the mirrors' varying forms (the output folder and screenshots: ``context.py``).

Grid: Open-AutoGLM's prompt puts (0,0) top-left and (999,999) bottom-right, and its client maps a model coordinate
back to pixels with ``x_px = int(x / 1000 * width)``; so pixels map to the grid with ``int(px * 1000 / width)`` and a
normalised [0, 1] value with ``int(v * 1000)``, both clipped to 0..999.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from autoglm_distill.actions import action_type, try_parse

GRID_MAX = 999


class ConvertError(Exception):
    """Bad arguments or an unreadable input; the message names the fix (the CLI exits with code 2)."""


class Unmappable(Exception):
    """A step (or record) with no faithful Open-AutoGLM equivalent: counted under ``reason``, never dropped silently."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- grid


def px_to_grid(px: float, size: float) -> int:
    """A pixel coordinate on a ``size``-pixel axis -> the 0-999 grid."""
    return min(GRID_MAX, max(0, int(float(px) * 1000 / float(size))))


def norm_to_grid(v: float) -> int:
    """A normalised [0, 1] coordinate -> the 0-999 grid."""
    return min(GRID_MAX, max(0, int(float(v) * 1000)))


def thousand_to_grid(v: float) -> int:
    """A coordinate already on a 0-1000 grid (GUI-Odyssey) -> 0-999 (1000 is clipped to 999)."""
    return min(GRID_MAX, max(0, int(float(v))))


# ---------------------------------------------------------------- actions (Open-AutoGLM syntax)

BACK = 'do(action="Back")'
HOME = 'do(action="Home")'


def point(kind: str, x: int, y: int) -> str:
    """``Tap``, ``Long Press`` or ``Double Tap`` at grid ``(x, y)``."""
    return f'do(action="{kind}", element=[{x},{y}])'


def swipe(start: tuple[int, int], end: tuple[int, int]) -> str:
    return f'do(action="Swipe", start=[{start[0]},{start[1]}], end=[{end[0]},{end[1]}])'


def type_text(text: str) -> str:
    # The client takes the text raw between text=" and the final "), so quotes inside need no escaping.
    return f'do(action="Type", text="{text}")'


def launch(app: str) -> str:
    return f'do(action="Launch", app={json.dumps(app, ensure_ascii=False)})'


def wait(seconds: float) -> str:
    return f'do(action="Wait", duration="{seconds:g} seconds")'


def finish(message: str) -> str:
    return f'finish(message="{message}")'


def checked(action: str, kind: str, **expected: Any) -> str:
    """``action`` itself once it parses by Open-AutoGLM's rules as a ``kind`` action with the ``expected`` arguments
    (e.g. the exact Type text); raises Unmappable("unparseable_action") when it does not (a typed text holding
    ``finish(message=`` would, for one)."""
    parsed = try_parse(f"<answer>{action}</answer>")
    if parsed is None or action_type(parsed) != kind or any(parsed.get(k) != v for k, v in expected.items()):
        raise Unmappable("unparseable_action", f"{action!r} does not parse back as a {kind} action")
    return action


# ---------------------------------------------------------------- field helpers


def scalar(value: Any) -> Any:
    """Unwrap a one-element list (TFRecord exports store every feature as a list)."""
    if isinstance(value, list | tuple) and len(value) == 1:
        return value[0]
    return value


def first(record: dict, *names: str) -> Any:
    """The first of ``names`` present (not None) in ``record``, unwrapped with :func:`scalar`; else None."""
    for name in names:
        if record.get(name) is not None:
            return scalar(record[name])
    return None


def as_text(value: Any) -> str | None:
    value = scalar(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return None if value is None else str(value)


def safe_name(value: Any) -> str:
    """An episode id usable as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(value)) or "_"


# ---------------------------------------------------------------- report


@dataclass
class Report:
    source: str
    episodes: int = 0
    steps: int = 0
    steps_dropped: int = 0
    splits: Counter = field(default_factory=Counter)
    unmappable: list[dict] = field(default_factory=list)
    current_app_unknown: int = 0
    missing_screenshots: int = 0
    missing_examples: list[str] = field(default_factory=list)
    status_actions: Counter = field(default_factory=Counter)
    episodes_without_status: int = 0
    episodes_with_dropped_steps: int = 0

    def bad(self, reason: str, file: Any, position: str, detail: str = "", episode=None, step=None) -> None:
        """Count one record or step that could not be converted; nothing is dropped without a line here."""
        entry = {"reason": reason, "file": str(file), "position": position, "detail": detail}
        if episode is not None:
            entry["episode"] = str(episode)
        if step is not None:
            entry["step"] = step
        self.unmappable.append(entry)

    def to_json(self, extra: dict) -> dict:
        return {
            "source": self.source,
            **extra,
            "episodes": self.episodes,
            "steps": self.steps,
            "splits": {name: self.splits[name] for name in ("train", "val", "test")},
            "steps_dropped": self.steps_dropped,
            "episodes_with_dropped_steps": self.episodes_with_dropped_steps,
            "current_app_unknown": self.current_app_unknown,
            "missing_screenshots": {"count": self.missing_screenshots, "examples": self.missing_examples},
            "status_actions": dict(self.status_actions),
            "episodes_without_status": self.episodes_without_status,
            "unmappable": {
                "count": len(self.unmappable),
                "by_reason": dict(Counter(e["reason"] for e in self.unmappable).most_common()),
                "records": self.unmappable,
            },
        }
