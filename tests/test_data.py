"""Phone-episode loading: labels on the answer only, and every bad input named with file:line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from autoglm_distill.data.phone import ChatEncoder, DataError, PhoneDataModule, load_split, read_split


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_line(path: Path, lineno: int, new: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = new
    path.write_text("\n".join(lines) + "\n")


def first_record(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[0])


def first_chat(data_dir: Path) -> dict:
    """The last step of the first episode: the longest context (all earlier turns and the screenshot)."""
    return read_split(data_dir / "train.jsonl", data_dir)[0][len(first_record(data_dir / "train.jsonl")["steps"]) - 1]


def test_labels_cover_exactly_the_answer_and_eos(data_dir, tokenizer):
    encoder = ChatEncoder(tokenizer, None, max_length=1024)
    record = first_chat(data_dir)
    enc = encoder.encode(record["messages"], data_dir)
    answer = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert enc["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == record["messages"][-1]["content"]
    prompt = tokenizer.decode(enc["input_ids"][: len(enc["input_ids"]) - len(answer)])
    assert prompt.startswith("[gMASK]<sop><|system|>\n") and prompt.endswith("<|assistant|>\n")
    assert "<|image|>" not in prompt  # text-only encoder drops screenshots


def test_image_tokens_match_the_screenshot_grid(data_dir, tokenizer, image_processor):
    encoder = ChatEncoder(tokenizer, image_processor, max_length=1024)
    record = first_chat(data_dir)
    enc = encoder.encode(record["messages"], data_dir)
    pixels = encoder.pixels(enc["images"], data_dir)
    n_tokens = enc["input_ids"].count(encoder.image_token_id)
    assert n_tokens == int(pixels["image_grid_thw"].prod()) // 4
    assert n_tokens == (56 // 28) * (112 // 28)


def test_collated_batch_pads_right_and_masks_padding(data_dir, tokenizer, image_processor):
    encoder = ChatEncoder(tokenizer, image_processor, max_length=1024)
    dm = PhoneDataModule(data_dir, encoder, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["image_grid_thw"].shape == (4, 3)
    assert batch["mm_token_type_ids"].sum() == (batch["input_ids"] == encoder.image_token_id).sum()


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('{"messages": []}', "needs a 'messages' list"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}',
            "needs a role",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}', "assistant"),
        (
            '{"messages": [{"role": "user", "content": [{"type": "image", "image": "images/nope.png"}]},'
            ' {"role": "assistant", "content": "x"}]}',
            "does not exist",
        ),
        (
            '{"messages": [{"role": "user", "content": [{"type": "image", "image": "../../etc/passwd"}]},'
            ' {"role": "assistant", "content": "x"}]}',
            "outside the data folder",
        ),
    ],
)
def test_bad_line_fails_with_file_line_and_reason(data_dir, tokenizer, tmp_path, bad_line, reason):
    root = copy_data(data_dir, tmp_path / "d")
    rewrite_line(root / "train.jsonl", 3, bad_line)
    encoder = ChatEncoder(tokenizer, None, max_length=1024)
    with pytest.raises(DataError) as err:
        load_split(root, "train", encoder, on_bad_example="fail")
    message = str(err.value)
    assert "train.jsonl:3: " in message and reason in message
    assert "data.on_bad_example=skip" in message


def test_skip_mode_skips_and_counts_every_bad_line(data_dir, tokenizer, tmp_path):
    root = copy_data(data_dir, tmp_path / "d")
    rewrite_line(root / "train.jsonl", 2, "{broken")
    rewrite_line(root / "train.jsonl", 5, '{"messages": "nope"}')
    encoder = ChatEncoder(tokenizer, None, max_length=1024)
    ds, bad = load_split(root, "train", encoder, on_bad_example="skip")
    episodes = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    assert len(ds) == sum(len(e["steps"]) for i, e in enumerate(episodes, start=1) if i not in (2, 5))
    assert sorted(b.source.rsplit(":", 1)[1] for b in bad) == ["2", "5"]


def test_answer_cut_by_max_length_is_never_truncated(data_dir, tokenizer):
    full, _ = load_split(data_dir, "train", ChatEncoder(tokenizer, None, max_length=4096))
    lengths = sorted(len(ids) for ids in full["input_ids"])
    limit = lengths[len(lengths) // 2]
    encoder = ChatEncoder(tokenizer, None, max_length=limit)
    with pytest.raises(
        DataError, match=rf"train\.jsonl:\d+ steps\[\d+\]: prompt \(\d+ tokens\) \+ answer .*max_length={limit}"
    ):
        load_split(data_dir, "train", encoder, on_bad_example="fail")
    kept, bad = load_split(data_dir, "train", encoder, on_bad_example="skip")
    assert len(bad) == sum(n > limit for n in lengths) > 0
    assert len(kept) + len(bad) == len(full)
    by_id = dict(zip(full["id"], full["labels"]))
    assert all(by_id[i] == labels for i, labels in zip(kept["id"], kept["labels"]))  # nothing cut


def test_missing_folder_and_missing_split_name_the_fix(data_dir, tokenizer, tmp_path):
    encoder = ChatEncoder(tokenizer, None, max_length=1024)
    with pytest.raises(DataError, match="data.path=.*is not a folder.*autoglm_distill.data.synth"):
        PhoneDataModule(tmp_path / "nowhere", encoder)
    root = copy_data(data_dir, tmp_path / "d")
    (root / "val.jsonl").unlink()
    with pytest.raises(DataError, match=r"val\.jsonl does not exist"):
        PhoneDataModule(root, encoder).setup()
