"""Episode lines: one training chat per step with exactly Open-AutoGLM's context, labels on that step only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from autoglm_distill.data import SYSTEM_PROMPT
from autoglm_distill.data.episodes import EpisodeFormat, read_system_prompt
from autoglm_distill.data.phone import ChatEncoder, DataError, load_split, read_split
from autoglm_distill.evaluate import score_answers
from autoglm_distill.validate import ConfigError, validate

from .conftest import IMAGE_SIZE, compose_config

TAP = 'do(action="Tap", element=[500,150])'
TYPE = 'do(action="Type", text="coffee")'
DONE = 'finish(message="Done")'
EPISODE = {
    "id": "ep-1",
    "task": "Search for coffee in Maps",
    "steps": [
        {"screenshot": "images/0.png", "current_app": "Maps", "thinking": "Tap the search box.", "action": TAP,
         "target": {"bbox": [400, 100, 600, 200]}},
        {"screenshot": "images/1.png", "current_app": "Maps", "thinking": "Type it.", "action": TYPE},
        {"screenshot": "images/2.png", "current_app": "地图", "thinking": "Results are shown.", "action": DONE},
    ],
}  # fmt: skip
CHAT = {
    "id": "one",
    "messages": [
        {"role": "user", "content": "Task: go home"},
        {"role": "assistant", "content": '<think>x</think><answer>do(action="Home")</answer>'},
    ],
}


def write_folder(root: Path, lines: list, splits=("train", "val", "test")) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.new("RGB", IMAGE_SIZE[::-1], (40 * i, 90, 160)).save(root / "images" / f"{i}.png")
    for split in splits:
        (root / f"{split}.jsonl").write_text(
            "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
        )
    return root


def test_step_three_is_rendered_exactly_as_open_autoglm_sends_it(tmp_path, tokenizer, image_processor):
    root = write_folder(tmp_path / "data", [EPISODE])
    records, bad = read_split(root / "train.jsonl", root)
    assert not bad and [r["id"] for r in records] == ["ep-1/0", "ep-1/1", "ep-1/2"]
    assert {r["episode"] for r in records} == {"ep-1"}
    step3 = records[2]["messages"]
    assert step3 == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "text", "text": 'Search for coffee in Maps\n\n{"current_app": "Maps"}'}]},
        {"role": "assistant", "content": f"<think>Tap the search box.</think><answer>{TAP}</answer>"},
        {"role": "user", "content": [{"type": "text", "text": '** Screen Info **\n\n{"current_app": "Maps"}'}]},
        {"role": "assistant", "content": f"<think>Type it.</think><answer>{TYPE}</answer>"},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "images/2.png"},
                {"type": "text", "text": '** Screen Info **\n\n{"current_app": "地图"}'},
            ],
        },
        {"role": "assistant", "content": f"<think>Results are shown.</think><answer>{DONE}</answer>"},
    ]
    encoder = ChatEncoder(tokenizer, image_processor, max_length=2048)
    encoded = encoder.encode(step3, root)
    text = tokenizer.decode(encoded["input_ids"])
    image_tokens = text.count("<|image|>")
    assert encoded["images"] == ["images/2.png"] and image_tokens > 0  # only the current screenshot
    expected_prompt = (
        f"[gMASK]<sop><|system|>\n{SYSTEM_PROMPT}"
        '<|user|>\nSearch for coffee in Maps\n\n{"current_app": "Maps"}'
        f"<|assistant|>\n<think>Tap the search box.</think><answer>{TAP}</answer>"
        '<|user|>\n** Screen Info **\n\n{"current_app": "Maps"}'
        f"<|assistant|>\n<think>Type it.</think><answer>{TYPE}</answer>"
        "<|user|>\n<|begin_of_image|>" + "<|image|>" * image_tokens + "<|end_of_image|>"
        '** Screen Info **\n\n{"current_app": "地图"}<|assistant|>\n'
    )
    assert text.startswith(expected_prompt)
    labelled = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100]
    assert labelled == encoded["input_ids"][len(encoded["input_ids"]) - len(labelled) :]  # one span, at the end
    assert (
        tokenizer.decode(labelled) == f"<think>Results are shown.</think><answer>{DONE}</answer>{tokenizer.eos_token}"
    )
    assert labelled[-1] == tokenizer.eos_token_id


def test_history_steps_keeps_the_last_turns_and_the_task(tmp_path):
    root = write_folder(tmp_path / "data", [EPISODE])
    records, _ = read_split(root / "train.jsonl", root, EpisodeFormat(history_steps=1))
    step3 = records[2]["messages"]
    assert [m["role"] for m in step3] == ["system", "user", "assistant", "user", "assistant"]
    assert step3[1]["content"][0]["text"] == 'Search for coffee in Maps\n\n{"current_app": "Maps"}'  # step 2 + task
    assert step3[2]["content"].endswith(f"<answer>{TYPE}</answer>")
    records, _ = read_split(root / "train.jsonl", root, EpisodeFormat(history_steps=0))
    assert [m["role"] for m in records[2]["messages"]] == ["system", "user", "assistant"]


def test_elements_channel_and_a_user_system_prompt(tmp_path):
    episode = {**EPISODE, "steps": [{**EPISODE["steps"][0], "elements": [{"text": "Search", "bbox": [1, 2, 3, 4]}]}]}
    root = write_folder(tmp_path / "data", [episode])
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You are a phone agent.\n")
    fmt = EpisodeFormat(read_system_prompt(prompt), elements_in_text=True)
    (record,), _ = read_split(root / "train.jsonl", root, fmt)
    assert record["messages"][0]["content"] == "You are a phone agent."
    assert record["messages"][1]["content"][1]["text"].endswith("** Elements **\n[0] Search @ [2,3]")
    with pytest.raises(FileNotFoundError, match="data.system_prompt_file='/nowhere.txt' does not exist"):
        read_system_prompt("/nowhere.txt")


def test_episodes_and_single_chats_share_a_split(tmp_path, tokenizer):
    root = write_folder(tmp_path / "data", [EPISODE, CHAT])
    dataset, bad = load_split(root, "train", ChatEncoder(tokenizer, None, 2048))
    assert not bad and dataset["id"] == ["ep-1/0", "ep-1/1", "ep-1/2", "one"]
    assert dataset["episode"] == ["ep-1", "ep-1", "ep-1", ""]
    assert dataset["bbox"][0] == [400, 100, 600, 200] and dataset["bbox"][1] is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"task": ""}, "needs a non-empty 'task'"),
        ({"steps": []}, "needs a non-empty 'steps'"),
        ({"steps": [{"action": "tap it"}]}, r"steps\[0\].action 'tap it' is not an Open-AutoGLM action"),
        ({"steps": [{"action": TAP, "screenshot": "images/9.png"}]}, r"steps\[0\].screenshot .* does not exist"),
        ({"steps": [{"action": TAP, "screenshot": "../x.png"}]}, "points outside the data folder"),
        ({"steps": [{"action": TAP, "target": {"bbox": [1, 2]}}]}, r"steps\[0\].target.bbox must be"),
        ({"steps": [{"action": TAP, "elements": [{"text": "a", "bbox": "x"}]}]}, r"steps\[0\].elements\[0\].bbox must"),
    ],
)
def test_a_bad_episode_names_its_line_step_and_field(tmp_path, tokenizer, change, reason):
    root = write_folder(tmp_path / "data", [EPISODE, {**EPISODE, **change}])
    with pytest.raises(DataError, match=rf"train.jsonl:2: .*{reason}"):
        load_split(root, "train", ChatEncoder(tokenizer, None, 2048))
    dataset, bad = load_split(root, "train", ChatEncoder(tokenizer, None, 2048), on_bad_example="skip")
    assert len(dataset) == 3 and len(bad) == 1  # the good episode's steps stay, the bad line is counted


def test_episode_success_is_scored_on_teacher_forced_histories(tmp_path, tokenizer):
    other = {**EPISODE, "id": "ep-2"}
    root = write_folder(tmp_path / "data", [EPISODE, other, CHAT])
    dataset, _ = load_split(root, "test", ChatEncoder(tokenizer, None, 2048))
    answers = [json.loads(m)[-1]["content"] for m in dataset["messages"]]
    answers[4] = '<answer>do(action="Type", text="tea")</answer>'  # ep-2, step 1 wrong
    metrics = score_answers(answers, dataset)
    assert metrics["step_success"] == pytest.approx(6 / 7)
    assert metrics["episode_success"] == pytest.approx(2 / 3)  # ep-1 and the one-chat line; not ep-2


def test_bad_episode_settings_are_config_errors(tmp_path):
    cfg = compose_config(["recipe=smoke", "data.history_steps=-1", "data.system_prompt_file=/nowhere.txt"], tmp_path)
    with pytest.raises(ConfigError, match="data: data.system_prompt_file='/nowhere.txt' does not exist"):
        validate(cfg)
    cfg = compose_config(["recipe=smoke", "data.history_steps=-1"], tmp_path)
    with pytest.raises(ConfigError, match=r"data.history_steps=-1: use null \(all\) or a number >= 0"):
        validate(cfg)
