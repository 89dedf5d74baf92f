"""``DistillModule``: the student trains, the frozen teacher (if any) supplies soft targets."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from autoglm_distill.data.phone import model_inputs
from autoglm_distill.losses import DistillationLoss, DistillationLossOutput, HeadTargets, Teacher, TopKTargets
from autoglm_distill.models import plain_head
from autoglm_distill.on_policy import OnPolicy, rollout, target_logprob
from autoglm_distill.utils import rank_zero_logger

log = rank_zero_logger(__name__)


class DistillModule(pl.LightningModule):
    """Distils a teacher into ``student`` with ``loss``; with no teacher it is plain hard-label training.

    The soft targets come from ``teacher`` (a frozen model run under inference_mode at every step) or, with
    ``cache_temperature`` set, from the batches themselves (``teacher_ids`` / ``teacher_logp`` / ``teacher_rest``,
    see `autoglm_distill.teacher_cache`). With ``loss.chunk_size`` set the loss is made from final hidden states
    and lm_head weights a chunk at a time (`DistillationLoss.from_hidden`), so full-vocabulary logits of the batch
    never exist; else from full logits.

    Args:
        student: the model that trains.
        loss: a ``DistillationLoss`` (alpha must be 0 when there is no teacher).
        optimizer: partial optimizer, called with the student's parameters.
        scheduler: partial LR schedule, called with the optimizer and ``num_training_steps``; optional.
        teacher: frozen model whose logits are the soft targets; None for the hard-label baseline or a cache.
        cache_temperature: the temperature of cached targets in the batches; None without a cache.
        on_policy: who writes each training batch's answers (`autoglm_distill.on_policy`); None: the data.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        loss: DistillationLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        teacher: PreTrainedModel | None = None,
        cache_temperature: float | None = None,
        on_policy: OnPolicy | None = None,
    ):
        super().__init__()
        if teacher is None and cache_temperature is None and loss.alpha > 0:
            raise ValueError(f"distill.loss.alpha={loss.alpha} needs a teacher; use alpha=0 to train without one.")
        if on_policy is not None and on_policy.active and teacher is None:
            raise ValueError(
                "distill.on_policy needs the live teacher to score new answers, and a cache cannot score tokens it "
                "never saw: use distill.teacher=model, or distill.on_policy.lmbda=0 distill.on_policy.seq_kd=false."
            )
        self.on_policy = on_policy if on_policy is not None and on_policy.active else None
        # On the student's own samples there is no reference answer: the divergence alone trains.
        self.sample_loss = loss.with_alpha(1.0) if self.on_policy is not None else None
        self.student, self.teacher, self.loss = student, teacher, loss
        self.cache_temperature = cache_temperature
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        # Checkpoints hold the student only (see on_save_checkpoint); the teacher comes from its path.
        self.strict_loading = False
        self.val_kd, self.val_ce, self.val_top1 = MeanMetric(), MeanMetric(), MeanMetric()
        self._told_full_logits = False

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None or self.cache_temperature is not None

    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # no dropout in the teacher, ever
        return self

    def _head(self) -> nn.Linear | None:
        """The student's lm_head for the chunked loss, or None for full logits (chunk_size null, or a wrapped head)."""
        if self.loss.chunk_size is None:
            return None
        head = plain_head(self.student)
        if head is None and not self._told_full_logits:
            log.info("The student's lm_head is wrapped by a callback (QAT or pruning): the loss uses full logits.")
            self._told_full_logits = True
        return head

    def _teacher_targets(self, batch: dict[str, torch.Tensor], inputs: dict, chunked: bool) -> Teacher | None:
        if self.cache_temperature is not None:
            return TopKTargets(
                batch["teacher_ids"], batch["teacher_logp"], batch["teacher_rest"], self.cache_temperature
            )
        if self.teacher is None:
            return None
        with torch.inference_mode():
            if not chunked:
                return self.teacher(**inputs).logits[:, :-1]
            hidden = self.teacher.model(**inputs).last_hidden_state[:, :-1]
        return HeadTargets(hidden, self.teacher.get_output_embeddings().weight)

    def _forward(
        self, batch: dict[str, torch.Tensor], loss: DistillationLoss | None = None
    ) -> tuple[DistillationLossOutput, Teacher | None]:
        """The loss of ``batch`` (``self.loss`` unless given) and the teacher targets it used."""
        loss = loss or self.loss
        inputs = model_inputs(batch)
        labels = batch["labels"][:, 1:]  # position t predicts the token at t + 1
        head = self._head()
        teacher = self._teacher_targets(batch, inputs, chunked=head is not None)
        if head is None:
            return loss(self.student(**inputs).logits[:, :-1], labels, teacher), teacher
        hidden = self.student.model(**inputs).last_hidden_state[:, :-1]
        return loss.from_hidden(hidden, head.weight, labels, teacher), teacher

    def _sampled_step(self, batch: dict[str, torch.Tensor]) -> tuple[DistillationLossOutput, str]:
        """A step whose answers the student or teacher may sample (`autoglm_distill.on_policy`), with its metrics;
        returns the loss and who wrote the answers."""
        source = self.on_policy.source(self.global_step)
        self.log("train/on_policy_share", float(source == "student"), on_step=False, on_epoch=True, sync_dist=True)
        if source == "data":
            return self._forward(batch)[0], source
        writer = self.student if source == "student" else self.teacher
        batch, lengths = rollout(writer, batch, self.on_policy)
        out, teacher = self._forward(batch, self.sample_loss if source == "student" else self.loss)
        self.log(f"train/{source}_sample_len", lengths.mean(), sync_dist=True)
        if source == "student":
            self.log("train/teacher_logp_of_student", target_logprob(teacher, batch["labels"][:, 1:]), sync_dist=True)
        return out, source

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out, source = (self._forward(batch)[0], "data") if self.on_policy is None else self._sampled_step(batch)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"Non-finite training loss ({out.loss.item()}) at step {self.global_step}: lower optimizer.lr, "
                "keep gradient clipping on (trainer.gradient_clip_val) or use fp32 (trainer.precision=32-true). "
                "The last checkpoint before this step is kept."
            )
        # Averaged over the processes under DDP/FSDP/DeepSpeed (each rank's loss is over its own batch).
        self.log("train/loss", out.loss, prog_bar=True, sync_dist=True)
        if source != "student":  # a sampled token has no reference to score against
            self.log("train/ce", out.ce, sync_dist=True)
        if self.has_teacher:
            self.log("train/kd", out.kd, sync_dist=True)
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Token-weighted means in torchmetrics objects: reduced over every process's share of the split.
        out = self._forward(batch)[0]
        self.val_ce.update(out.ce, weight=out.num_tokens)
        self.log("val/ce", self.val_ce, prog_bar=True)
        if self.has_teacher:
            self.val_kd.update(out.kd, weight=out.num_tokens)
            self.val_top1.update(out.agree / out.num_tokens.clamp(min=1), weight=out.num_tokens)
            self.log("val/kd", self.val_kd)
            self.log("val/top1_agreement", self.val_top1, prog_bar=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.student.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, num_training_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        missing = [k for k in self.student.state_dict() if f"student.{k}" not in state]
        if missing:
            raise RuntimeError(
                f"The checkpoint does not fit this student ({len(missing)} tensors missing, e.g. {missing[0]}): "
                "resume with the same student config it was trained with."
            )
        resized = [
            f"{k} {tuple(state[f'student.{k}'].shape)} vs {tuple(v.shape)}"
            for k, v in self.student.state_dict().items()
            if state[f"student.{k}"].shape != v.shape
        ]
        if resized:
            raise RuntimeError(
                f"The checkpoint's student has other tensor shapes than this one (e.g. {resized[0]}): it was pruned "
                "by callbacks.prune_structured after the run started, and resuming across structured pruning is not "
                "supported. Rerun without ckpt_path, or continue from the saved student with student=pretrained "
                "student.path=<run dir>/student."
            )
