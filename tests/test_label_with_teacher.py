"""label_with_teacher: the CLI writes the teacher's answers and counts what rejection left out; an interrupted run
resumes without relabelling; prompts without answers and bad settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoglm_distill import label_with_teacher as lwt
from autoglm_distill.data.episodes import EpisodeFormat
from autoglm_distill.data.phone import ChatEncoder, DataError, load_split, read_split

from .conftest import compose_config

TAP = '<think>t</think><answer>do(action="Tap", element=[{x},{y}])</answer>'


def label_args(run_dir: Path, out: Path, *extra: str) -> list[str]:
    """Label the smoke run's data with its own teacher (a tiny GLM-4.1V reading the screenshots)."""
    return [
        "recipe=smoke",
        "teacher=pretrained",
        f"teacher.path={run_dir / 'teacher'}",
        f"data.path={run_dir / 'data'}",
        "data.generate=null",
        f"label.out={out}",
        "label.max_new_tokens=12",
        "label.batch_size=8",
        *extra,
    ]


def test_the_cli_writes_answers_counts_rejections_and_trains_from_the_folder(smoke_run, tokenizer, tmp_path) -> None:
    out = tmp_path / "labelled"
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    args = label_args(smoke_run, out, f"hydra.run.dir={tmp_path / 'run'}")
    proc = subprocess.run([sys.executable, "-m", "autoglm_distill.label_with_teacher", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    meta = json.loads((out / lwt.META_FILE).read_text())
    prompts, _ = read_split(smoke_run / "data" / "train.jsonl", smoke_run / "data", EpisodeFormat(history_steps=2))
    counts = meta["splits"]["train"]
    assert counts["prompts"] == counts["with_reference"] == len(prompts)
    assert sum(counts["verdicts"].values()) == len(prompts)
    kept = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(kept) == counts["kept"] == counts["verdicts"].get("accepted", 0)
    assert len(kept) + len(rejected) == len(prompts)  # nothing lost: every answer is in one of the two
    for line in kept + rejected:  # each verdict is what judging the written answer gives
        prompt = {"reference": line["teacher_label"]["reference"], "bbox": (line.get("target") or {}).get("bbox")}
        assert lwt.judge(line["messages"][-1]["content"], prompt) == line["teacher_label"]["verdict"]
    # the unlabelled splits are the references, the screenshots are there, and a run reads the folder
    for split in ("val", "test"):
        assert (out / f"{split}.jsonl").read_bytes() == (smoke_run / "data" / f"{split}.jsonl").read_bytes()
    assert sorted(p.name for p in (out / "images").rglob("*.png")) == sorted(
        p.name for p in (smoke_run / "data" / "images").rglob("*.png")
    )
    assert not Path(f"{out}.labels").exists()
    if kept:
        rows, bad = load_split(out, "train", ChatEncoder(tokenizer, max_length=1024))
        assert len(rows) == len(kept) and not bad

    again = subprocess.run([sys.executable, "-m", "autoglm_distill.label_with_teacher", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode != 0 and "already exists" in again.stderr and "data.path=" in again.stderr


class Interrupt(Exception):
    pass


def fake_teacher(monkeypatch, calls: list[int], fail_at: int | None = None, answer=None) -> None:
    """The teacher's generate replaced by one that answers ``answer(prompt messages)`` (default: a tap at the centre)
    and records each batch's size; batch ``fail_at`` raises, as a kill would stop the run there."""

    def generate(model, encoder, rows, root, batch_size, max_new_tokens, desc=""):
        if fail_at is not None and len(calls) == fail_at:
            raise Interrupt
        calls.append(len(rows))
        prompts = [json.loads(m)[:-1] for m in rows["messages"]]
        return [answer(p) if answer else TAP.format(x=500, y=500) for p in prompts]

    monkeypatch.setattr(lwt, "generate_answers", generate)


def test_an_interrupted_run_resumes_where_it_stopped(smoke_run, tmp_path, monkeypatch) -> None:
    out = tmp_path / "labelled"
    cfg = compose_config(label_args(smoke_run, out, "label.reject=false"), tmp_path)
    prompts = lwt.read_prompts(smoke_run / "data" / "train.jsonl", smoke_run / "data", cfg)
    calls: list[int] = []
    fake_teacher(monkeypatch, calls, fail_at=2)
    with pytest.raises(Interrupt):
        lwt.label_with_teacher(cfg)
    log_path = Path(f"{out}.labels") / "train.jsonl"
    assert len(log_path.read_text().splitlines()) == 16 and not out.exists()
    with open(log_path, "a") as f:  # killed in the middle of writing a line
        f.write('{"key": "half a li')

    calls.clear()
    fake_teacher(monkeypatch, calls)
    meta = lwt.label_with_teacher(cfg)
    assert sum(calls) == len(prompts) - 16  # the rerun labels only what was missing (the torn line included)
    assert meta["splits"]["train"]["kept"] == len(prompts)
    ids = [json.loads(line)["id"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert ids == [p["key"] for p in prompts]  # in input order, each once


def test_rejection_keeps_only_the_right_actions(smoke_run, tmp_path, monkeypatch) -> None:
    out = tmp_path / "labelled"
    cfg = compose_config(label_args(smoke_run, out), tmp_path)
    prompts = lwt.read_prompts(smoke_run / "data" / "train.jsonl", smoke_run / "data", cfg)
    references = {json.dumps(p["messages"]): p["reference"] for p in prompts}
    # a teacher right on every third prompt, with a wrong action on the others, and unparseable on one
    wrong = TAP.format(x=999, y=999)  # the corner, outside every box (and the wrong type for other actions)
    keys = list(references)

    def answer(messages):
        i = keys.index(json.dumps(messages))
        return references[keys[i]] if i % 3 == 0 else ("<answer>do(" if i == 1 else wrong)

    fake_teacher(monkeypatch, [], answer=answer)
    meta = lwt.label_with_teacher(cfg)
    n_right = len(range(0, len(prompts), 3))
    verdicts = {"accepted": n_right, "wrong_action": len(prompts) - n_right - 1, "unparseable": 1}
    assert meta["splits"]["train"]["verdicts"] == verdicts
    kept = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [line["id"] for line in kept] == [p["key"] for p in prompts[::3]]
    assert all(line["messages"][-1]["content"] == p["reference"] for line, p in zip(kept, prompts[::3], strict=True))
    rejected = (out / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == len(prompts) - n_right


def test_judge() -> None:
    tap = {"reference": TAP.format(x=100, y=100), "bbox": [50, 50, 150, 150]}
    assert lwt.judge(TAP.format(x=120, y=90), tap) == "accepted"
    assert lwt.judge(TAP.format(x=300, y=90), tap) == "wrong_action"
    assert lwt.judge("<think>t</think><answer>do(action=", tap) == "unparseable"
    assert lwt.judge('<answer>do(action="Back")</answer>', {"reference": None, "bbox": None}) == "accepted"


def text_only(content):
    return content if isinstance(content, str) else [c for c in content if c["type"] == "text"]


def test_prompts_without_answers_are_labelled(smoke_run, tmp_path, monkeypatch) -> None:
    data = tmp_path / "prompts"
    data.mkdir()
    fmt = EpisodeFormat(history_steps=1, elements_in_text=True)
    records, _ = read_split(smoke_run / "data" / "train.jsonl", smoke_run / "data", fmt)
    with open(data / "train.jsonl", "w") as f:
        for i, record in enumerate(records[:5]):  # text-only prompts that end with the user's message
            messages = [{**m, "content": text_only(m["content"])} for m in record["messages"][:-1]]
            f.write(json.dumps({"id": f"p{i}", "messages": messages}) + "\n")
    out = tmp_path / "labelled"
    args = label_args(smoke_run, out, f"data.path={data}")
    fake_teacher(monkeypatch, [])
    meta = lwt.label_with_teacher(compose_config(args, tmp_path))
    assert meta["splits"]["train"] == {"prompts": 5, "with_reference": 0, "verdicts": {"accepted": 5}, "kept": 5}
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"p{i}" for i in range(5)]
    assert all(line["messages"][-1] == {"role": "assistant", "content": TAP.format(x=500, y=500)} for line in lines)


def test_mistakes_name_the_fix(smoke_run, tmp_path, monkeypatch) -> None:
    out = tmp_path / "labelled"
    with pytest.raises(lwt.LabelError, match="teacher.path=<its folder>"):
        lwt.label_with_teacher(compose_config(["recipe=smoke", f"label.out={out}"], tmp_path))
    with pytest.raises(lwt.LabelError, match="one or more of"):
        lwt.label_with_teacher(compose_config(label_args(smoke_run, out, "label.splits=[training]"), tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n{"id": "a",\n')
    with pytest.raises(DataError, match=r"train.jsonl:2"):
        lwt.label_with_teacher(compose_config(label_args(smoke_run, out, f"data.path={bad}"), tmp_path))
    # a log from another teacher is not mixed with this one's answers
    calls: list[int] = []
    fake_teacher(monkeypatch, calls, fail_at=1)
    with pytest.raises(Interrupt):
        lwt.label_with_teacher(compose_config(label_args(smoke_run, out), tmp_path))
    other = label_args(smoke_run, out, "label.max_new_tokens=40")
    with pytest.raises(lwt.LabelError, match="other settings.*delete"):
        lwt.label_with_teacher(compose_config(other, tmp_path))
