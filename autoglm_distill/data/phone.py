"""Phone-agent data: JSONL chats or episodes -> token ids with labels on the answer -> Lightning batches.

A data folder holds ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` (images beside them). A line is either a
whole multi-step episode (``{"task": ..., "steps": [...]}``, expanded into one chat per step with Open-AutoGLM's
context: see `autoglm_distill.data.episodes`), or one OpenAI-style chat, the format Open-AutoGLM talks in::

    {"id": "...", "messages": [{"role": "system", "content": "..."},
                               {"role": "user", "content": [{"type": "image", "image": "images/a.png"},
                                                            {"type": "text", "text": "..."}]},
                               {"role": "assistant", "content": "<think>…</think><answer>do(…)</answer>"}],
     "target": {"bbox": [x1, y1, x2, y2]}}

Nothing is dropped or cut silently: a malformed line, a missing image, an image path outside the folder
or an answer that ``max_length`` would cut fails the run with ``file:line`` and the reason, or, with
``on_bad_example=skip``, is skipped and counted in ``bad_examples``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from autoglm_distill.data import SPLITS
from autoglm_distill.data.episodes import EpisodeFormat, check_box, check_episode, step_chats

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
ON_BAD_EXAMPLE = ("fail", "skip")  # data.on_bad_example


class DataError(ValueError):
    """Bad data; the message names every offending ``file:line`` and the fix."""


@dataclass(frozen=True)
class BadExample:
    source: str  # file:line, and for an episode's step "file:line steps[t]"
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


def _check_content(content: Any, root: Path) -> str | None:
    """Reason why a message content is malformed, or None when it is fine."""
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f"content must be a string or a list of items, got {type(content).__name__}"
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            continue
        if kind == "image" and isinstance(item.get("image"), str):
            image = (root / item["image"]).resolve()
            if not image.is_relative_to(root.resolve()):
                return f"image path {item['image']!r} points outside the data folder {root}"
            if not image.is_file():
                return f"image {item['image']!r} does not exist in {root}"
            continue
        return (
            f"content item {item!r} is neither {{'type': 'text', 'text': ...}} nor {{'type': 'image', 'image': path}}"
        )
    return None


def parse_line(line: str, root: Path, fmt: EpisodeFormat | None = None, prompts: bool = False) -> list[dict]:
    """Validate one JSONL line; returns its chat records (one per step of an episode) or raises ValueError.
    ``prompts``: a chat may also end with the user's message (a prompt without an answer, for the teacher to
    label)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(record, dict) and "steps" in record:
        return step_chats(check_episode(record, root), fmt or EpisodeFormat())
    return [parse_chat(record, root, prompts)]


