"""Tests for the synthetic phone-episode generator."""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from autoglm_distill.actions import POINT_ACTIONS, action_type, try_parse
from autoglm_distill.data import SPLITS, SYSTEM_PROMPT, synth
from autoglm_distill.data.episodes import EpisodeFormat, check_episode, step_chats

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"n_train": 40, "n_val": 8, "n_test": 8}
ALL_TYPES = {
    "Tap",
    "Long Press",
    "Double Tap",
    "Type",
    "Swipe",
    "Launch",
    "Back",
    "Home",
    "Wait",
    "Take_over",
    "finish",
}


def read_split(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def parse(action: str) -> dict:
    parsed = try_parse(f"<answer>{action}</answer>")
    assert parsed is not None, action
    return parsed


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "data", seed=0, image_size=(90, 180), **SMALL)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough text-only episodes to see every flow and action type."""
    return synth.generate(tmp_path_factory.mktemp("synth") / "big", 400, 60, 60, seed=0, images=False)


def test_same_seed_identical_bytes_and_other_seed_differs(tmp_path: Path, dataset: Path) -> None:
    again = synth.generate(tmp_path / "again", seed=0, image_size=(90, 180), **SMALL)
    assert file_bytes(again) == file_bytes(dataset)
    other = synth.generate(tmp_path / "other", seed=1, images=False, **SMALL)
    assert (other / "train.jsonl").read_bytes() != (dataset / "train.jsonl").read_bytes()


def test_layout_and_meta(dataset: Path) -> None:
    names = ["images", "synth_meta.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    assert sorted(p.name for p in dataset.iterdir()) == names
    meta = json.loads((dataset / "synth_meta.json").read_text())
    expected = {"format_version": synth.FORMAT_VERSION, **SMALL, "seed": 0, "images": True, "image_size": [90, 180]}
    assert meta == {**expected, "kind": "phone"}
    assert not list(dataset.parent.glob(".*tmp*"))  # the temporary folder was renamed, not left behind


def test_episodes_validate_and_each_step_has_its_screenshot(dataset: Path) -> None:
    for split, n in zip(SPLITS, SMALL.values(), strict=True):
        records = read_split(dataset, split)
        assert [r["id"] for r in records] == [f"{split}-{i:05d}" for i in range(n)]
        for r in records:
            check_episode(r, dataset)  # the reader's own validation
            assert r["source"] == "synth" and r["flow"] in synth.FLOWS and 3 <= len(r["steps"]) <= 10
            for t, step in enumerate(r["steps"]):
                assert step["screenshot"] == f"images/{r['id']}/{t}.png"
                with Image.open(dataset / step["screenshot"]) as img:
                    assert img.size == (90, 180)
            assert sorted(p.name for p in (dataset / "images" / r["id"]).iterdir()) == [
                f"{t}.png" for t in sorted(range(len(r["steps"])), key=str)
            ]


def test_steps_are_consistent_on_the_0_999_grid(big: Path) -> None:
    for split in SPLITS:
        for r in read_split(big, split):
            assert "screenshot" not in r["steps"][0]  # images=False
            assert parse(r["steps"][-1]["action"])["_metadata"] == "finish"  # every episode ends with finish
            for step in r["steps"]:
                boxes = [e["bbox"] for e in step["elements"]]
                assert all(0 <= x1 < x2 <= 999 and 0 <= y1 < y2 <= 999 for x1, y1, x2, y2 in boxes)
                action = parse(step["action"])
                kind = action_type(action)
                assert ("target" in step) == (kind in POINT_ACTIONS)
                if kind in POINT_ACTIONS:  # the point is the centre of the target, which is on screen
                    box = step["target"]["bbox"]
                    assert box in boxes
                    assert action["element"] == [(box[0] + box[2]) // 2, (box[1] + box[3]) // 2]
                if kind == "Type":
                    assert action["text"] in r["task"]
                    assert any(e["text"].endswith("(focused)") for e in step["elements"])
                if kind == "Launch":
                    assert action["app"] in synth.TASK_APPS and step["current_app"] != action["app"]
                if kind == "Wait":
                    assert synth.LOADING in [e["text"] for e in step["elements"]]


def test_every_action_type_and_flow_appears(big: Path) -> None:
    episodes = read_split(big, "train")
    counts = Counter(action_type(parse(s["action"])) for r in episodes for s in r["steps"])
    assert set(counts) == ALL_TYPES
    assert 0.35 <= counts["Tap"] / sum(counts.values()) <= 0.6
    assert {r["flow"] for r in episodes} == set(synth.FLOWS)


def test_the_screen_and_task_decide_the_action(big: Path) -> None:
    """What a text-only student sees (task, first step or not, the element list) never maps to two answers."""
    seen: dict[str, list[str]] = {}
    for split in SPLITS:
        for r in read_split(big, split):
            for t, step in enumerate(r["steps"]):
                view = json.dumps([r["task"], t == 0, step["current_app"], step["elements"]])
                answer = [step["thinking"], step["action"]]
                assert seen.setdefault(view, answer) == answer, view


def test_val_and_test_hold_out_tasks_and_start_apps(big: Path) -> None:
    held = {v for values in synth.ENTITIES.values() for v in synth.held_out(values)}
    held_apps = set(synth.held_out(tuple(synth.OTHER_APPS)))

    def asks_held(task: str) -> bool:
        return any(re.search(rf"\b{re.escape(v)}\b", task) for v in held)

    def start_app(r: dict) -> str:
        return r["steps"][0]["current_app"]

    train = read_split(big, "train")
    assert not any(asks_held(r["task"]) for r in train)
    assert not {start_app(r) for r in train} & held_apps
    for split in ("val", "test"):
        records = read_split(big, split)
        assert all(asks_held(r["task"]) for r in records)
        assert {start_app(r) for r in records} & held_apps
    keys = {s: {(r["task"], json.dumps(r["steps"][0])) for r in read_split(big, s)} for s in SPLITS}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]


def test_step_prompts_list_the_element_a_tap_needs(big: Path) -> None:
    episode = next(r for r in read_split(big, "train") if len(r["steps"]) >= 4)
    chats = step_chats(check_episode(episode, big), EpisodeFormat(SYSTEM_PROMPT, elements_in_text=True))
    for chat, step in zip(chats, episode["steps"], strict=True):
        texts = [m["content"][0]["text"] for m in chat["messages"] if m["role"] == "user"]
        assert [t.count("** Elements **") for t in texts] == [0] * (len(texts) - 1) + [1]  # not in earlier turns
        text = texts[-1]
        action = parse(step["action"])
        if action_type(action) in POINT_ACTIONS:
            x, y = action["element"]
            assert f"@ [{x},{y}]" in text


def test_sample_chats_are_seeded_text_chats() -> None:
    chats = synth.sample_chats(12, seed=3)
    assert len(chats) == 12 and chats == synth.sample_chats(12, seed=3)
    assert all(c[0] == {"role": "system", "content": SYSTEM_PROMPT} and c[-1]["role"] == "assistant" for c in chats)
    assert all(len(c) == 3 and [item["type"] for item in c[1]["content"]] == ["text"] for c in chats)


def test_reuse_and_conflict(tmp_path: Path) -> None:
    out = synth.generate(tmp_path / "d", images=False, **SMALL)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert synth.generate(tmp_path / "d", images=False, **SMALL) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(FileExistsError, match="different parameters") as err:
        synth.generate(tmp_path / "d", images=False, seed=7, **SMALL)
    assert "'seed': 0" in str(err.value) and "'seed': 7" in str(err.value) and "another output folder" in str(err.value)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="no synth_meta.json"):
        synth.generate(tmp_path / "junk", images=False, **SMALL)
    (tmp_path / "empty").mkdir()  # an empty folder is simply filled
    assert (synth.generate(tmp_path / "empty", images=False, **SMALL) / "train.jsonl").exists()


def test_a_folder_of_the_old_one_step_format_is_not_reused(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    meta = {"format_version": 1, **SMALL, "seed": 0, "images": False, "image_size": [112, 224]}
    (old / "synth_meta.json").write_text(json.dumps(meta))
    with pytest.raises(FileExistsError, match=rf"'format_version': 1.*\n.*'format_version': {synth.FORMAT_VERSION}"):
        synth.generate(old, images=False, **SMALL)


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "render", boom)
    with pytest.raises(KeyboardInterrupt):
        synth.generate(tmp_path / "d", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["--out", str(out), "--n-train", "20", "--n-val", "5", "--n-test", "5", "--seed", "3"]
    cmd = [sys.executable, "-m", "autoglm_distill.data.synth", *args, "--no-images", "--image-size", "64x128"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "synth_meta.json").read_text())
    assert meta["images"] is False and meta["image_size"] == [64, 128] and meta["seed"] == 3
    assert len(read_split(out, "val")) == 5
    # Different parameters on an existing folder: clean error, non-zero exit.
    cmd = [sys.executable, "-m", "autoglm_distill.data.synth", *args[:-1], "4", "--no-images"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "different parameters" in proc.stderr
