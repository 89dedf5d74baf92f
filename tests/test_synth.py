"""Tests for the synthetic phone-task generator."""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from autoglm_distill.actions import action_type, try_parse
from autoglm_distill.data import SPLITS, SYSTEM_PROMPT, synth

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"n_train": 50, "n_val": 10, "n_test": 10}
ELEMENT_LINE = re.compile(r"^\[(\d+)\] (.+?)( \(focused\))? @ \[(\d+),(\d+)\]$")
ALL_TYPES = {"Tap", "Long Press", "Type", "Swipe", "Launch", "Back", "Home", "Wait", "finish"}


def read_split(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def user_text(record: dict) -> str:
    content = record["messages"][1]["content"]
    return content if isinstance(content, str) else content[1]["text"]


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "data", seed=0, image_size=(90, 180), **SMALL)


def test_same_seed_identical_bytes_and_other_seed_differs(tmp_path: Path, dataset: Path) -> None:
    again = synth.generate(tmp_path / "again", seed=0, image_size=(90, 180), **SMALL)
    assert file_bytes(again) == file_bytes(dataset)
    other = synth.generate(tmp_path / "other", seed=1, images=False, **SMALL)
    assert (other / "train.jsonl").read_bytes() != (dataset / "train.jsonl").read_bytes()


def test_layout_and_meta(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == [
        "images",
        "synth_meta.json",
        "test.jsonl",
        "train.jsonl",
        "val.jsonl",
    ]
    meta = json.loads((dataset / "synth_meta.json").read_text())
    assert meta == {
        "format_version": synth.FORMAT_VERSION,
        **SMALL,
        "seed": 0,
        "images": True,
        "image_size": [90, 180],
    }
    assert not list(dataset.parent.glob(".*tmp*"))  # the temporary folder was renamed, not left behind


def test_schema_and_images(dataset: Path) -> None:
    for split, n in zip(SPLITS, SMALL.values(), strict=True):
        records = read_split(dataset, split)
        assert [r["id"] for r in records] == [f"{split}-{i:05d}" for i in range(n)]
        for r in records:
            assert set(r) == {"id", "messages", "target"}
            system, user, assistant = r["messages"]
            assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
            assert system["content"] == SYSTEM_PROMPT
            image_item, text_item = user["content"]
            assert image_item == {"type": "image", "image": f"images/{r['id']}.png"}
            assert text_item["type"] == "text" and text_item["text"].startswith("Task: ")
            with Image.open(dataset / image_item["image"]) as img:
                assert img.size == (90, 180)
            assert re.fullmatch(r"<think>[^<>]+</think><answer>[^\n]+</answer>", assistant["content"])
            bbox = r["target"]["bbox"]
            assert bbox is None or (len(bbox) == 4 and all(isinstance(v, int) for v in bbox))
            total = sum(len(c) for c in (system["content"], text_item["text"], assistant["content"]))
            assert 300 <= total <= 800


def test_text_only_user_content_is_a_string(tmp_path: Path) -> None:
    out = synth.generate(tmp_path / "text", images=False, **SMALL)
    assert not (out / "images").exists()
    for r in read_split(out, "train"):
        assert isinstance(r["messages"][1]["content"], str)
        assert r["messages"][1]["content"].startswith("Task: ")


def test_answers_parse_and_taps_hit_listed_elements(dataset: Path) -> None:
    for split in SPLITS:
        for r in read_split(dataset, split):
            action = try_parse(r["messages"][2]["content"])
            assert action is not None, r["messages"][2]["content"]
            kind, bbox = action_type(action), r["target"]["bbox"]
            assert kind in ALL_TYPES
            assert (bbox is not None) == (kind in ("Tap", "Long Press"))
            lines = user_text(r).split("\n")
            elements = [ELEMENT_LINE.match(line) for line in lines[3:]]
            assert all(elements) and 4 <= len(elements) <= 8
            centres = [[int(m[4]), int(m[5])] for m in elements]
            assert all(v % 10 == 0 for c in centres for v in c)
            if bbox is not None:
                x, y = action["element"]
                assert bbox[0] <= x <= bbox[2] and bbox[1] <= y <= bbox[3]
                assert [x, y] == [(bbox[0] + bbox[2]) // 2, (bbox[1] + bbox[3]) // 2]
                assert [x, y] in centres
            if kind == "Type":
                assert any(m[3] for m in elements)  # a focused field is on screen
                assert action["text"] in lines[0]


def test_no_prompt_overlap_between_splits(dataset: Path) -> None:
    prompts = {s: {user_text(r) for r in read_split(dataset, s)} for s in SPLITS}
    assert len(prompts["train"]) == SMALL["n_train"]
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]


def test_reuse_and_conflict(tmp_path: Path) -> None:
    out = synth.generate(tmp_path / "d", images=False, **SMALL)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert synth.generate(tmp_path / "d", images=False, **SMALL) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(FileExistsError, match="different parameters") as err:
        synth.generate(tmp_path / "d", images=False, seed=7, **SMALL)
    assert "'seed': 0" in str(err.value) and "'seed': 7" in str(err.value) and "--out" in str(err.value)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="no synth_meta.json"):
        synth.generate(tmp_path / "junk", images=False, **SMALL)
    (tmp_path / "empty").mkdir()  # an empty folder is simply filled
    assert (synth.generate(tmp_path / "empty", images=False, **SMALL) / "train.jsonl").exists()


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


def test_action_mix_covers_every_type(tmp_path: Path) -> None:
    out = synth.generate(tmp_path / "mix", n_train=500, n_val=0, n_test=0, images=False)
    counts = Counter(action_type(try_parse(r["messages"][2]["content"])) for r in read_split(out, "train"))
    assert set(counts) == ALL_TYPES
    assert 0.35 <= counts["Tap"] / 500 <= 0.55
