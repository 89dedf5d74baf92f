"""Closed-loop episodes: the agent's own answers choose the next screen and fill its history.

Training and the teacher-forced evaluation put the recorded history in front of every step (see
`autoglm_distill.on_policy`): without a phone, the next screenshot cannot follow the model's action. An
`Environment` is that phone: it shows a screen, takes the model's raw answer and moves on. A real one drives an
emulator (Open-AutoGLM's agent does it over ADB); `ReplayPhone` is the synthetic one, built from an episode line whose
expert path the generator already drew (``autoglm_distill/data/synth.py``):

* an action that does what the expert did on this screen (`autoglm_distill.actions.step_correct`: the tap inside the
  target, the same text, app or swipe direction) moves to the expert's next screen; ``finish`` on the last one ends
  the episode as a success;
* ``Back`` returns to the previous screen of the path;
* anything else leaves the screen as it was (as a tap on nothing does): the generator does not know which screen a
  wrong tap would open, so the episode cannot go astray, only lose steps;
* ``finish`` before the end, or ``max_steps`` actions, ends it as a failure.

`closed_loop` plays every episode of a split this way, a batch of episodes in lock-step, each prompt built exactly as
training builds it (`autoglm_distill.data.episodes.step_chats`) but from the screens the model reached and the answers
it gave (``eval.closed_loop=true`` runs it for every evaluated model).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from rich.progress import Progress

from autoglm_distill.actions import action_type, parse_action, split_response, step_correct, try_parse
from autoglm_distill.data.episodes import EpisodeFormat, check_episode, step_chats


class Environment(Protocol):
    """A phone the agent acts on: one episode of one task."""

    task: str
    done: bool
    success: bool

    def observe(self) -> dict:
        """The current screen as an episode step: ``screenshot`` (a path under the data folder, or None),
        ``current_app`` and ``elements``."""

    def act(self, answer: str) -> None:
        """Apply the model's raw answer (``<think>..</think><answer>..</answer>``) to the phone."""


class ReplayPhone:
    """The synthetic phone of one recorded episode (rules in the module docstring).

    Args:
        episode: an episode record, normalised by `autoglm_distill.data.episodes.check_episode`.
        max_steps: actions allowed before the episode fails; default twice the expert's.
    """

    def __init__(self, episode: dict, max_steps: int | None = None):
        self.episode, self.task = episode, episode["task"]
        self.max_steps = max_steps or 2 * len(episode["steps"])
        self.screen, self.actions, self.furthest = 0, 0, 0
        self.done = self.success = False

    def observe(self) -> dict:
        step = self.episode["steps"][self.screen]
        return {k: step[k] for k in ("screenshot", "current_app", "elements")}

    def act(self, answer: str) -> None:
        if self.done:
            raise RuntimeError(f"episode {self.episode['id']} is over: reset it with a new ReplayPhone")
        expert = self.episode["steps"][self.screen]
        predicted = try_parse(answer)
        reference = parse_action(expert["action"])
        self.actions += 1
        if step_correct(predicted, reference, expert["bbox"]):
            if action_type(reference) == "finish":
                self.done = self.success = True
                return
            self.screen += 1
            self.furthest = max(self.furthest, self.screen)
        elif predicted is not None and action_type(predicted) == "finish":
            self.done = True  # gave up, or claimed success too early
        elif predicted is not None and action_type(predicted) == "Back" and self.screen > 0:
            self.screen -= 1
        if self.actions >= self.max_steps:
            self.done = True

    @property
    def progress(self) -> float:
        """Share of the expert's steps done (the last one, ``finish``, only on success)."""
        return 1.0 if self.success else self.furthest / len(self.episode["steps"])


def read_episodes(root: Path, split: str) -> list[dict]:
    """The episode lines of ``root/<split>.jsonl``, normalised."""
    path = root / f"{split}.jsonl"
    episodes = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "steps" not in record:
            raise ValueError(f"{path}:{n} is not an episode line (no 'steps'): closed-loop runs need episodes")
        episodes.append(check_episode(record, root))
    return episodes


def prompt_messages(phone: ReplayPhone, history: list[dict], fmt: EpisodeFormat) -> list[dict]:
    """The chat the model sees now: training's layout, with the screens it reached and the answers it gave."""
    current = {**phone.observe(), "thinking": "", "action": "", "bbox": None}
    episode = {"id": phone.episode["id"], "task": phone.task, "steps": [*history, current]}
    return step_chats(episode, fmt)[-1]["messages"]


def closed_loop(
    answer: Callable[[list[list[dict]]], list[str]], episodes: list[dict], fmt: EpisodeFormat, batch_size: int = 32
) -> dict[str, float]:
    """Every episode played on `ReplayPhone` by ``answer`` (the model: chats in, raw answers out), ``batch_size``
    chats a call; returns ``episode_success``, ``progress`` (mean share of the expert path done) and
    ``actions_per_episode``."""
    phones = [ReplayPhone(copy.deepcopy(e)) for e in episodes]
    histories: list[list[dict]] = [[] for _ in phones]
    with Progress(transient=True) as bar:
        job = bar.add_task("closed-loop episodes", total=len(phones))
        while active := [i for i, p in enumerate(phones) if not p.done]:
            for start in range(0, len(active), batch_size):
                chunk = active[start : start + batch_size]
                chats = [prompt_messages(phones[i], histories[i], fmt) for i in chunk]
                for i, text in zip(chunk, answer(chats), strict=True):
                    thinking, action = split_response(text)
                    histories[i].append({**phones[i].observe(), "thinking": thinking, "action": action, "bbox": None})
                    phones[i].act(text)
                    if phones[i].done:
                        bar.advance(job)
    n = max(len(phones), 1)
    return {
        "episode_success": sum(p.success for p in phones) / n,
        "progress": sum(p.progress for p in phones) / n,
        "actions_per_episode": sum(p.actions for p in phones) / n,
        "episodes": float(len(phones)),
    }
