"""Parse phone-agent answers and score predicted actions against references.

The agent answers ``<think>…</think><answer>ACTION</answer>`` where ACTION is a ``do(action=…, …)`` call or
``finish(message="…")``. Parsing mirrors the Open-AutoGLM client (``ModelClient._parse_response`` in
``phone_agent/model/client.py`` and ``parse_action`` in ``phone_agent/actions/handler.py``), so a student is
scored by the same rules the real agent loop applies to its output. Where we differ, it is said below.
"""

from __future__ import annotations

import ast
import hashlib
from typing import Any

import torch
from torchmetrics import Metric

_FINISH = "finish(message="
_DO = "do(action="
POINT_ACTIONS = ("Tap", "Long Press", "Double Tap")  # actions whose target is a single point on screen
# Grounding protocol 2 (AndroidControl-style): a point within 14% of the screen's extent of the reference point,
# distance measured on the normalised [0, 1] screen (the 0-1000 grid divided by 1000).
NEAR_FRACTION = 0.14


def split_response(text: str) -> tuple[str, str]:
    """Split a raw model response into ``(thinking, answer)``.

    Same priority as Open-AutoGLM's client: (1) everything from ``finish(message=`` on is the answer,
    else (2) everything from ``do(action=`` on, else (3) the text after ``<answer>``, else (4) no thinking
    and the whole text as the answer. Unlike the client we cut the answer at ``</answer>`` in every case and
    drop the ``<think>``/``</think>``/``<answer>`` tags from the thinking: the client only sees tag-free text
    from its server for rules 1-2, while our references keep the tags in the text.

    Args:
        text: The generated assistant text.

    Returns:
        The thinking text and the action string (not yet parsed).
    """
    if _FINISH in text:
        thinking, rest = text.split(_FINISH, 1)
        answer = _FINISH + rest
    elif _DO in text:
        thinking, rest = text.split(_DO, 1)
        answer = _DO + rest
    elif "<answer>" in text:
        thinking, answer = text.split("<answer>", 1)
    else:
        return "", text
    for tag in ("<think>", "</think>", "<answer>"):
        thinking = thinking.replace(tag, "")
    return thinking.strip(), answer.split("</answer>", 1)[0].strip()


def _parse_do(answer: str) -> dict[str, Any]:
    """Parse a ``do(...)`` call with :mod:`ast`, keeping its keyword arguments as literals."""
    # Raw control characters would end the string literal early; the client escapes them the same way.
    answer = answer.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    call = ast.parse(answer, mode="eval").body
    if not isinstance(call, ast.Call):
        raise ValueError("Expected a function call")
    action: dict[str, Any] = {"_metadata": "do"}
    for keyword in call.keywords:
        action[keyword.arg] = ast.literal_eval(keyword.value)
    return action


def parse_action(answer: str) -> dict[str, Any]:
    """Parse an action string into a dict, following Open-AutoGLM's ``parse_action``.

    * ``do(action="Type", text="…")`` (and ``Type_Name``) is not parsed as Python: the text is the raw
      slice between ``text="`` and the final ``")``, so quotes and commas in it survive unescaped.
    * Any other string starting with ``do`` is parsed with :mod:`ast`; keyword values must be literals.
    * A string starting with ``finish`` yields its message, sliced the same raw way.

    Args:
        answer: The action string, e.g. ``do(action="Tap", element=[500,150])``.

    Returns:
        E.g. ``{"_metadata": "do", "action": "Tap", "element": [500, 150]}`` or
        ``{"_metadata": "finish", "message": "Done"}``.

    Raises:
        ValueError: If the string is not a recognised, well-formed action.
    """
    s = answer.strip()
    try:
        if s.startswith(('do(action="Type"', 'do(action="Type_Name"')):
            return {"_metadata": "do", "action": "Type", "text": s.split("text=", 1)[1][1:-2]}
        if s.startswith("do"):
            return _parse_do(s)
        if s.startswith("finish"):
            return {"_metadata": "finish", "message": s.replace(_FINISH, "")[1:-2]}
    except Exception as e:  # SyntaxError, IndexError, ... all mean "unparseable", as in the client
        raise ValueError(f"Failed to parse action: {e}") from e
    raise ValueError(f"Failed to parse action: {answer!r}")