def parse_chat(record: Any, root: Path, prompts: bool = False) -> dict:
    """Validate a one-chat record; returns it normalised or raises ValueError with the reason (``prompts``: it may
    end with the user's message instead of an answer)."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or len(messages) < (1 if prompts else 2):
        raise ValueError("needs a 'messages' list with at least a user and an assistant message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] needs a role among {ROLES}")
        if (reason := _check_content(message.get("content"), root)) is not None:
            raise ValueError(f"messages[{i}]: {reason}")
    answer = messages[-1]
    unanswered = prompts and answer["role"] == "user"
    if not unanswered and (
        answer["role"] != "assistant" or not isinstance(answer["content"], str) or not answer["content"]
    ):
        raise ValueError("the last message must be the assistant's answer, a non-empty string")
    target = record.get("target") or {}
    bbox = check_box(target.get("bbox") if isinstance(target, dict) else None, "target.bbox")
    return {"messages": messages, "bbox": bbox, "id": str(record.get("id", "")), "episode": ""}


class ChatEncoder:
    """Renders chats with the tokenizer's chat template; labels only on the assistant's answer.

    Args:
        tokenizer: the teacher's tokenizer (its chat template renders the prompt).
        image_processor: a GLM-4.1V image processor, or None for text-only models (image items are
            then left out of the prompt).
        max_length: longest sequence (prompt + answer) in tokens.
    """

    def __init__(self, tokenizer, image_processor=None, max_length: int = 512):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image|>")

    @property
    def use_images(self) -> bool:
        return self.image_processor is not None

    def _prompt_messages(self, messages: list[dict]) -> tuple[list[dict], list[str]]:
        out, images = [], []
        for message in messages[:-1]:
            content = message["content"]
            if isinstance(content, list):
                keep = [c for c in content if c["type"] == "text" or self.use_images]
                images += [c["image"] for c in keep if c["type"] == "image"]
                content = keep
            out.append({"role": message["role"], "content": content})
        return out, images

    def _image_tokens(self, path: Path) -> int:
        with Image.open(path) as image:
            width, height = image.size
        patches = self.image_processor.get_number_of_image_patches(height, width, {})
        return patches // self.image_processor.merge_size**2

    def encode_prompt(self, messages: list[dict], root: Path) -> tuple[list[int], list[str]]:
        """Token ids of everything before the answer (ending in ``<|assistant|>\\n``) and its images."""
        prompt, images = self._prompt_messages(messages)
        text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        parts = text.split("<|image|>")
        if len(parts) - 1 != len(images):
            raise ValueError(f"chat template rendered {len(parts) - 1} image slots for {len(images)} images")
        # Each <|image|> expands to one token per merged patch, as Glm4vProcessor does.
        text = parts[0] + "".join(
            "<|image|>" * self._image_tokens(root / path) + part for path, part in zip(images, parts[1:])
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"], images

    def encode(self, messages: list[dict], root: Path) -> dict:
        """``input_ids`` and ``labels`` (-100 on the prompt) for one chat; raises if it does not fit."""
        prompt_ids, images = self.encode_prompt(messages, root)
        answer_ids = self.tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        answer_ids.append(self.tokenizer.eos_token_id)
        total = len(prompt_ids) + len(answer_ids)
        if total > self.max_length:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + answer ({len(answer_ids)} tokens) = {total} exceeds "
                f"data.max_length={self.max_length}, so the answer would be cut: raise data.max_length (an episode's "
                "step: or keep fewer earlier turns with data.history_steps)"
            )
        return {
            "input_ids": prompt_ids + answer_ids,
            "labels": [-100] * len(prompt_ids) + answer_ids,
            "images": images,
        }

    def pixels(self, images: list[str], root: Path) -> dict[str, torch.Tensor]:
        """``pixel_values`` and ``image_grid_thw`` for the images of a batch, in order."""
        loaded = [Image.open(root / path).convert("RGB") for path in images]
        return dict(self.image_processor(images=loaded, return_tensors="pt"))


def corpus_texts(path: Path) -> list[str]:
    """Every text of a JSONL split (all messages, episodes with their element lists): the corpus for a locally
    trained tokenizer."""
    records, _ = read_split(path, path.parent, EpisodeFormat(elements_in_text=True))
    texts = []
    for record in records:
        for message in record["messages"]:
            content = message["content"]
            texts += [content] if isinstance(content, str) else [c["text"] for c in content if c["type"] == "text"]
    return texts


def read_split(
    path: Path, root: Path, fmt: EpisodeFormat | None = None, prompts: bool = False
) -> tuple[list[dict], list[BadExample]]:
    """Every valid chat record of a JSONL file (an episode gives one per step; each with its ``source``,
    ``file:line``) and the bad lines (``prompts``: see `parse_line`)."""
    records, bad = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                for record in parse_line(line, root, fmt, prompts):
                    step = record.pop("step", None)  # an episode's step: named in the source too
                    records.append({**record, "source": source if step is None else f"{source} steps[{step}]"})
            except ValueError as err:
                bad.append(BadExample(source, str(err)))
    return records, bad


def load_split(
    root: Path, split: str, encoder: ChatEncoder, on_bad_example: str = "fail", fmt: EpisodeFormat | None = None
) -> tuple[datasets.Dataset, list[BadExample]]:
    """Read, validate and tokenize one split into a ``datasets.Dataset``.

    Returns the dataset (columns ``id, episode, source, messages, bbox, input_ids, labels, images``; messages as
    a JSON string, since their content mixes strings and lists; ``episode`` empty for one-chat lines) and the
    examples that were skipped.
    """
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(
            f"{path} does not exist. data.path must be a folder with train.jsonl, val.jsonl and test.jsonl; "
            "make one with `python -m autoglm_distill.data.synth --out <folder>`."
        )
    records, bad = read_split(path, root, fmt)
    rows = []
    for record in records:
        try:
            encoded = encoder.encode(record["messages"], root)
        except ValueError as err:
            bad.append(BadExample(record["source"], str(err)))
            continue
        rows.append({**record, "messages": json.dumps(record["messages"]), **encoded})
    if bad and on_bad_example == "fail":
        shown = "\n".join(f"  {b}" for b in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(
            f"{len(bad)} bad example(s) in {path}:\n{shown}{more}\n"
            "Fix them, or skip them (and have them counted in summary.json) with data.on_bad_example=skip."
        )
    for b in bad:
        log.warning("skipped %s", b)
    if not rows:
        raise DataError(f"{path} holds no usable example.")
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "episode": datasets.Value("string"),
            "source": datasets.Value("string"),
            "messages": datasets.Value("string"),
            "bbox": datasets.Sequence(datasets.Value("int32")),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "images": datasets.Sequence(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_list(rows, features=features), bad


# The batch keys a model's forward takes; the Collator below makes them (labels and cached targets stay with the loss).
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a batch that the model's forward takes."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


class Collator:
    """Right-pads a list of encoded examples into a model batch (labels -100 on padding)."""

    def __init__(self, encoder: ChatEncoder, root: Path):
        self.encoder, self.root = encoder, root

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pad = self.encoder.tokenizer.pad_token_id
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), pad, dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.as_tensor(e["input_ids"])
            labels[i, :n] = torch.as_tensor(e["labels"])
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = [path for e in examples for path in e["images"]]
        if images:
            batch.update(self.encoder.pixels(images, self.root))
            batch["mm_token_type_ids"] = (input_ids == self.encoder.image_token_id).long()
        if "teacher_topk" in examples[0]:  # cached teacher targets, supervised positions in batch order
            ids, logp, rest = zip(*(e["teacher_topk"] for e in examples), strict=True)
            batch.update(teacher_ids=torch.cat(ids), teacher_logp=torch.cat(logp), teacher_rest=torch.cat(rest))
        return batch


class CachedSplit(torch.utils.data.Dataset):
    """A split whose examples carry their cached teacher targets (``teacher_topk``: ids, log-probs, rest).

    The cache's fingerprint of the split is checked once here; the loss checks each batch's token count."""

    def __init__(self, rows: datasets.Dataset, cache, split: str):
        cache.check_split(split, rows)
        self.rows, self.cache, self.split = rows, cache, split

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {**self.rows[i], "teacher_topk": self.cache.example(self.split, i)}


class PhoneDataModule(pl.LightningDataModule):
    """Train/val/test loaders over a phone-episode folder.

    Args:
        path: folder with ``train.jsonl``, ``val.jsonl``, ``test.jsonl``.
        encoder: renders and tokenizes the chats.
        batch_size: examples per batch.
        num_workers: DataLoader workers.
        on_bad_example: ``fail`` (default) or ``skip``.
        seed: shuffling seed of the training loader.
        teacher_cache: a `TeacherCache`: train and val batches then carry the teacher's cached top-k targets.
        episode_format: how episode lines become chats (system prompt, history, element list).
    """

    def __init__(
        self,
        path: str | Path,
        encoder: ChatEncoder,
        batch_size: int = 16,
        num_workers: int = 0,
        on_bad_example: str = "fail",
        seed: int = 0,
        teacher_cache=None,
        episode_format: EpisodeFormat | None = None,
    ):
        super().__init__()
        self.episode_format = episode_format or EpisodeFormat()
        self.teacher_cache = teacher_cache
        self.root = Path(path)
        if not self.root.is_dir():
            raise DataError(
                f"data.path={str(path)!r} is not a folder. Point data.path at a folder with train.jsonl, "
                "val.jsonl and test.jsonl, or generate one: python -m autoglm_distill.data.synth --out <folder>."
            )
        self.encoder = encoder
        self.batch_size, self.num_workers = batch_size, num_workers
        self.on_bad_example, self.seed = on_bad_example, seed
        self.splits: dict[str, datasets.Dataset] = {}
        self.bad_examples: dict[str, list[BadExample]] = {}
        self.collate = Collator(encoder, self.root)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.splits:
                self.splits[split], self.bad_examples[split] = load_split(
                    self.root, split, self.encoder, self.on_bad_example, self.episode_format
                )
                log.info("%s: %d examples (%d skipped)", split, len(self.splits[split]), len(self.bad_examples[split]))

    def _loader(self, split: str, shuffle: bool) -> StatefulDataLoader:
        # Stateful: Lightning saves the loader's position in the epoch with each checkpoint, so a run resumed
        # mid-epoch sees exactly the batches the uninterrupted run would have seen.
        self.setup()
        generator = torch.Generator().manual_seed(self.seed)
        rows = self.splits[split].with_format(None)
        if self.teacher_cache is not None and split != "test":
            rows = CachedSplit(rows, self.teacher_cache, split)
        sampler = None
        if shuffle:
            # Epoch e's order is the permutation drawn from seed + e (Lightning calls set_epoch), the same after a
            # resume; under DDP each rank takes its share of it.
            trainer = self.trainer
            sampler = DistributedSampler(
                rows,
                num_replicas=trainer.world_size if trainer else 1,
                rank=trainer.global_rank if trainer else 0,
                shuffle=True,
                seed=self.seed,
            )
        return StatefulDataLoader(
            rows,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader("test", shuffle=False)
