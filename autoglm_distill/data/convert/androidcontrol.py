"""AndroidControl (Li et al. 2024, google-research/google-research ``android_control``) -> episodes.

One record per episode, as the release's README describes it (field names verified there): ``episode_id``,
``goal``, ``screenshots`` (PNG bytes; Hugging Face mirrors: image dicts, base64 strings or file names;
``screenshots_b64`` also read), ``screenshot_widths``, ``screenshot_heights``, ``accessibility_trees``, ``actions``
(JSON strings or objects with ``action_type`` and its arguments) and ``step_instructions``. There are
``len(screenshots) - 1`` actions: action ``t`` is taken on screenshot ``t`` (the last screenshot has no action).

Mapping (README's action space): ``click``/``long_press`` x, y in pixels of that step's screenshot -> Tap/Long Press
on the 0-999 grid; ``scroll`` -> Swipe (convention below); ``open_app`` app_name -> Launch; ``input_text`` -> Type;
``navigate_back`` -> Back; ``navigate_home`` -> Home; ``wait`` -> Wait (the source's seconds when it names them,
else 1 second, Open-AutoGLM's own default for a Wait whose duration it cannot read). ``status`` with
``goal_status`` complete/infeasible (not in the README; some re-exports, after AndroidWorld, carry it) ->
finish(message="complete"/"infeasible"). Unmappable, counted: ``type`` (the README's click + type + Enter: Open-AutoGLM
has neither the click nor the Enter in one action), ``keyboard_enter`` (no Enter action), anything else.

The accessibility trees are serialised protocol buffers; they are not decoded (no element list, no target box,
``current_app`` "Unknown"), which keeps this converter free of the AndroidEnv proto definitions.
"""

from __future__ import annotations

import functools
import json
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
    launch,
    point,
    px_to_grid,
    swipe,
    type_text,
    wait,
)
from autoglm_distill.data.convert.context import Context

NAME = "androidcontrol"
# AndroidControl's scroll direction is the direction the CONTENT moves into view: "scroll down" reveals what is below,
# which the finger does by swiping UP. So the finger path (grid) for each direction is:
SCROLL_SWIPES = {
    "down": ((500, 800), (500, 200)),
    "up": ((500, 200), (500, 800)),
    "right": ((800, 500), (200, 500)),
    "left": ((200, 500), (800, 500)),
}
WAIT_SECONDS = 1  # Open-AutoGLM's handler falls back to 1 second too
POINTS = {"click": "Tap", "long_press": "Long Press", "double_tap": "Double Tap"}
STATUSES = ("complete", "infeasible")
UNMAPPABLE = {
    "type": "type_with_click_and_enter",  # click + type + Enter in one action; Open-AutoGLM's Type only types
    "keyboard_enter": "enter",
}
CONVENTIONS = {
    "scroll": "direction the content moves: scroll down = finger swipes up, [500,800] -> [500,200] (grid)",
    "wait": f"{WAIT_SECONDS} seconds unless the action names its seconds",
    "status": 'status goal_status complete/infeasible -> finish(message="complete"/"infeasible")',
    "type": "unmappable (click + type + Enter); input_text -> Type",
    "elements": "not read (accessibility trees are serialised protos); current_app Unknown",
}


def _action(raw: Any) -> dict:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise Unmappable("malformed_action", f"not valid JSON ({err.msg}): {raw[:80]!r}") from None
    if not isinstance(raw, dict) or not raw.get("action_type"):
        raise Unmappable("malformed_action", f"expected an object with action_type, got {str(raw)[:80]!r}")
    return raw


def _number(action: dict, key: str) -> float:
    try:
        return float(action[key])
    except (KeyError, TypeError, ValueError):
        raise Unmappable("malformed_action", f"{action['action_type']} needs a number {key!r}: {action}") from None


def map_action(action: dict, size: tuple[int, int] | None) -> str:
    """One AndroidControl action -> an Open-AutoGLM action string (raises Unmappable)."""
    kind = str(action["action_type"])
    if kind in POINTS:
        x, y = _number(action, "x"), _number(action, "y")
        if not size or not size[0] or not size[1]:
            raise Unmappable("no_screen_size", f"{kind} in pixels but no screenshot width/height")
        return checked(point(POINTS[kind], px_to_grid(x, size[0]), px_to_grid(y, size[1])), POINTS[kind])
    if kind == "scroll":
        direction = str(action.get("direction", "")).lower()
        if direction not in SCROLL_SWIPES:
            raise Unmappable("malformed_action", f"scroll direction {action.get('direction')!r}")
        return checked(swipe(*SCROLL_SWIPES[direction]), "Swipe")
    if kind == "open_app":
        app = as_text(action.get("app_name"))
        if not app:
            raise Unmappable("malformed_action", f"open_app without app_name: {action}")
        return checked(launch(app), "Launch", app=app)
    if kind == "input_text":
        text = as_text(action.get("text"))
        if not text:
            raise Unmappable("empty_type_text", f"input_text without text: {action}")
        return checked(type_text(text), "Type", text=text)
    if kind == "navigate_back":
        return BACK
    if kind == "navigate_home":
        return HOME
    if kind == "wait":
        seconds = first(action, "duration", "seconds", "time")
        return checked(wait(float(seconds) if isinstance(seconds, int | float) else WAIT_SECONDS), "Wait")
    if kind == "status":
        status = str(action.get("goal_status", "")).lower()
        if status not in STATUSES:
            raise Unmappable("unknown_status", f"goal_status {action.get('goal_status')!r}")
        return checked(finish(status), "finish")
    raise Unmappable(UNMAPPABLE.get(kind, "unknown_action"), f"action_type {kind!r}")


def _at(values: Any, t: int) -> Any:
    return values[t] if isinstance(values, list | tuple) and t < len(values) else None


def _step(ctx: Context, record: dict, raw_id: Any, t: int, raw_action: Any) -> dict:
    action = _action(raw_action)
    listed = (_at(record.get("screenshot_widths"), t), _at(record.get("screenshot_heights"), t))
    size = (int(listed[0]), int(listed[1])) if all(isinstance(v, int | float) for v in listed) else None
    mapped = map_action(action, size) if size or action["action_type"] not in POINTS else None  # before any write
    screenshots = record.get("screenshots", record.get("screenshots_b64"))
    path, image_size = ctx.screenshot(_at(screenshots, t), str(raw_id), t, size)
    if mapped is None:  # a point with no listed screen size: the screenshot's own size
        try:
            mapped = map_action(action, image_size)
        except Unmappable:
            ctx.remove(path)
            raise
    return {"screenshot": path, "current_app": "Unknown", "action": mapped}


def convert(records: Iterable[tuple[Any, str, dict]], ctx: Context) -> Iterator[tuple[Any, dict]]:
    """``(episode id, episode)`` for every convertible episode record."""
    for file, position, record in records:
        raw_id = first(record, "episode_id")
        actions = record.get("actions")
        if isinstance(actions, str):
            try:
                actions = json.loads(actions)
            except json.JSONDecodeError:
                actions = None
        if raw_id is None or not isinstance(actions, list):
            ctx.report.bad(
                "malformed_record",
                file,
                position,
                "an AndroidControl episode needs episode_id, goal, screenshots and an actions list; "
                f"got fields {sorted(record)[:12]}",
            )
            continue
        steps = [
            ctx.attempt(functools.partial(_step, ctx, record, raw_id, t, a), file, position, raw_id, t)
            for t, a in enumerate(actions)
        ]
        episode = ctx.episode(raw_id, first(record, "goal"), steps, file, position)
        if episode is not None:
            yield raw_id, episode
