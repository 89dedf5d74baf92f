"""Converters from AndroidControl, AITW and GUI-Odyssey into episode JSONL: tiny fixtures in each release's form, every
action type, coordinates checked by number, every action parsed back, every bad record reported with file and
position, deterministic splits, and usage errors that name the fix (exit 2, no traceback)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from autoglm_distill.actions import action_type, try_parse
from autoglm_distill.data.convert import convert, hash_split
from autoglm_distill.data.convert.__main__ import main
from autoglm_distill.data.convert.tfrecord_to_jsonl import feature_values
from autoglm_distill.data.episodes import check_episode

ROOT = Path(__file__).resolve().parents[1]


def png(width: int = 6, height: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def read_out(out: Path) -> tuple[dict[str, dict], dict[str, str], dict]:
    """Episodes by id, the split of each, and the report."""
    episodes, splits = {}, {}
    for split in ("train", "val", "test"):
        for line in (out / f"{split}.jsonl").read_text().splitlines():
            episode = json.loads(line)
            episodes[episode["id"]] = episode
            splits[episode["id"]] = split
    return episodes, splits, json.loads((out / "convert_report.json").read_text())


def kinds(episode: dict) -> list[str]:
    """Each step's action type, parsed back by Open-AutoGLM's rules (None when it does not parse)."""
    parsed = [try_parse(f"<answer>{step['action']}</answer>") for step in episode["steps"]]
    return [action_type(p) if p is not None else None for p in parsed]


def parsed(step: dict) -> dict:
    return try_parse(f"<answer>{step['action']}</answer>")


def bad(report: dict, reason: str) -> list[dict]:
    return [entry for entry in report["unmappable"]["records"] if entry["reason"] == reason]


# ---------------------------------------------------------------- AndroidControl (per-episode Parquet rows)


def androidcontrol_fixture(tmp_path: Path) -> Path:
    actions_1 = [
        {"action_type": "click", "x": 540, "y": 1200},
        {"action_type": "long_press", "x": 108, "y": 240},
        {"action_type": "scroll", "direction": "down"},
        {"action_type": "input_text", "text": 'say "hi", then go'},
        {"action_type": "open_app", "app_name": "Settings"},
        {"action_type": "navigate_back"},
        {"action_type": "navigate_home"},
        {"action_type": "wait"},
        {"action_type": "type", "x": 10, "y": 10, "text": "query"},  # click + type + Enter: unmappable
        {"action_type": "status", "goal_status": "complete"},
    ]
    actions_2 = [
        {"action_type": "scroll", "direction": "up"},
        {"action_type": "scroll", "direction": "left"},
        {"action_type": "scroll", "direction": "right"},
        {"action_type": "teleport"},
        {"action_type": "status", "goal_status": "infeasible"},
    ]
    rows = [
        {
            "episode_id": 101,
            "goal": "Turn on Wi-Fi",
            "screenshots": [png()] * (len(actions_1) + 1),
            "screenshot_widths": [1080] * (len(actions_1) + 1),
            "screenshot_heights": [2400] * (len(actions_1) + 1),
            "actions": [json.dumps(a) for a in actions_1],
            "step_instructions": ["..."] * len(actions_1),
        },
        {
            "episode_id": 202,
            "goal": "Read the news",
            "screenshots": [png()] * (len(actions_2) + 2),
            "screenshot_widths": [1080] * (len(actions_2) + 2),
            "screenshot_heights": [2400] * (len(actions_2) + 2),
            "actions": [json.dumps(a) for a in actions_2[:3]] + ["{oops"] + [json.dumps(a) for a in actions_2[3:]],
            "step_instructions": ["..."] * (len(actions_2) + 1),
        },
        {
            "episode_id": None,
            "goal": "no actions",
            "screenshots": [],
            "screenshot_widths": [],
            "screenshot_heights": [],
            "actions": None,
            "step_instructions": [],
        },  # fmt: skip
    ]
    path = tmp_path / "android_control" / "train-00000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_androidcontrol_every_action_and_every_bad_record(tmp_path):
    src = androidcontrol_fixture(tmp_path)
    splits_file = tmp_path / "splits.json"
    splits_file.write_text(json.dumps({"train": [101], "validation": [], "test": [202]}))
    convert("androidcontrol", src.parent, tmp_path / "out", splits_file=splits_file)
    episodes, splits, report = read_out(tmp_path / "out")

    one, two = episodes["androidcontrol-101"], episodes["androidcontrol-202"]
    assert splits == {"androidcontrol-101": "train", "androidcontrol-202": "test"}
    assert kinds(one) == ["Tap", "Long Press", "Swipe", "Type", "Launch", "Back", "Home", "Wait", "finish"]
    assert one["steps"][0]["action"] == 'do(action="Tap", element=[500,500])'  # (540, 1200) on 1080x2400
    assert one["steps"][1]["action"] == 'do(action="Long Press", element=[100,100])'
    assert parsed(one["steps"][2]) == {"_metadata": "do", "action": "Swipe", "start": [500, 800], "end": [500, 200]}
    assert parsed(one["steps"][3])["text"] == 'say "hi", then go'
    assert parsed(one["steps"][4])["app"] == "Settings"
    assert parsed(one["steps"][7])["duration"] == "1 seconds"
    assert parsed(one["steps"][8]) == {"_metadata": "finish", "message": "complete"}
    assert kinds(two) == ["Swipe", "Swipe", "Swipe", "finish"]
    assert [(parsed(s)["start"], parsed(s)["end"]) for s in two["steps"][:3]] == [
        ([500, 200], [500, 800]),  # scroll up: the finger swipes down
        ([200, 500], [800, 500]),  # scroll left: the finger swipes right
        ([800, 500], [200, 500]),  # scroll right: the finger swipes left
    ]
    assert one["steps"][0]["screenshot"] == "images/101/0.png" and two["steps"][3]["screenshot"] == "images/202/5.png"
    assert all(step["current_app"] == "Unknown" for step in one["steps"])
    for episode in episodes.values():
        check_episode(episode, tmp_path / "out")  # the reader takes it as it is

    where = str(src)
    assert [(e["file"], e["position"], e["step"]) for e in bad(report, "type_with_click_and_enter")] == [
        (where, "record 0", 8)
    ]
    assert not (tmp_path / "out" / "images/101/8.png").exists()  # no screenshot left behind for a dropped step
    assert [(e["file"], e["position"], e["episode"], e["step"]) for e in bad(report, "unknown_action")] == [
        (where, "record 1", "202", 4)
    ]
    assert [(e["position"], e["step"]) for e in bad(report, "malformed_action")] == [("record 1", 3)]
    assert [(e["file"], e["position"]) for e in bad(report, "malformed_record")] == [(where, "record 2")]
    assert report["episodes"] == 2 and report["steps"] == 9 + 4 and report["steps_dropped"] == 3
    assert report["status_actions"] == {"complete": 1, "infeasible": 1}
    assert report["current_app_unknown"] == 13 and report["missing_screenshots"]["count"] == 0
    assert report["splits"] == {"train": 1, "val": 0, "test": 1}


def test_androidcontrol_from_a_tfrecord_export(tmp_path):
    """The form tfrecord_to_jsonl.py writes: every feature a list, screenshots base64; here without the width and
    height lists, so the click is placed by the screenshot's own size (6 x 12)."""
    screenshots = feature_values("bytes_list", [png(), png()], binary=True)
    row = {
        "episode_id": [7],
        "goal": ["Open Maps"],
        "screenshots": screenshots,
        "actions": [json.dumps({"action_type": "click", "x": 6, "y": 0})],
        "step_instructions": ["Tap the corner"],
        "accessibility_trees": feature_values("bytes_list", [b"\x08"], binary=True),
    }
    (tmp_path / "android_control.jsonl").write_text(json.dumps(row) + "\n")
    convert("androidcontrol", tmp_path / "android_control.jsonl", tmp_path / "out")
    episodes, _, report = read_out(tmp_path / "out")
    step = episodes["androidcontrol-7"]["steps"][0]
    assert step["action"] == 'do(action="Tap", element=[999,0])'  # the right edge clipped to 999
    assert step["screenshot"] == "images/7/0.png" and (tmp_path / "out" / step["screenshot"]).is_file()
    assert report["episodes_without_status"] == 1 and report["unmappable"]["count"] == 0


