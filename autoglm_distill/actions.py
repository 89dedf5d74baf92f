"""Parse phone-agent answers and score predicted actions against references.

The agent answers ``<think>…</think><answer>ACTION</answer>`` where ACTION is a ``do(action=…, …)`` call or
``finish(message="…")``. Parsing mirrors the Open-AutoGLM client (``ModelClient._parse_response`` in
``phone_agent/model/client.py`` and ``parse_action`` in ``phone_agent/actions/handler.py``), so a student is
scored by the same rules the real agent loop applies to its output. Where we differ, it is said below.
"""

from __future__ import annotations

import ast
from typing import Any

import torch
from torchmetrics import Metric

_FINISH = "finish(message="
_DO = "do(action="
POINT_ACTIONS = ("Tap", "Long Press")  # actions whose target is a single point on screen


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


def _point_in_box(point: Any, box: list[int]) -> bool:
    """Whether ``point`` is an ``[x, y]`` pair of numbers inside ``box`` (edges included)."""
    if not isinstance(point, list | tuple) or len(point) != 2:
        return False
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in point):
        return False
    x1, y1, x2, y2 = box
    return x1 <= point[0] <= x2 and y1 <= point[1] <= y2


class ActionMetrics(Metric):
    """Action-level accuracy of generated answers against reference answers.

    ``compute()`` returns ``parse_rate``, ``action_type_acc``, ``tap_in_element`` (over Tap/Long Press
    references that come with a target box), ``exact_match`` and ``n``. States are sum-reduced counters,
    so the metric aggregates correctly across DDP ranks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    _STATES = ("total", "parsed", "type_correct", "exact", "tap_total", "tap_hit")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in self._STATES:
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str], bboxes: list[list[int] | None]) -> None:
        """Score a batch.

        Args:
            predictions: Raw generated assistant texts.
            references: Reference assistant texts (must parse).
            bboxes: Target element box ``[x1, y1, x2, y2]`` (0-1000 grid) for Tap/Long Press
                references, else ``None``.

        Raises:
            ValueError: If the lists differ in length or a reference does not parse.
        """
        if not len(predictions) == len(references) == len(bboxes):
            raise ValueError(
                f"length mismatch: {len(predictions)} predictions, {len(references)} references, {len(bboxes)} bboxes"
            )
        counts = dict.fromkeys(self._STATES, 0)
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
            if bbox is not None and action_type(ref) in POINT_ACTIONS:
                counts["tap_total"] += 1
                counts["tap_hit"] += same_type and _point_in_box(pred.get("element"), bbox)
        for name, value in counts.items():
            getattr(self, name).add_(int(value))

    def compute(self) -> dict[str, torch.Tensor]:
        """Return the rates (0.0 when their denominator is empty) and the example count ``n``."""

        def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
            # num is 0 whenever den is 0, so clamping gives 0.0 instead of nan.
            return num.float() / den.clamp(min=1).float()

        return {
            "parse_rate": ratio(self.parsed, self.total),
            "action_type_acc": ratio(self.type_correct, self.total),
            "tap_in_element": ratio(self.tap_hit, self.tap_total),
            "exact_match": ratio(self.exact, self.total),
            "n": self.total.float(),
        }
