"""Where a text teacher fails, per screen: step success by the app on screen, on the training and the test split.

    python benchmarks/teacher_errors.py --teacher outputs/demo/<time>/teacher --data data/synth_phone \
        --history-steps 1 --elements-in-text

Greedy answers, as the run's evaluation generates them, scored with the run's step check. Per split and app on
screen: steps, step success, point steps (Tap, Long Press, Double Tap), points inside the target, and the points
that missed although the thought was the reference thought word for word (the coordinates alone were wrong).
A screen that fails on the *training* split is not learned at all, not a generalisation gap. Prints a table,
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teacher_targets import add_teacher_args, load_teacher, write_result  # noqa: E402  (benchmarks/, the script's folder)

from autoglm_distill.actions import POINT_ACTIONS, action_type, split_response, step_correct, try_parse  # noqa: E402
from autoglm_distill.data.episodes import EpisodeFormat  # noqa: E402
from autoglm_distill.data.phone import ChatEncoder, load_split  # noqa: E402
from autoglm_distill.evaluate import generate_answers  # noqa: E402

APP = re.compile(r'"current_app": "([^"]+)"')


def screen_app(messages: list[dict]) -> str:
    """The app on screen in a step's prompt (its last user message's screen info)."""
    content = messages[-2]["content"]
    text = content if isinstance(content, str) else "".join(c.get("text", "") for c in content)
    found = APP.findall(text)
    return found[-1] if found else "?"


def errors_by_screen(
    model, encoder: ChatEncoder, data: Path, split: str, fmt: EpisodeFormat, limit: int | None
) -> dict:
    rows, _ = load_split(data, split, encoder, fmt=fmt)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    answers = generate_answers(model, encoder, rows, data, desc=f"{split}: generating")
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for answer, messages, bbox in zip(answers, rows["messages"], rows["bbox"]):
        chat = json.loads(messages)
        reference = chat[-1]["content"]
        ref, pred = try_parse(reference), try_parse(answer)
        ok = step_correct(pred, ref, bbox or None)
        row = table[screen_app(chat)]
        row["steps"] += 1
        row["step_success"] += ok
        if ref is not None and action_type(ref) in POINT_ACTIONS:
            row["point_steps"] += 1
            row["points_in_target"] += ok
            row["missed_with_reference_thought"] += not ok and split_response(answer)[0] == split_response(reference)[0]
    return {app: dict(counts) for app, counts in sorted(table.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_args(parser, "benchmarks/results/teacher_errors.json")
    parser.add_argument("--limit", type=int, default=None, help="the first N steps of each split (default: all)")
    args = parser.parse_args()
    model, encoder, fmt = load_teacher(args)
    result = {s: errors_by_screen(model, encoder, args.data, s, fmt, args.limit) for s in args.splits}
    print("| split | screen | steps | step success | point steps | points in target | missed, thought right |")
    print("|---|---|---|---|---|---|---|")
    for split, apps in result.items():
        for app, r in apps.items():
            points = r.get("point_steps", 0)
            print(
                f"| {split} | {app} | {r['steps']} | {r['step_success'] / r['steps']:.3f} | {points} "
                f"| {r.get('points_in_target', 0)} | {r.get('missed_with_reference_thought', 0)} |"
            )
    write_result(args, result)


if __name__ == "__main__":
    main()
