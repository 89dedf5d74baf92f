"""``DistillModule``: the student trains, the frozen teacher (if any) supplies soft targets."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from autoglm_distill.losses import DistillationLoss

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a batch that the model's forward takes (labels stay with the loss)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


class DistillModule(pl.LightningModule):
    """Distils ``teacher`` into ``student`` with ``loss``; with no teacher it is plain hard-label training.

    Args:
        student: the model that trains.
        loss: a ``DistillationLoss`` (alpha must be 0 when there is no teacher).
        optimizer: partial optimizer, called with the student's parameters.
        scheduler: partial LR schedule, called with the optimizer and ``num_training_steps``; optional.
        teacher: frozen model whose logits are the soft targets; None for the hard-label baseline.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        loss: DistillationLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        teacher: PreTrainedModel | None = None,
    ):
        super().__init__()
        if teacher is None and loss.alpha > 0:
            raise ValueError(f"distill.loss.alpha={loss.alpha} needs a teacher; use alpha=0 to train without one.")
        self.student, self.teacher, self.loss = student, teacher, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        # Checkpoints hold the student only (see on_save_checkpoint); the teacher comes from its path.
        self.strict_loading = False
        self.val_kd, self.val_ce, self.val_top1 = MeanMetric(), MeanMetric(), MeanMetric()

    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # no dropout in the teacher, ever
        return self

    def _forward(self, batch: dict[str, torch.Tensor]):
        inputs = model_inputs(batch)
        student_logits = self.student(**inputs).logits[:, :-1]
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits[:, :-1]
        labels = batch["labels"][:, 1:]  # logits at t predict the token at t + 1
        return self.loss(student_logits, labels, teacher_logits), student_logits, teacher_logits, labels

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out, *_ = self._forward(batch)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"Non-finite training loss ({out.loss.item()}) at step {self.global_step}: lower optimizer.lr, "
                "keep gradient clipping on (trainer.gradient_clip_val) or use fp32 (trainer.precision=32-true). "
                "The last checkpoint before this step is kept."
            )
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/ce", out.ce)
        if self.teacher is not None:
            self.log("train/kd", out.kd)
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out, student_logits, teacher_logits, labels = self._forward(batch)
        self.val_ce.update(out.ce, weight=out.num_tokens)
        self.log("val/ce", self.val_ce, prog_bar=True)
        if teacher_logits is not None:
            self.val_kd.update(out.kd, weight=out.num_tokens)
            mask = labels != self.loss.ignore_index
            agree = student_logits.argmax(-1)[mask] == teacher_logits.argmax(-1)[mask]
            self.val_top1.update(agree.float())
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
