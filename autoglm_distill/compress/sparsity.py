"""Unstructured or N:M magnitude sparsity of the student's Linear weights, rising on a schedule during distillation.

``Sparsity`` is Lightning's ``ModelPruning`` driven by training steps instead of epochs (this project trains by
``trainer.max_steps``). At each fraction of ``schedule`` it prunes every Linear weight of the student by L1 magnitude,
layer by layer, so that after the last application each weight holds ``target`` zeros (unstructured), or M-N zeros in
every group of M consecutive input weights (N:M, e.g. 2:4). Pruned weights stay zero while the others keep training
(a mask on the weight). At the end of training the masks are folded into plain ``weight`` tensors: the saved student
is an ordinary checkpoint, whose zeros the Core ML export stores sparse (``autoglm_distill/export/storage.py``).

    python -m autoglm_distill callbacks=[default,sparsity] callbacks.sparsity.target=0.5
    python -m autoglm_distill callbacks=[default,sparsity] callbacks.sparsity.pattern=2:4
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune

from autoglm_distill.models import linear_weights
from autoglm_distill.utils import rank_zero_logger

log = rank_zero_logger(__name__)

KEY = "callbacks.sparsity"


def n_m_mask(weight: torch.Tensor, zeros: int, group: int, previous: torch.Tensor | None = None) -> torch.Tensor:
    """A 0/1 mask that zeroes the ``zeros`` smallest-magnitude weights of every ``group`` consecutive weights along
    the last (input) dimension. Weights that ``previous`` (an earlier mask) already zeroed go first, so the masks
    nest as the schedule raises ``zeros``."""
    if weight.shape[-1] % group:
        raise ValueError(f"an input dimension of {weight.shape[-1]} does not split into groups of {group}")
    scores = weight.detach().abs().reshape(-1, group)
    if previous is not None:
        scores = scores.masked_fill(previous.reshape(-1, group) == 0, -1.0)
    drop = scores.topk(zeros, dim=1, largest=False).indices
    return torch.ones_like(scores).scatter_(1, drop, 0.0).reshape(weight.shape)


def prune_n_m(module: nn.Module, name: str, amount: int, group: int) -> nn.Module:
    """Prune ``module.<name>`` to ``amount`` zeros in every ``group`` consecutive input weights, on top of any earlier
    pruning (``torch.nn.utils.prune.custom_from_mask``: the masks compose). The mask is computed on the weight as the
    forward sees it (original times the current mask)."""
    previous = getattr(module, name + "_mask", None)
    weight = getattr(module, name + "_orig") * previous if previous is not None else getattr(module, name)
    return prune.custom_from_mask(module, name, n_m_mask(weight, amount, group, previous))


def parse_pattern(target: float, pattern: str | int, schedule: Sequence[float]) -> tuple[int, int]:
    """Check the arguments (every problem at once); returns (zeros per group, group) for N:M, (0, 0) unstructured."""
    problems, zeros, group = [], 0, 0
    if not 0 < target < 1:
        problems.append(f"{KEY}.target={target} must be a fraction in (0, 1), e.g. {KEY}.target=0.5")
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern).strip())
    if match and 0 < int(match[1]) < int(match[2]):
        keep, group = int(match[1]), int(match[2])
        zeros = group - keep
        if 0 < target < 1 and abs(target - zeros / group) > 0.005:
            problems.append(
                f"{KEY}.target={target} disagrees with {KEY}.pattern={pattern}, which zeroes {zeros} of every "
                f"{group} weights: set {KEY}.target={zeros / group:.4g}"
            )
    elif isinstance(pattern, int):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
        guess = f"{pattern // 60}:{pattern % 60}"
        problems.append(
            f'{KEY}.pattern={pattern} is a number: YAML reads an unquoted {guess} as {pattern}; quote it, "{guess}"'
        )
    elif pattern != "unstructured":
        problems.append(
            f"{KEY}.pattern={pattern!r} is not a pattern: use unstructured, or N:M with 0 < N < M "
            f"(keep N of every M weights), e.g. {KEY}.pattern=2:4"
        )
    fractions = list(schedule)
    if not fractions or any(not 0 < f <= 1 for f in fractions) or fractions != sorted(set(fractions)):
        problems.append(
            f"{KEY}.schedule={fractions} must be increasing fractions of trainer.max_steps in (0, 1], "
            f"e.g. {KEY}.schedule=[0.25,0.5,0.75]"
        )
    if problems:
        raise ValueError("Bad sparsity config:\n  " + "\n  ".join(problems))
    return zeros, group


class Sparsity(ModelPruning):
    """Magnitude sparsity of the student's ``nn.Linear`` weights on a step schedule; permanent when training ends.

    Only ``pl_module.student`` is pruned (never the teacher), and in it only Linear weights: no embedding, norm or
    bias. Each layer is pruned on its own (local L1), so every layer reaches the target, not just their total. After
    each application ``sparsity/<layer>`` and ``sparsity/total`` (fractions of zeros) are logged.

    Args:
        target: final fraction of zeros in every pruned weight, in (0, 1); for N:M it must equal (M-N)/M.
        pattern: ``"unstructured"``, or ``"N:M"`` (e.g. ``"2:4"``): in every M consecutive weights along the input
            dimension, M-N are zero.
        schedule: increasing fractions of ``trainer.max_steps``, in (0, 1], at which sparsity rises; after the k-th
            of n applications a weight is ``target * k / n`` zeros (N:M: ``round((M-N) * k / n)`` per group).
        verbose: ``ModelPruning``'s log lines: 0 none, 1 the total, 2 every layer.
    """

    def __init__(
        self,
        target: float = 0.5,
        pattern: str = "unstructured",
        schedule: Sequence[float] = (0.25, 0.5, 0.75),
        verbose: int = 0,
    ):
        schedule = [float(f) for f in schedule]
        self.zeros, self.group = parse_pattern(target, pattern, schedule)
        self.target, self.pattern, self.schedule = float(target), pattern, schedule
        super().__init__(
            pruning_fn="l1_unstructured",
            parameter_names=["weight"],
            use_global_unstructured=False,  # per layer: every layer reaches the target
            amount=self.target,
            apply_pruning=False,  # no per-epoch pruning: _advance prunes at the scheduled steps
            make_pruning_permanent=True,
            use_lottery_ticket_hypothesis=False,
            verbose=verbose,
        )
        if self.group:  # Lightning's constructor takes no plain callable, so the N:M function is set here
            self.pruning_fn = partial(prune_n_m, group=self.group)
            self._pruning_method_name = f"{self.pattern} magnitude"
        self._names: dict[int, str] = {}
        self._steps: list[int] = []
        self._applied = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        student = getattr(pl_module, "student", None)
        if student is None:
            raise ValueError(f"{KEY} prunes a DistillModule's student; {type(pl_module).__name__} has no .student")
        layers = linear_weights(student)
        uneven = [name for name, m in layers.items() if self.group and m.in_features % self.group]
        if uneven:
            raise ValueError(
                f"{KEY}.pattern={self.pattern} needs every Linear's input size to be a multiple of {self.group}; "
                f"{uneven[:3]} are not: use {KEY}.pattern=unstructured or an M that divides them"
            )
        self._names = {id(m): name for name, m in layers.items()}
        super().setup(trainer, pl_module, stage)

    def filter_parameters_to_prune(self, parameters_to_prune=()):
        """The student's Linear weights only (the teacher's modules are in ``pl_module`` too)."""
        return [(m, name) for m, name in parameters_to_prune if id(m) in self._names and name == "weight"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_steps is None or trainer.max_steps < 1:
            raise ValueError(f"{KEY}.schedule is in fractions of trainer.max_steps: set trainer.max_steps=<steps>")
        self._steps = [max(1, round(f * trainer.max_steps)) for f in self.schedule]
        self._applied = 0  # a new fit starts without masks (a resumed one too: its checkpoint has plain weights)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._advance(trainer, pl_module)  # a run resumed past scheduled steps re-masks before its first step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        self._advance(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._applied < len(self.schedule):
            log.warning(
                "Training stopped at step %d before the sparsity schedule %s finished: pruning to the target now",
                trainer.global_step,
                self._steps,
            )
            self._prune_to(len(self.schedule))
        super().on_train_end(trainer, pl_module)  # folds the masks into the weights

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = sum(step <= trainer.global_step for step in self._steps)
        if due > self._applied:
            self._prune_to(due)
            pl_module.log_dict(self.layer_sparsity(), on_step=True, on_epoch=False)

    def _prune_to(self, applied: int) -> None:
        """Prune every layer to the sparsity of the ``applied``-th application (an absolute fraction of zeros)."""
        self._applied = applied
        self.apply_pruning(self.target * applied / len(self.schedule))

    def _apply_local_pruning(self, amount: float) -> None:
        """``amount`` is the fraction of zeros each weight has afterwards. Torch's ``amount`` counts among the
        weights not pruned yet, so each layer gets the count of weights still to prune."""
        for module, name in self._parameters_to_prune:
            zeros, size = self._zeros(module, name)
            if self.group:  # zeros per group (the same in every group); an application that adds none is skipped
                count = round(self.zeros * self._applied / len(self.schedule))
                count = count if count * size > zeros * self.group else 0
            else:
                count = max(0, round(amount * size) - zeros)
            if count:
                self.pruning_fn(module, name=name, amount=count)

    @staticmethod
    def _zeros(module: nn.Module, name: str) -> tuple[int, int]:
        mask = getattr(module, name + "_mask", None)
        size = getattr(module, name).numel()
        return (int((mask == 0).sum()) if mask is not None else 0), size

    def layer_sparsity(self) -> dict[str, float]:
        """``sparsity/<student layer>`` and ``sparsity/total``: the fraction of each pruned weight that is masked."""
        stats, zeros, size = {}, 0, 0
        for module, name in self._parameters_to_prune:
            z, n = self._zeros(module, name)
            stats[f"sparsity/{self._names[id(module)]}"] = z / n
            zeros, size = zeros + z, size + n
        stats["sparsity/total"] = zeros / max(size, 1)
        return stats
