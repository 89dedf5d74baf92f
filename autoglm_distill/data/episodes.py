"""Multi-step episodes, expanded into one training chat per step with exactly Open-AutoGLM's context.

An episode line of a split (``train.jsonl`` ...) holds a whole task::

    {"id": "ep-1", "task": "Turn on Wi-Fi", "source": "synth",
     "steps": [{"screenshot": "images/ep-1/0.png", "current_app": "Settings",
                "elements": [{"text": "Wi-Fi", "bbox": [x1, y1, x2, y2]}],      # optional
                "thinking": "The Wi-Fi row is on screen.",                       # optional
                "action": "do(action=\"Tap\", element=[500,150])",
                "target": {"bbox": [x1, y1, x2, y2]}}, ...]}                     # optional

Step ``t`` becomes the chat Open-AutoGLM's agent (``phone_agent/agent.py``) sends at that step: the system prompt;
for each earlier step, the user's text (its screenshot was removed after the answer) and the assistant's
``<think>..</think><answer>..</answer>``; then the user message ``[current screenshot, text]`` (image first) and,
as the label, this step's answer. The user text is ``f"{task}\\n\\n{screen_info}"`` at the first step and
``f"** Screen Info **\\n\\n{screen_info}"`` after it, with ``screen_info = json.dumps({"current_app": app})``.
Coordinates are on Open-AutoGLM's 0-999 grid. ``history_steps`` keeps only the last N earlier steps (a setting,
never a silent cut; the oldest kept turn then carries the task); ``elements_in_text`` appends the current step's element
list to its user text, ``[i] text @ [x,y]`` with the box centre as the point to tap: a stand-in for the screenshot for
text-only students, which the real agent does not have, and like the screenshot it is dropped from earlier turns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm_distill.actions import try_parse
from autoglm_distill.data import SYSTEM_PROMPT


@dataclass(frozen=True)
class EpisodeFormat:
    """How episodes become chats (``data.system_prompt_file``, ``data.history_steps``, ``data.elements_in_text``)."""

    system_prompt: str = SYSTEM_PROMPT
    history_steps: int | None = None  # earlier steps kept in the context; None: all of them
    elements_in_text: bool = False

    def __post_init__(self):
        if self.history_steps is not None and self.history_steps < 0:
            raise ValueError(f"data.history_steps={self.history_steps}: use null (all) or a number >= 0.")


def read_system_prompt(path: str | Path | None) -> str:
    """The system prompt from ``data.system_prompt_file`` (e.g. Open-AutoGLM's, which we do not ship), or ours."""
    if path is None:
        return SYSTEM_PROMPT
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"data.system_prompt_file={str(path)!r} does not exist: point it at a text file holding the system prompt "
            "your agent runs with (e.g. Open-AutoGLM's phone_agent/config/prompts_en.py text, saved as a .txt), "
            "or set data.system_prompt_file=null for the project's own short prompt."
        )
    return file.read_text(encoding="utf-8").strip()


def check_box(value: Any, where: str) -> list[int] | None:
    """A box ``[x1, y1, x2, y2]`` of numbers (None stays None); raises ValueError naming ``where``."""
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 4 and all(isinstance(v, int | float) for v in value)):
        raise ValueError(f"{where} must be [x1, y1, x2, y2], got {value!r}")
    return [int(v) for v in value]