def try_parse(text: str) -> dict[str, Any] | None:
    """Parse a full model output into an action dict, or return ``None`` if it does not parse."""
    try:
        return parse_action(split_response(text)[1])
    except ValueError:
        return None


def action_type(action: dict[str, Any]) -> str:
    """Return the action's type: ``"Tap"``, ``"Type"``, …, or ``"finish"`` (``""`` if unknown)."""
    if action.get("_metadata") == "finish":
        return "finish"
    return str(action.get("action", ""))


def _point(value: Any) -> tuple[float, float] | None:
    """``value`` as an ``(x, y)`` pair of numbers, or None when it is not one."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return None
    return float(value[0]), float(value[1])


def _point_in_box(point: Any, box: list[int]) -> bool:
    """Whether ``point`` is an ``[x, y]`` pair of numbers inside ``box`` (edges included)."""
    xy = _point(point)
    if xy is None:
        return False
    x1, y1, x2, y2 = box
    return x1 <= xy[0] <= x2 and y1 <= xy[1] <= y2


def _point_near(point: Any, reference: Any, fraction: float = NEAR_FRACTION) -> bool:
    """Whether ``point`` lies within ``fraction`` of the screen of ``reference`` (both on the 0-1000 grid)."""
    xy, ref = _point(point), _point(reference)
    if xy is None or ref is None:
        return False
    return ((xy[0] - ref[0]) ** 2 + (xy[1] - ref[1]) ** 2) ** 0.5 <= fraction * 1000


def normalise_text(text: Any) -> str:
    """Typed text as compared for step success: case-folded, outer whitespace stripped, inner runs collapsed."""
    return " ".join(str(text).casefold().split())


def _swipe_direction(action: dict[str, Any]) -> str | None:
    """``up``/``down``/``left``/``right``: the finger's dominant direction from ``start`` to ``end``."""
    start, end = _point(action.get("start")), _point(action.get("end"))
    if start is None or end is None or start == end:
        return None
    dx, dy = end[0] - start[0], end[1] - start[1]
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def step_correct(pred: dict[str, Any] | None, ref: dict[str, Any], bbox: list[int] | None) -> bool:
    """Whether a predicted action does what the reference does (AndroidControl's step accuracy, on Open-AutoGLM's
    actions): the same type and every argument right. A point (Tap, Long Press, Double Tap) must land inside the
    target box when the reference has one, else within ``NEAR_FRACTION`` of the reference point; Type text and the
    Launch app are compared after ``normalise_text``; a Swipe must move the same way (its dominant direction).
    Actions without arguments, Wait's duration and finish's message: the type alone decides."""
    if pred is None or action_type(pred) != action_type(ref):
        return False
    kind = action_type(ref)
    if kind in POINT_ACTIONS:
        if bbox is not None:
            return _point_in_box(pred.get("element"), bbox)
        return _point_near(pred.get("element"), ref.get("element"))
    if kind in ("Type", "Type_Name"):
        return normalise_text(pred.get("text", "")) == normalise_text(ref.get("text", ""))
    if kind == "Launch":
        return normalise_text(pred.get("app", "")) == normalise_text(ref.get("app", ""))
    if kind == "Swipe":
        return _swipe_direction(pred) is not None and _swipe_direction(pred) == _swipe_direction(ref)
    return True