def test_episode_the_splits_file_does_not_list_is_dropped_and_counted(tmp_path):
    src = androidcontrol_fixture(tmp_path)
    splits_file = tmp_path / "splits.json"
    splits_file.write_text(json.dumps({"train": [101], "validation": [], "test": [], "extra": [202]}))
    convert("androidcontrol", src, tmp_path / "out", splits_file=splits_file)
    episodes, _, report = read_out(tmp_path / "out")
    assert list(episodes) == ["androidcontrol-101"] and report["splits_file_keys_ignored"] == ["extra"]
    assert [(e["position"], e["episode"]) for e in bad(report, "not_in_splits_file")] == [("record 1", "202")]
    assert report["status_actions"] == {"complete": 1} and not (tmp_path / "out" / "images" / "202").exists()


# ---------------------------------------------------------------- AITW (per-step rows: a TFRecord export + Parquet)


def aitw_tfrecord_export_row(step_id: int, action: int, touch=(-1.0, -1.0), lift=(-1.0, -1.0), text: str = "") -> dict:
    """A step as tfrecord_to_jsonl.py writes it: the release's feature names, every value a list."""
    width, height = 8, 4
    raw = bytes([200, 30, 30]) * (width * height)  # AITW's image/encoded: raw uint8 pixels
    return {
        "episode_id": ["e1"],
        "step_id": [step_id],
        "goal_info": ["Turn on Wi-Fi"],
        "current_activity": ["com.android.settings/.Settings"],
        "image/width": [width],
        "image/height": [height],
        "image/channels": [3],
        "image/encoded": feature_values("bytes_list", [raw], binary=True),
        "image/ui_annotations_positions": [0.45, 0.2, 0.1, 0.1, 0.0, 0.0, 1.0, 1.0],  # (y, x, h, w) each
        "image/ui_annotations_text": ["Wi-Fi", ""],
        "image/ui_annotations_ui_types": ["TEXT", "ICON"],
        "results/action_type": [action],
        "results/yx_touch": list(touch),
        "results/yx_lift": list(lift),
        "results/type_action": [text],
    }