def check_episode(record: dict, root: Path) -> dict:
    """Validate an episode record (raises ValueError naming the step and field); returns it normalised."""
    task, steps = record.get("task"), record.get("steps")
    if not isinstance(task, str) or not task.strip():
        raise ValueError("an episode needs a non-empty 'task' string")
    if not isinstance(steps, list) or not steps:
        raise ValueError("an episode needs a non-empty 'steps' list")
    clean = []
    for t, step in enumerate(steps):
        where = f"steps[{t}]"
        if not isinstance(step, dict):
            raise ValueError(f"{where} must be an object")
        action = step.get("action")
        if not isinstance(action, str) or try_parse(f"<answer>{action}</answer>") is None:
            raise ValueError(f"{where}.action {action!r} is not an Open-AutoGLM action (do(action=...) or finish(...))")
        screenshot = step.get("screenshot")
        if screenshot is not None:
            image = (root / str(screenshot)).resolve()
            if not image.is_relative_to(root.resolve()):
                raise ValueError(f"{where}.screenshot {screenshot!r} points outside the data folder {root}")
            if not image.is_file():
                raise ValueError(f"{where}.screenshot {screenshot!r} does not exist in {root}")
        elements = step.get("elements") or []
        if not isinstance(elements, list) or not all(isinstance(e, dict) and "text" in e for e in elements):
            raise ValueError(f"{where}.elements must be a list of {{'text': ..., 'bbox': [...]}}")
        target = step.get("target") or {}
        clean.append(
            {
                "screenshot": screenshot,
                "current_app": str(step.get("current_app") or "Unknown"),
                "elements": [
                    {"text": str(e["text"]), "bbox": check_box(e.get("bbox"), f"{where}.elements[{j}].bbox")}
                    for j, e in enumerate(elements)
                ],
                "thinking": str(step.get("thinking") or ""),
                "action": action,
                "bbox": check_box(target.get("bbox") if isinstance(target, dict) else None, f"{where}.target.bbox"),
            }
        )
    return {"id": str(record.get("id", "")), "task": task, "steps": clean}


def screen_info(app: str) -> str:
    return json.dumps({"current_app": app}, ensure_ascii=False)


def user_text(task: str, step: dict, first: bool, elements_in_text: bool) -> str:
    """The text of a step's user message, as Open-AutoGLM's agent writes it (plus the optional element list)."""
    info = screen_info(step["current_app"])
    text = f"{task}\n\n{info}" if first else f"** Screen Info **\n\n{info}"
    if elements_in_text and step["elements"]:
        text += "\n\n** Elements **\n" + "\n".join(element_line(i, e) for i, e in enumerate(step["elements"]))
    return text


def element_line(index: int, element: dict) -> str:
    """``[i] text @ [x,y]``: an element of the text channel with its box centre, the point a tap would use."""
    box = element["bbox"]
    if box is None:
        return f"[{index}] {element['text']}"
    return f"[{index}] {element['text']} @ [{(box[0] + box[2]) // 2},{(box[1] + box[3]) // 2}]"


def answer_text(step: dict) -> str:
    return f"<think>{step['thinking']}</think><answer>{step['action']}</answer>"


def step_chats(episode: dict, fmt: EpisodeFormat) -> list[dict]:
    """One record per step: ``messages`` (the chat up to and including this step's answer), ``bbox``, ``id``
    (``<episode id>/<step>``), ``episode`` and ``step`` (its index)."""
    records = []
    steps = episode["steps"]
    for t, step in enumerate(steps):
        first_kept = 0 if fmt.history_steps is None else max(0, t - fmt.history_steps)
        messages: list[dict] = [{"role": "system", "content": fmt.system_prompt}]
        for i in range(first_kept, t):  # earlier turns: their screenshots (and element lists) were removed
            # The task is only in the first user text; when history_steps cuts that turn off, the oldest kept turn
            # carries it instead.
            text = user_text(episode["task"], steps[i], i == first_kept, elements_in_text=False)
            messages.append({"role": "user", "content": [{"type": "text", "text": text}]})
            messages.append({"role": "assistant", "content": answer_text(steps[i])})
        content = [{"type": "text", "text": user_text(episode["task"], step, t == first_kept, fmt.elements_in_text)}]
        if step["screenshot"] is not None:
            content.insert(0, {"type": "image", "image": step["screenshot"]})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": answer_text(step)})
        records.append(
            {
                "messages": messages,
                "bbox": step["bbox"],
                "id": f"{episode['id']}/{t}",
                "episode": episode["id"],
                "step": t,
            }
        )
    return records