class ActionMetrics(Metric):
    """Action-level accuracy of generated answers against reference answers, as GUI-agent papers report it.

    ``compute()`` returns:

    - ``parse_rate``: answers that parse by Open-AutoGLM's rules;
    - ``action_type_acc``: the right action type;
    - grounding, over point references (Tap, Long Press, Double Tap), two protocols: ``tap_in_element`` (inside
      the target element's box; only references that have one) and ``tap_within_14pct`` (within 14% of the screen
      of the reference point; all of them);
    - ``step_success``: the right type and every argument right (``step_correct``);
    - ``exact_match``: the parsed action equals the reference's, argument for argument;
    - ``episode_success`` (only when ``update`` was given episode ids): episodes whose every step succeeded;
    - ``n``: steps scored.

    Counters are sum-reduced and the per-step episode records concatenated, so it aggregates across DDP ranks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    _STATES = ("total", "parsed", "type_correct", "exact", "step_ok", "tap_total", "tap_hit", "point_total", "near")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in self._STATES:
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # One entry per step scored with an episode id: a stable 64-bit key of the id (the same on every rank) and
        # whether the step succeeded.
        self.add_state("episode_key", default=[], dist_reduce_fx="cat")
        self.add_state("episode_step_ok", default=[], dist_reduce_fx="cat")

    def update(
        self,
        predictions: list[str],
        references: list[str],
        bboxes: list[list[int] | None],
        episodes: list[str] | None = None,
    ) -> None:
        """Score a batch.

        Args:
            predictions: Raw generated assistant texts.
            references: Reference assistant texts (must parse).
            bboxes: Target element box ``[x1, y1, x2, y2]`` (0-1000 grid) for point references, else ``None``.
            episodes: the episode each step belongs to (for ``episode_success``), or None.

        Raises:
            ValueError: If the lists differ in length or a reference does not parse.
        """
        if not len(predictions) == len(references) == len(bboxes) == len(episodes or bboxes):
            raise ValueError(
                f"length mismatch: {len(predictions)} predictions, {len(references)} references, {len(bboxes)} bboxes"
                + (f", {len(episodes)} episode ids" if episodes is not None else "")
            )
        counts = dict.fromkeys(self._STATES, 0)
        step_ok = []
        for pred_text, ref_text, bbox in zip(predictions, references, bboxes, strict=True):
            ref = try_parse(ref_text)
            if ref is None:  # references come from our data; a failure here is a data bug, not a miss
                raise ValueError(f"reference answer does not parse: {ref_text!r}")
            pred = try_parse(pred_text)
            same_type = pred is not None and action_type(pred) == action_type(ref)
            counts["total"] += 1
            counts["parsed"] += pred is not None
            counts["type_correct"] += same_type
            counts["exact"] += pred == ref
            step_ok.append(step_correct(pred, ref, bbox))
            counts["step_ok"] += step_ok[-1]
            if action_type(ref) in POINT_ACTIONS:
                counts["point_total"] += 1
                counts["near"] += same_type and _point_near(pred.get("element"), ref.get("element"))
                if bbox is not None:
                    counts["tap_total"] += 1
                    counts["tap_hit"] += same_type and _point_in_box(pred.get("element"), bbox)
        for name, value in counts.items():
            getattr(self, name).add_(int(value))
        if episodes is not None:
            keys = [int.from_bytes(hashlib.blake2b(str(e).encode(), digest_size=8).digest(), "big", signed=True)
                    for e in episodes]  # fmt: skip
            self.episode_key.append(torch.tensor(keys, dtype=torch.long))
            self.episode_step_ok.append(torch.tensor(step_ok, dtype=torch.long))

    def compute(self) -> dict[str, torch.Tensor]:
        """Return the rates (0.0 when their denominator is empty) and the example count ``n``."""

        def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
            # num is 0 whenever den is 0, so clamping gives 0.0 instead of nan.
            return num.float() / den.clamp(min=1).float()

        out = {
            "parse_rate": ratio(self.parsed, self.total),
            "action_type_acc": ratio(self.type_correct, self.total),
            "tap_in_element": ratio(self.tap_hit, self.tap_total),
            "tap_within_14pct": ratio(self.near, self.point_total),
            "step_success": ratio(self.step_ok, self.total),
            "exact_match": ratio(self.exact, self.total),
            "n": self.total.float(),
        }
        keys, ok = self.episode_key, self.episode_step_ok
        if isinstance(keys, list):  # torchmetrics leaves list states as lists when nothing was synced
            keys, ok = (torch.cat(keys), torch.cat(ok)) if keys else (None, None)
        if keys is not None and keys.numel():
            _, episode = torch.unique(keys, return_inverse=True)
            failed = torch.zeros(int(episode.max()) + 1, dtype=torch.long).index_add_(0, episode, 1 - ok)
            out["episode_success"] = (failed == 0).float().mean()
        return out
