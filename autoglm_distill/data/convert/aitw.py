"""Android in the Wild (Rawles et al. 2023, google-research/google-research ``android_in_the_wild``) -> episodes.

One record per step, grouped into episodes by ``episode_id`` (``ep_id`` in some mirrors) and ordered by ``step_id``.
Field names as the release's README lists them (verified), with ``/`` read as ``_`` (the Hugging Face mirrors'
spelling): ``goal_info``, ``image/encoded`` (also ``image``: bytes, an image dict, base64 or a file name; raw RGB
pixels as some mirrors store them are read with ``image/width`` x ``image/height``), ``current_activity``,
``results/action_type``, ``results/yx_touch``, ``results/yx_lift`` ((y, x), normalised 0-1), ``results/type_action``,
``image/ui_annotations_positions`` ((y, x, height, width) per element, normalised, flattened) and
``image/ui_annotations_text``.

Action types: the ``ActionType`` enum of google-research/google-research ``android_in_the_wild/action_type.py``
(verified): TYPE = 3, DUAL_POINT = 4, PRESS_BACK = 5, PRESS_HOME = 6, PRESS_ENTER = 7, STATUS_TASK_COMPLETE = 10,
STATUS_TASK_IMPOSSIBLE = 11 (0-2, 8, 9 unused). A DUAL_POINT is a tap when touch and lift lie within 0.04 of each other
(normalised Euclidean distance, ``_SWIPE_DISTANCE_THRESHOLD`` in its ``action_matching.py``), else a swipe from touch
to lift; the target box of a tap is the smallest UI annotation holding the touch point.

PRESS_ENTER has no Open-AutoGLM equivalent: the step is counted as unmappable ``enter`` and dropped (its episode kept
unless ``--on-unmappable drop-episode``). Mapping it to Type("\\n") would teach a wrong action: Open-AutoGLM's Type
clears the focused field before typing, so it would erase the text the Enter was meant to submit.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

from autoglm_distill.data.convert.common import (
    BACK,
    HOME,
    Unmappable,
    as_text,
    checked,
    finish,
    first,
    norm_to_grid,
    point,
    swipe,
    type_text,
)
from autoglm_distill.data.convert.context import Context

NAME = "aitw"
TYPE, DUAL_POINT, PRESS_BACK, PRESS_HOME, PRESS_ENTER = 3, 4, 5, 6, 7
STATUS_TASK_COMPLETE, STATUS_TASK_IMPOSSIBLE = 10, 11
TAP_DISTANCE = 0.04  # AITW's _SWIPE_DISTANCE_THRESHOLD
CONVENTIONS = {
    "dual_point": f"tap when |touch - lift| <= {TAP_DISTANCE} (normalised), else Swipe touch -> lift; (y, x) read",
    "enter": "PRESS_ENTER unmappable ('enter'): the step is dropped (Open-AutoGLM's Type would clear the field)",
    "status": 'STATUS_TASK_COMPLETE -> finish(message="complete"), STATUS_TASK_IMPOSSIBLE -> "impossible"',
    "current_app": "the package of current_activity",
}


def _floats(value: Any) -> list[float] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, list | tuple):
        return None
    flat = [v for row in value for v in row] if value and isinstance(value[0], list | tuple) else list(value)
    try:
        return [float(v) for v in flat]
    except (TypeError, ValueError):
        return None


def _yx(record: dict, key: str) -> tuple[float, float]:
    yx = _floats(record.get(key))
    if yx is None or len(yx) != 2 or not all(0 <= v <= 1 for v in yx):
        raise Unmappable("malformed_action", f"{key} must be a normalised (y, x) pair, got {record.get(key)!r}")
    return yx[0], yx[1]


def _boxes(record: dict) -> list[tuple[str, list[int]]]:
    """``(text, [x1, y1, x2, y2] on the grid)`` per UI annotation."""
    flat = _floats(first(record, "image_ui_annotations_positions", "ui_positions")) or []
    texts = record.get("image_ui_annotations_text", record.get("ui_text"))
    if isinstance(texts, str):
        try:
            texts = json.loads(texts)
        except json.JSONDecodeError:
            texts = None
    texts = texts if isinstance(texts, list | tuple) else []
    boxes = []
    for i in range(len(flat) // 4):
        y, x, h, w = flat[4 * i : 4 * i + 4]
        box = [norm_to_grid(x), norm_to_grid(y), norm_to_grid(x + w), norm_to_grid(y + h)]
        boxes.append((as_text(texts[i]) if i < len(texts) else "", box))
    return boxes


def map_action(record: dict) -> tuple[str, list[int] | None]:
    """One AITW step -> ``(Open-AutoGLM action, target box or None)`` (raises Unmappable)."""
    try:
        kind = int(first(record, "results_action_type"))
    except (TypeError, ValueError):
        raise Unmappable("malformed_action", f"results_action_type {record.get('results_action_type')!r}") from None
    if kind == DUAL_POINT:
        (ty, tx), (ly, lx) = _yx(record, "results_yx_touch"), _yx(record, "results_yx_lift")
        if math.hypot(ty - ly, tx - lx) > TAP_DISTANCE:
            start, end = (norm_to_grid(tx), norm_to_grid(ty)), (norm_to_grid(lx), norm_to_grid(ly))
            return checked(swipe(start, end), "Swipe"), None
        x, y = norm_to_grid(tx), norm_to_grid(ty)
        holding = [box for _, box in _boxes(record) if box[0] <= x <= box[2] and box[1] <= y <= box[3]]
        target = min(holding, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])) if holding else None
        return checked(point("Tap", x, y), "Tap"), target
    if kind == TYPE:
        text = as_text(first(record, "results_type_action")) or ""
        if not text:
            raise Unmappable("empty_type_text", "TYPE with no text")
        return checked(type_text(text), "Type", text=text), None
    if kind == PRESS_BACK:
        return BACK, None
    if kind == PRESS_HOME:
        return HOME, None
    if kind == PRESS_ENTER:
        raise Unmappable("enter", "PRESS_ENTER: Open-AutoGLM has no Enter action")
    if kind == STATUS_TASK_COMPLETE:
        return finish("complete"), None
    if kind == STATUS_TASK_IMPOSSIBLE:
        return finish("impossible"), None
    raise Unmappable("unknown_action", f"results_action_type {kind}")


def _step(ctx: Context, record: dict, raw_id: str, step_id: int) -> dict:
    action, target = map_action(record)
    width, height = first(record, "image_width"), first(record, "image_height")
    size = (int(width), int(height)) if isinstance(width, int) and isinstance(height, int) else None
    path, _ = ctx.screenshot(first(record, "image_encoded", "image"), raw_id, step_id, size)
    activity = as_text(first(record, "current_activity"))
    step = {"screenshot": path, "current_app": activity.split("/")[0] if activity else "Unknown"}
    elements = [{"text": text, "bbox": box} for text, box in _boxes(record) if text and text.strip()]
    if elements:
        step["elements"] = elements
    step["action"] = action
    if target is not None:
        step["target"] = {"bbox": target}
    return step


def convert(records: Iterable[tuple[Any, str, dict]], ctx: Context) -> Iterator[tuple[Any, dict]]:
    """Group the step records into episodes; ``(episode id, episode)`` for every convertible one, in order of first
    appearance. Only the small step dicts are held; screenshots are written as they are read."""
    episodes: dict[str, dict] = {}
    for file, position, raw in records:
        record = {str(k).replace("/", "_"): v for k, v in raw.items()}
        raw_id, step_id = first(record, "episode_id", "ep_id"), first(record, "step_id")
        try:
            step_id = int(step_id)
        except (TypeError, ValueError):
            step_id = None
        if raw_id is None or step_id is None:
            ctx.report.bad("malformed_record", file, position, "an AITW step needs episode_id and an integer step_id")
            continue
        raw_id = as_text(raw_id)
        episode = episodes.setdefault(raw_id, {"goal": None, "steps": {}, "file": file, "position": position})
        episode["goal"] = episode["goal"] or as_text(first(record, "goal_info"))
        if step_id in episode["steps"]:
            ctx.report.bad("malformed_record", file, position, f"duplicate step_id {step_id}", raw_id, step_id)
            continue
        make_step = functools.partial(_step, ctx, record, raw_id, step_id)
        episode["steps"][step_id] = ctx.attempt(make_step, file, position, raw_id, step_id)
    for raw_id, episode in episodes.items():
        steps = [episode["steps"][k] for k in sorted(episode["steps"])]
        converted = ctx.episode(raw_id, episode["goal"], steps, episode["file"], episode["position"])
        if converted is not None:
            yield raw_id, converted
