"""GUI-Odyssey (Lu et al. 2024, OpenGVLab/GUI-Odyssey) -> episodes.

One JSON annotation per episode (``annotations/*.json`` in the Hugging Face release; a list of them, JSONL or Parquet
rows work too). Field names verified in the repository's ``introduction.md`` and ``data/format_converter.py``:
``episode_id``, ``task_info.instruction`` (``task_info.task`` as fallback), ``steps[]`` with ``step``,
``screenshot`` (a file name in ``screenshots/``: pass that folder as ``--images-dir``), ``action`` and ``info``
(coordinates on a 0-1000 grid). Splits: ``splits/{random,task,device,app}_split.json`` map ``train``/``test`` to
annotation file names (the episode id + ``.json``); ``--val-fraction`` of train goes to val by id hash.

Actions, as ``format_converter.py``'s ``decode_action`` reads them: CLICK/LONG_PRESS with ``info`` ``[[x, y]]`` ->
Tap/Long Press (1000 is clipped to 999), or with ``info`` "KEY_HOME" -> Home, "KEY_BACK" -> Back, "KEY_APPSELECT"
(the recent-apps key) -> unmappable ``recent_apps`` (Open-AutoGLM has no such action); SCROLL ``[[x1, y1], [x2, y2]]``
(the finger's start and end) -> Swipe over the same path; TEXT -> Type; COMPLETE -> finish(message="complete");
INCOMPLETE -> finish(message="impossible"). The names ``introduction.md`` uses instead (TYPE, HOME, BACK, IMPOSSIBLE)
are read too. A step's ``sam2_bbox`` (assumed [x1, y1, x2, y2] on the same 0-1000 grid, as the evaluation's
``click_matching`` compares it with 0-1000 points) becomes the target box of a point action.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from autoglm_distill.data.convert.common import (
    BACK,
    HOME,
    Unmappable,
    as_text,
    checked,
    finish,
    first,
    point,
    swipe,
    thousand_to_grid,
    type_text,
)
from autoglm_distill.data.convert.context import Context

NAME = "gui_odyssey"
POINTS = {"CLICK": "Tap", "LONG_PRESS": "Long Press"}
KEYS = {"KEY_HOME": HOME, "KEY_BACK": BACK}
FINISH = {"COMPLETE": "complete", "INCOMPLETE": "impossible", "IMPOSSIBLE": "impossible"}
CONVENTIONS = {
    "coordinates": "0-1000 grid as given, 1000 clipped to 999",
    "scroll": "info is the finger's start and end: Swipe over the same path",
    "keys": "CLICK KEY_HOME -> Home, KEY_BACK -> Back, KEY_APPSELECT unmappable ('recent_apps')",
    "status": 'COMPLETE -> finish(message="complete"), INCOMPLETE/IMPOSSIBLE -> finish(message="impossible")',
    "current_app": "Unknown (no per-step app field)",
}


def _info(value: Any) -> Any:
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _xy(value: Any) -> tuple[int, int] | None:
    """``[x, y]`` or ``[[x, y]]`` on the 0-1000 grid -> grid point, or None."""
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
        return thousand_to_grid(value[0]), thousand_to_grid(value[1])
    return None


def locate(src: Path, images_dir: Path | None) -> tuple[Path, Path | None]:
    """The release's root folder works as ``--src``: read its ``annotations/`` and, unless ``--images-dir`` says
    otherwise, take the screenshots from its ``screenshots/``."""
    if (src / "annotations").is_dir():
        if images_dir is None and (src / "screenshots").is_dir():
            images_dir = src / "screenshots"
        src = src / "annotations"
    return src, images_dir


def map_action(step: dict) -> tuple[str, list[int] | None]:
    """One GUI-Odyssey step -> ``(Open-AutoGLM action, target box or None)`` (raises Unmappable)."""
    kind, info = str(step.get("action", "")).upper(), _info(step.get("info"))
    if kind in POINTS:
        if isinstance(info, str) and info in KEYS:
            return KEYS[info], None
        if info == "KEY_APPSELECT":
            raise Unmappable("recent_apps", f"{kind} KEY_APPSELECT: Open-AutoGLM has no recent-apps action")
        xy = _xy(info)
        if xy is None:
            raise Unmappable("malformed_action", f"{kind} info must be [[x, y]] or a KEY_* name, got {info!r}")
        box = step.get("sam2_bbox")
        target = None
        if isinstance(box, list | tuple) and len(box) == 4 and all(isinstance(v, int | float) for v in box):
            target = [thousand_to_grid(v) for v in box]
        return checked(point(POINTS[kind], *xy), POINTS[kind]), target
    if kind == "SCROLL":
        ends = [_xy(p) for p in info] if isinstance(info, list | tuple) and len(info) == 2 else [None]
        if None in ends:
            raise Unmappable("malformed_action", f"SCROLL info must be [[x1, y1], [x2, y2]], got {info!r}")
        return checked(swipe(ends[0], ends[1]), "Swipe"), None
    if kind in ("TEXT", "TYPE"):
        text = as_text(info)
        if not text:
            raise Unmappable("empty_type_text", f"{kind} with no text")
        return checked(type_text(text), "Type", text=text), None
    if kind in FINISH:
        return finish(FINISH[kind]), None
    if kind in ("HOME", "BACK"):
        return {"HOME": HOME, "BACK": BACK}[kind], None
    raise Unmappable("unknown_action", f"action {step.get('action')!r}")


def _step(ctx: Context, raw_id: str, t: int, step: dict) -> dict:
    if not isinstance(step, dict):
        raise Unmappable("malformed_record", f"a step must be an object, got {type(step).__name__}")
    action, target = map_action(step)
    index = step.get("step", t)
    path, _ = ctx.screenshot(first(step, "image", "screenshot"), raw_id, index if isinstance(index, int) else t)
    out = {"screenshot": path, "current_app": "Unknown", "action": action}
    if target is not None:
        out["target"] = {"bbox": target}
    return out


def convert(records: Iterable[tuple[Any, str, dict]], ctx: Context) -> Iterator[tuple[Any, dict]]:
    """``(episode id, episode)`` for every convertible annotation."""
    for file, position, record in records:
        raw_id = first(record, "episode_id")
        if raw_id is None and position == "whole file":
            raw_id = Path(file).stem  # the annotation file is named after its episode
        steps, task_info = record.get("steps"), record.get("task_info")
        if raw_id is None or not isinstance(steps, list):
            ctx.report.bad(
                "malformed_record",
                file,
                position,
                f"a GUI-Odyssey annotation needs task_info and a steps list; got fields {sorted(record)[:12]}",
            )
            continue
        raw_id = as_text(raw_id)
        task = first(task_info, "instruction", "task") if isinstance(task_info, dict) else first(record, "instruction")
        converted = [
            ctx.attempt(functools.partial(_step, ctx, raw_id, t, step), file, position, raw_id, t)
            for t, step in enumerate(steps)
        ]
        episode = ctx.episode(raw_id, task, converted, file, position)
        if episode is not None:
            yield raw_id, episode
