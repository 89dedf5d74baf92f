"""On-policy distillation (GKD, Agarwal et al. 2024; TRL's ``GKDTrainer``): the student writes the answer, the
teacher scores it (``distill.on_policy``).

Per training batch, drawn reproducibly from ``(seed, step)`` so that every DDP rank and every resume agrees:

* with probability ``lmbda`` the student samples each answer (temperature ``temperature``, at most
  ``max_new_tokens``, with its KV cache through transformers ``generate``); the loss is the divergence alone
  (``distill.loss.kind`` at ``distill.loss.temperature``) on the student's tokens, since they have no reference;
* otherwise, with ``seq_kd``, the teacher samples the answers and the configured loss (divergence and hard labels)
  trains on them, as in sequence-level KD;
* otherwise the batch is the data's, as in off-policy KD. ``lmbda=0`` and ``seq_kd=false`` is exactly that, and so
  is every step before ``start_step``.

Episodes: each step of an episode is its own chat whose earlier turns are the recorded ones, so the student's action
at step t is scored in the episode's teacher-forced history; the next screenshot cannot follow the student's action
without an emulator. `autoglm_distill.environment` is the seam for a closed loop (and runs one on synthetic phones).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from autoglm_distill.losses import HeadTargets, Teacher
from autoglm_distill.tokenizer import SPECIAL_TOKENS

# Tokens a sampled answer never holds: a placeholder would ask the model for image features the prompt does not have.
MEDIA_TOKENS = tuple(t for t in SPECIAL_TOKENS if "image" in t or "video" in t)


@dataclass(frozen=True)
class OnPolicy:
    """Where each training batch's answers come from (see the module docstring).

    Attributes:
        lmbda: probability that a batch's answers are the student's samples.
        seq_kd: the other batches' answers are the teacher's samples instead of the data's.
        temperature: sampling temperature of both (0: greedy).
        max_new_tokens: longest sampled answer.
        pad_token_id: the tokenizer's padding id.
        eos_token_id: the id that ends an answer (the one the data's answers end with).
        seed: with the step, decides each batch's source.
        suppressed_ids: token ids never sampled (the tokenizer's image and video placeholders).
        start_step: steps trained on the data's answers before any sampling (a student that still writes noise
            learns little from scoring it).
    """

    lmbda: float
    seq_kd: bool
    temperature: float
    max_new_tokens: int
    pad_token_id: int
    eos_token_id: int
    seed: int = 0
    suppressed_ids: tuple[int, ...] = ()
    start_step: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.lmbda <= 1:
            problems.append(f"distill.on_policy.lmbda={self.lmbda}: use a probability in [0, 1].")
        if not self.temperature >= 0:
            problems.append(f"distill.on_policy.temperature={self.temperature}: use >= 0 (0 is greedy).")
        if not self.max_new_tokens >= 1:
            problems.append(f"distill.on_policy.max_new_tokens={self.max_new_tokens}: use >= 1.")
        if not self.start_step >= 0:
            problems.append(f"distill.on_policy.start_step={self.start_step}: use a step >= 0.")
        if problems:
            raise ValueError(" ".join(problems))

    @property
    def active(self) -> bool:
        return self.lmbda > 0 or self.seq_kd

    def source(self, step: int) -> str:
        """``student``, ``teacher`` or ``data``: who writes the answers of training step ``step``."""
        if step < self.start_step:
            return "data"
        if self.lmbda > 0 and random.Random(self.seed * 1_000_003 + step).random() < self.lmbda:
            return "student"
        return "teacher" if self.seq_kd else "data"


def from_config(on_policy_cfg, tokenizer, seed: int) -> OnPolicy | None:
    """``distill.on_policy`` for a run whose answers end with ``tokenizer``'s eos; None when it is off."""
    settings = OnPolicy(
        lmbda=float(on_policy_cfg.lmbda),
        seq_kd=bool(on_policy_cfg.seq_kd),
        temperature=float(on_policy_cfg.temperature),
        max_new_tokens=int(on_policy_cfg.max_new_tokens),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=seed,
        start_step=int(on_policy_cfg.start_step),
        suppressed_ids=tuple(tokenizer.convert_tokens_to_ids(t) for t in MEDIA_TOKENS if t in tokenizer.get_vocab()),
    )
    return settings if settings.active else None


def prompt_lengths(batch: dict[str, Tensor]) -> list[int]:
    """Tokens before each row's answer: the position of its first label (right-padded batches)."""
    labelled = batch["labels"] != -100
    if not bool(labelled.any(-1).all()):
        raise ValueError("a batch row has no answer tokens, so it has no prompt to sample from")
    return labelled.int().argmax(-1).tolist()


def _left_padded_prompts(batch: dict[str, Tensor], lengths: list[int], pad_id: int) -> dict[str, Tensor]:
    """The prompts of a right-padded batch, left-padded for ``generate`` (images and their token types kept)."""
    width = max(lengths)
    ids = batch["input_ids"]
    input_ids = torch.full((len(lengths), width), pad_id, dtype=ids.dtype, device=ids.device)
    attention_mask = torch.zeros_like(input_ids)
    kinds = torch.zeros_like(input_ids) if "mm_token_type_ids" in batch else None
    for i, n in enumerate(lengths):
        input_ids[i, width - n :] = ids[i, :n]
        attention_mask[i, width - n :] = 1
        if kinds is not None:
            kinds[i, width - n :] = batch["mm_token_type_ids"][i, :n]
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if kinds is not None:
        out["mm_token_type_ids"] = kinds
    out.update({k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch})
    return out


def _answer(tokens: Tensor, eos_id: int) -> Tensor:
    """A generated row up to and including its first ``eos_id`` (all of it when the answer was cut)."""
    ends = (tokens == eos_id).nonzero()
    return tokens if len(ends) == 0 else tokens[: int(ends[0]) + 1]


@torch.no_grad()
def rollout(model: PreTrainedModel, batch: dict[str, Tensor], settings: OnPolicy) -> tuple[dict[str, Tensor], Tensor]:
    """``batch`` with each answer replaced by one that ``model`` samples for its prompt.

    Returns the new right-padded batch (labels on the sampled tokens only, their end token included) and the
    sampled lengths ``[B]``. The model is put in eval mode while it samples and back as it was after.
    """
    lengths = prompt_lengths(batch)
    prompts = _left_padded_prompts(batch, lengths, settings.pad_token_id)
    sampling = (
        {"do_sample": True, "temperature": settings.temperature, "top_k": 0, "top_p": 1.0}
        if settings.temperature > 0
        else {"do_sample": False}
    )
    was_training = model.training
    model.eval()
    try:
        generated = model.generate(
            **prompts,
            **sampling,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=settings.pad_token_id,
            eos_token_id=settings.eos_token_id,
            suppress_tokens=list(settings.suppressed_ids) or None,
        )
    finally:
        model.train(was_training)
    answers = [_answer(row, settings.eos_token_id) for row in generated[:, prompts["input_ids"].shape[1] :]]
    ids = batch["input_ids"]
    width = max(n + len(a) for n, a in zip(lengths, answers))
    input_ids = torch.full((len(lengths), width), settings.pad_token_id, dtype=ids.dtype, device=ids.device)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    kinds = torch.zeros_like(input_ids) if "mm_token_type_ids" in batch else None
    for i, (n, answer) in enumerate(zip(lengths, answers)):
        input_ids[i, :n], input_ids[i, n : n + len(answer)] = ids[i, :n], answer
        labels[i, n : n + len(answer)] = answer
        attention_mask[i, : n + len(answer)] = 1
        if kinds is not None:
            kinds[i, :n] = batch["mm_token_type_ids"][i, :n]
    new = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if kinds is not None:
        new["mm_token_type_ids"] = kinds
    new.update({k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch})
    return new, torch.tensor([len(a) for a in answers], dtype=torch.float32, device=ids.device)


@torch.no_grad()
def target_logprob(teacher: Teacher, labels: Tensor, chunk: int = 4096) -> Tensor:
    """Mean log-probability (T = 1) the teacher gives the labelled tokens; ``labels`` are already aligned with the
    teacher's positions. ``teacher`` is its full logits ``[B, T, V]`` or `HeadTargets` (made ``chunk`` rows at a
    time, so no full-vocabulary logits of the batch exist)."""
    mask = labels != -100
    tokens = labels[mask]
    if isinstance(teacher, HeadTargets):
        hidden = teacher.hidden[mask]
        total = torch.zeros((), dtype=torch.float32, device=labels.device)
        for start in range(0, len(tokens), chunk):
            logits = (hidden[start : start + chunk] @ teacher.weight.T).float()
            total += F.log_softmax(logits, -1).gather(-1, tokens[start : start + chunk, None]).sum()
    elif isinstance(teacher, Tensor):
        total = F.log_softmax(teacher[mask].float(), -1).gather(-1, tokens[:, None]).sum()
    else:
        raise TypeError(f"cannot score tokens with {type(teacher).__name__}: a cached teacher holds no new tokens")
    return total / max(len(tokens), 1)
