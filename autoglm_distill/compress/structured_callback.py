"""``StructuredPruning``: the student shrinks to smaller tensors at scheduled points of the distill stage (score, plan
and slice from ``structured.py``), its optimizer state sliced with it."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import pytorch_lightning as pl
import torch
from torch import nn

from autoglm_distill.compress.qat import is_fake_quantized
from autoglm_distill.compress.structured import (
    SHAPE_KEYS,
    Importance,
    Plan,
    PruningError,
    Shape,
    check_target,
    decoder_prefix,
    importance,
    plan,
    prune,
    slice_tensor,
)
from autoglm_distill.models import head_dim_of, text_config

log = logging.getLogger(__name__)


def _between(start: Shape, final: Shape, fraction: float) -> Shape:
    """The shape ``fraction`` of the way from ``start`` to ``final`` (whole GQA groups kept)."""
    values = {k: round(getattr(start, k) - (getattr(start, k) - getattr(final, k)) * fraction) for k in SHAPE_KEYS}
    values["num_attention_heads"] -= values["num_attention_heads"] % values["num_key_value_heads"]
    return Shape(**values)


class StructuredPruning(pl.Callback):
    """Prunes the student to smaller tensors at scheduled points of the distill stage; distillation goes on after each
    step so the student recovers. The optimizer keeps its state: AdamW moments are sliced like the weights they
    belong to, and the LR schedule continues.

    Args:
        targets: final size per dimension of the student, an int or a fraction of its size at the start, e.g.
            ``{intermediate_size: 0.5, num_attention_heads: 0.5, hidden_size: 0.75}``; keys from ``SHAPE_KEYS``.
        schedule: fractions of ``trainer.max_steps`` at which to prune; the size falls evenly over them.
        calibration_batches: training batches the importance scores are measured on.
    """

    def __init__(
        self,
        targets: Mapping[str, float | int],
        schedule: Sequence[float] = (0.3, 0.6),
        calibration_batches: int = 4,
    ):
        bad = [f for f in schedule if not 0 < f < 1]
        if not schedule or bad:
            raise PruningError(
                f"callbacks.prune_structured.schedule={list(schedule)}: give fractions of training strictly between "
                "0 and 1, e.g. [0.3, 0.6]."
            )
        if not targets:
            raise PruningError(
                "callbacks.prune_structured.targets is empty: give at least one, e.g. {intermediate_size: 0.5}."
            )
        self.targets, self.schedule = dict(targets), sorted(schedule)
        self.calibration_batches = calibration_batches
        self.steps: list[int] = []
        self.history: list[dict] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.start = Shape.of(pl_module.student)
        self.final = self.start.scaled(self.targets)
        plan(_dummy_scores(self.start), self.start, self.final)  # fail now, not mid-training, on a bad target
        check_target(pl_module.student, self.final)
        self.steps = [max(1, round(f * trainer.max_steps)) for f in self.schedule]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.steps or any(h["step"] == step for h in self.history):
            return
        student = pl_module.student
        if any(is_fake_quantized(m) for m in student.modules()):
            raise PruningError(
                f"Structured pruning at step {step} found fake-quantized layers: QAT has already started. Prune "
                "earlier: keep callbacks.prune_structured.schedule below callbacks.qat.start_fraction."
            )
        k = self.steps.index(step) + 1
        target = _between(self.start, self.final, k / len(self.steps))
        source = Shape.of(student)
        if target == source:
            return
        batches = itertools.islice(trainer.datamodule.train_dataloader(), self.calibration_batches)
        p = plan(importance(student, batches), source, target)
        smaller = prune(student, p)
        for optimizer in trainer.optimizers:
            _move_optimizer_state(optimizer, student, smaller, p)
        pl_module.student = smaller
        params = sum(t.numel() for t in smaller.parameters())
        self.history.append({"step": step, "params": params, **asdict(target)})
        log.info("Step %d: pruned the student to %s (%s parameters)", step, asdict(target), f"{params:,}")
        pl_module.log("prune/params", float(params))
        for key, value in asdict(target).items():
            pl_module.log(f"prune/{key}", float(value))


def _dummy_scores(shape: Shape) -> Importance:
    return Importance(
        hidden=torch.ones(shape.hidden_size),
        heads=[torch.ones(shape.num_attention_heads)] * shape.num_hidden_layers,
        mlp=[torch.ones(shape.intermediate_size)] * shape.num_hidden_layers,
        layers=torch.ones(shape.num_hidden_layers),
        tokens=1,
    )


@torch.no_grad()
def _move_optimizer_state(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module, p: Plan) -> None:
    """Point ``optimizer`` at ``new``'s parameters, slicing each per-parameter state tensor (Adam's moments) exactly
    like its weight; state of dropped layers goes with them."""
    prefix = decoder_prefix(old)
    head_dim = head_dim_of(text_config(old))
    names = {id(t): name for name, t in old.named_parameters()}
    params = dict(new.named_parameters())
    for group in optimizer.param_groups:
        kept = []
        for param in group["params"]:
            state = optimizer.state.pop(param, {})
            moved = slice_tensor(names[id(param)], param, p, prefix, head_dim)
            if moved is None:
                continue
            new_param = params[moved[0]]
            optimizer.state[new_param] = {
                k: slice_tensor(names[id(param)], v, p, prefix, head_dim)[1]
                if torch.is_tensor(v) and v.shape == param.shape
                else v
                for k, v in state.items()
            }
            kept.append(new_param)
        group["params"] = kept