def aitw_fixture(tmp_path: Path) -> Path:
    folder = tmp_path / "aitw"
    folder.mkdir()
    rows = [
        aitw_tfrecord_export_row(1, 4, touch=(0.8, 0.5), lift=(0.2, 0.5)),  # a swipe (out of order on purpose)
        aitw_tfrecord_export_row(0, 4, touch=(0.5, 0.25), lift=(0.51, 0.25)),  # a tap: within 0.04
        aitw_tfrecord_export_row(2, 3, text="hello"),
        aitw_tfrecord_export_row(3, 7),  # PRESS_ENTER
        aitw_tfrecord_export_row(4, 5),
        aitw_tfrecord_export_row(5, 10),
    ]
    with open(folder / "general-00000.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.write("{not json\n")

    def parquet_row(step_id, kind, image):  # the Hugging Face mirrors' spelling: ep_id, image dicts, underscores
        return {"ep_id": "e2", "step_id": step_id, "goal_info": "Go home", "image": image, "image_width": 6,
                "image_height": 12, "results_action_type": kind, "results_yx_touch": [-1.0, -1.0],
                "results_yx_lift": [-1.0, -1.0], "results_type_action": ""}  # fmt: skip

    image = {"bytes": png(), "path": None}
    parquet_rows = [parquet_row(0, 6, image), parquet_row(1, 99, image), parquet_row(2, 11, image)]
    parquet_rows.append(parquet_row(None, 6, None))  # malformed: no step_id
    pq.write_table(pa.Table.from_pylist(parquet_rows), folder / "general-00001.parquet")
    return folder


def test_aitw_every_action_type_and_every_bad_record(tmp_path):
    src = aitw_fixture(tmp_path)
    convert("aitw", src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    episodes, splits, report = read_out(tmp_path / "out")

    one, two = episodes["aitw-e1"], episodes["aitw-e2"]
    assert set(splits.values()) == {"train"}
    assert kinds(one) == ["Tap", "Swipe", "Type", "Back", "finish"]  # the Enter step is dropped
    tap = one["steps"][0]
    assert tap["action"] == 'do(action="Tap", element=[250,500])'  # (y, x) = (0.5, 0.25)
    assert tap["target"] == {"bbox": [200, 450, 300, 550]}  # the smallest annotation holding the touch point
    assert tap["elements"] == [{"text": "Wi-Fi", "bbox": [200, 450, 300, 550]}]
    assert tap["current_app"] == "com.android.settings"
    assert parsed(one["steps"][1]) == {"_metadata": "do", "action": "Swipe", "start": [500, 800], "end": [500, 200]}
    assert parsed(one["steps"][2])["text"] == "hello"
    assert parsed(one["steps"][4])["message"] == "complete"
    assert [s["screenshot"] for s in one["steps"]] == [f"images/e1/{i}.png" for i in (0, 1, 2, 4, 5)]
    with Image.open(tmp_path / "out" / tap["screenshot"]) as image:  # raw pixels (base64) became a PNG
        assert image.size == (8, 4) and image.getpixel((0, 0)) == (200, 30, 30)
    assert kinds(two) == ["Home", "finish"] and parsed(two["steps"][1])["message"] == "impossible"
    assert two["steps"][0]["current_app"] == "Unknown"
    for episode in episodes.values():
        check_episode(episode, tmp_path / "out")

    jsonl, parquet = str(src / "general-00000.jsonl"), str(src / "general-00001.parquet")
    assert [(e["file"], e["position"], e["episode"], e["step"]) for e in bad(report, "enter")] == [
        (jsonl, "line 4", "e1", 3)
    ]
    assert [(e["file"], e["position"], e["step"]) for e in bad(report, "unknown_action")] == [(parquet, "record 1", 1)]
    assert sorted((e["file"], e["position"]) for e in bad(report, "malformed_record")) == [
        (jsonl, "line 7"),
        (parquet, "record 3"),
    ]
    assert report["episodes_with_dropped_steps"] == 2 and report["status_actions"] == {"complete": 1, "impossible": 1}


def test_aitw_drop_episode_policy_drops_and_counts_the_whole_episode(tmp_path):
    convert("aitw", aitw_fixture(tmp_path), tmp_path / "out", on_unmappable="drop-episode")
    episodes, _, report = read_out(tmp_path / "out")
    assert list(episodes) == []  # both episodes hold an unmappable step
    assert sorted(e["episode"] for e in bad(report, "episode_dropped")) == ["e1", "e2"]
    assert report["steps_dropped"] == 6 + 3 and not (tmp_path / "out" / "images" / "e1").exists()


# ---------------------------------------------------------------- GUI-Odyssey (one JSON per episode, screenshots apart)


def gui_odyssey_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "GUI-Odyssey"
    (root / "annotations").mkdir(parents=True)
    (root / "screenshots").mkdir()
    (root / "splits").mkdir()
    steps_1 = [
        ("CLICK", [[500, 1000]], {"sam2_bbox": [400, 900, 600, 1000]}),
        ("LONG_PRESS", [[250, 250]], {}),
        ("SCROLL", [[500, 800], [500, 200]], {}),
        ("TEXT", "pizza near me", {}),
        ("CLICK", "KEY_BACK", {}),
        ("CLICK", "KEY_HOME", {}),
        ("COMPLETE", "", {}),
    ]
    steps_2 = [("CLICK", "KEY_APPSELECT", {}), ("SCROLL", "x", {}), ("DRAG", "", {}), ("INCOMPLETE", "", {})]
    for episode_id, steps in (("ep1", steps_1), ("ep2", steps_2)):
        annotation = {
            "episode_id": episode_id,
            "device_info": {"w": 1080, "h": 2400},
            "task_info": {"instruction": f"Task of {episode_id}", "app": ["Chrome"]},
            "step_length": len(steps),
            "steps": [
                {"step": t, "screenshot": f"{episode_id}_{t}.png", "action": a, "info": info, "ps": "", **extra}
                for t, (a, info, extra) in enumerate(steps)
            ],
        }
        (root / "annotations" / f"{episode_id}.json").write_text(json.dumps(annotation))
    for t in range(len(steps_1)):  # ep2's screenshots are missing on purpose
        (root / "screenshots" / f"ep1_{t}.png").write_bytes(png())
    (root / "annotations" / "broken.json").write_text('{"episode_id": "ep3", "steps": [')
    (root / "splits" / "random_split.json").write_text(json.dumps({"train": ["ep1.json"], "test": ["ep2.json"]}))
    return root


def test_gui_odyssey_every_action_and_every_bad_record(tmp_path):
    root = gui_odyssey_fixture(tmp_path)
    out = tmp_path / "out"
    convert("gui_odyssey", root / "annotations", out, images_dir=root / "screenshots",
            splits_file=root / "splits" / "random_split.json", val_fraction=0.0)  # fmt: skip
    episodes, splits, report = read_out(out)

    one, two = episodes["gui_odyssey-ep1"], episodes["gui_odyssey-ep2"]
    assert splits == {"gui_odyssey-ep1": "train", "gui_odyssey-ep2": "test"}
    assert kinds(one) == ["Tap", "Long Press", "Swipe", "Type", "Back", "Home", "finish"]
    assert one["steps"][0]["action"] == 'do(action="Tap", element=[500,999])'  # 1000 clipped to 999
    assert one["steps"][0]["target"] == {"bbox": [400, 900, 600, 999]}
    assert one["steps"][1]["action"] == 'do(action="Long Press", element=[250,250])'
    assert parsed(one["steps"][2]) == {"_metadata": "do", "action": "Swipe", "start": [500, 800], "end": [500, 200]}
    assert parsed(one["steps"][3])["text"] == "pizza near me" and parsed(one["steps"][6])["message"] == "complete"
    assert one["steps"][0]["screenshot"] == "images/ep1/0.png" and (out / "images/ep1/6.png").is_file()
    check_episode(one, out)
    assert kinds(two) == ["finish"] and parsed(two["steps"][0])["message"] == "impossible"
    assert two["steps"][0]["screenshot"] == "ep2_3.png"  # named, not found: kept and counted

    annotations = root / "annotations"
    assert [(e["file"], e["step"]) for e in bad(report, "recent_apps")] == [(str(annotations / "ep2.json"), 0)]
    assert [(e["file"], e["step"]) for e in bad(report, "malformed_action")] == [(str(annotations / "ep2.json"), 1)]
    assert [e["step"] for e in bad(report, "unknown_action")] == [2]
    assert [(e["file"], e["position"]) for e in bad(report, "malformed_record")] == [
        (str(annotations / "broken.json"), "whole file")
    ]
    assert report["missing_screenshots"]["count"] == 1 and report["steps"] == 8


def test_gui_odyssey_cli_end_to_end(tmp_path):
    root = gui_odyssey_fixture(tmp_path)
    out = tmp_path / "out"
    # The release's root folder as --src: annotations/ and screenshots/ are found in it.
    cmd = [sys.executable, "-m", "autoglm_distill.data.convert", "gui_odyssey", "--src", str(root), "--out", str(out),
           "--val-fraction", "0.5", "--test-fraction", "0"]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "unmappable: recent_apps" in result.stdout and "convert_report.json" in result.stdout
    episodes, splits, report = read_out(out)
    assert set(episodes) == {"gui_odyssey-ep1", "gui_odyssey-ep2"} and report["split_by"] == "hash"
    assert report["images_dir"] == str(root / "screenshots") and report["missing_screenshots"]["count"] == 1
    expected = {i: hash_split(i, 0.5, 0.0) for i in episodes}
    assert splits == expected


# ---------------------------------------------------------------- splits, errors


def test_hash_split_is_stable_and_close_to_the_fractions(tmp_path):
    # Pinned values: a change of hash (Python's own hash() is salted per process) would move episodes between splits.
    assert [hash_split(f"aitw-{i}", 0.4, 0.4) for i in range(3)] == ["val", "test", "val"]
    assert hash_split("androidcontrol-101", 0.4, 0.4) == "test"
    assert hash_split("androidcontrol-101", 0.05, 0.05) == "train"
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(4000):
        counts[hash_split(f"aitw-{i}", 0.05, 0.05)] += 1
    assert 150 < counts["val"] < 250 and 150 < counts["test"] < 250

    src = androidcontrol_fixture(tmp_path)
    for name in ("a", "b"):
        convert("androidcontrol", src, tmp_path / name, val_fraction=0.4, test_fraction=0.4)
    for split in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t: ["aitw", "--out", str(t / "o")], "--src is required"),
        (lambda t: ["aitw", "--src", str(t / "nope"), "--out", str(t / "o")], "does not exist"),
        (lambda t: ["aitw", "--src", str(t / "general-00000-of-00321.tfrecord"), "--out", str(t / "o")], "tensorflow"),
        (lambda t: ["aitw", "--src", str(t / "gz"), "--out", str(t / "o")], "tfrecord_to_jsonl.py"),
        (lambda t: ["aitw", "--src", str(t / "bad.parquet"), "--out", str(t / "o")], "not a readable Parquet"),
        (lambda t: ["aitw", "--src", str(t / "gz"), "--out", str(t / "o"), "--split-by", "source"], "--splits-file"),
        (
            lambda t: [
                "aitw",
                "--src",
                str(t / "bad.parquet"),
                "--out",
                str(t),
                "--val-fraction",
                "0.7",
                "--test-fraction",
                "0.5",
            ],
            "sum < 1",
        ),  # fmt: skip
    ],
)
def test_usage_errors_exit_2_naming_the_fix(tmp_path, capsys, make_args, message):
    (tmp_path / "general-00000-of-00321.tfrecord").write_bytes(b"\x1f\x8b\x08\x00")
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "android_control-00000-of-00020").write_bytes(b"\x1f\x8b\x08\x00")  # no suffix, GZIP magic
    (tmp_path / "bad.parquet").write_text("not parquet at all")
    assert main(make_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_out_folder_is_never_clobbered_by_accident(tmp_path, capsys):
    src = androidcontrol_fixture(tmp_path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["androidcontrol", "--src", str(src), "--out", str(foreign)]) == 2
    assert "not empty" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"
    assert main(["androidcontrol", "--src", str(src), "--out", str(tmp_path / "out")]) == 0
    assert main(["androidcontrol", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["androidcontrol", "--src", str(src), "--out", str(tmp_path / "out"), "--overwrite"]) == 0


def test_an_interrupted_overwrite_keeps_the_earlier_conversion(tmp_path, monkeypatch):
    src, out = androidcontrol_fixture(tmp_path), tmp_path / "out"
    convert("androidcontrol", src, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    from autoglm_distill.data.convert import androidcontrol

    def interrupted(records, ctx):
        yield from []
        raise KeyboardInterrupt

    monkeypatch.setattr(androidcontrol, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert("androidcontrol", src, out, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_nothing_convertible_exits_1_pointing_at_the_report(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"goal": "no episode id"}\n')
    assert main(["androidcontrol", "--src", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out")]) == 1
    assert "convert_report.json" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "convert_report.json").read_text())
    assert [(e["reason"], e["position"]) for e in report["unmappable"]["records"]] == [("malformed_record", "line 1")]


def test_tfrecord_export_values():
    assert feature_values("int64_list", [3]) == [3] and feature_values("float_list", [0.5]) == [0.5]
    assert feature_values("bytes_list", [b"Turn on Wi-Fi"]) == ["Turn on Wi-Fi"]
    assert feature_values("bytes_list", [b"\x89PNG"]) == [base64.b64encode(b"\x89PNG").decode()]
    assert feature_values("bytes_list", [b"\x00\x00"], binary=True) == ["AAA="]
