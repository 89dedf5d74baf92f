"""DistillModule: the student learns, the teacher never changes and never enters a checkpoint."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch

from autoglm_distill.data.phone import ChatEncoder, PhoneDataModule
from autoglm_distill.losses import DistillationLoss
from autoglm_distill.models import build_model, freeze
from autoglm_distill.module import DistillModule

from .conftest import TINY_TEXT as TEXT


def make_module(tokenizer, teacher: bool = True, alpha: float = 0.5) -> DistillModule:
    torch.manual_seed(0)
    return DistillModule(
        student=build_model("glm4", TEXT, tokenizer),
        teacher=freeze(build_model("glm4", {**TEXT, "hidden_size": 48}, tokenizer)) if teacher else None,
        loss=DistillationLoss(alpha=alpha),
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
    )


def test_fit_trains_the_student_only_and_checkpoints_exclude_the_teacher(tokenizer, data_dir, tmp_path):
    module = make_module(tokenizer)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    dm = PhoneDataModule(data_dir, ChatEncoder(tokenizer, None, 1024), batch_size=8)
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
        val_check_interval=3,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert not module.teacher.training
    for k, v in module.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])
    assert any(not torch.equal(v, student_before[k]) for k, v in module.student.state_dict().items())
    for key in ("train/loss", "train/kd", "train/ce", "val/kd", "val/ce", "val/top1_agreement"):
        assert key in trainer.callback_metrics
    ckpt_path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt_path)
    state = torch.load(ckpt_path, weights_only=False)["state_dict"]
    assert state and all(k.startswith("student.") for k in state)


def test_no_teacher_needs_alpha_zero(tokenizer):
    with pytest.raises(ValueError, match="needs a teacher"):
        make_module(tokenizer, teacher=False, alpha=0.5)
    assert make_module(tokenizer, teacher=False, alpha=0.0).teacher is None


def test_non_finite_loss_stops_with_the_step(tokenizer, data_dir):
    module = make_module(tokenizer, teacher=False, alpha=0.0)
    with torch.no_grad():
        module.student.lm_head.weight.fill_(float("nan"))
    batch = next(iter(PhoneDataModule(data_dir, ChatEncoder(tokenizer, None, 1024), batch_size=2).train_dataloader()))
    with pytest.raises(FloatingPointError, match="Non-finite training loss .* at step 0"):
        module.training_step(batch, 0)
