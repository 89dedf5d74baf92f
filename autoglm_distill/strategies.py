"""What the multi-GPU strategies need beyond Lightning's own: where FSDP puts the frozen teacher, and the trained
student as one whole model again after a sharded run (conf/trainer/{ddp,fsdp,deepspeed}.yaml)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

TEACHER_PLACEMENTS = ("shard", "replicate")


class DistillFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP, with the frozen teacher either sharded like the student (``teacher="shard"``: least memory,
    its weights are all-gathered layer by layer in each forward) or whole on every GPU (``teacher="replicate"``: FSDP
    leaves it alone, so its forward needs no communication; for a teacher that fits next to the sharded student).

    Args:
        teacher: ``shard`` or ``replicate``.
        **kwargs: everything `pytorch_lightning.strategies.FSDPStrategy` takes.
    """

    def __init__(self, teacher: str = "shard", **kwargs: Any):
        if teacher not in TEACHER_PLACEMENTS:
            raise ValueError(f"trainer.strategy.teacher={teacher!r}: use shard or replicate.")
        super().__init__(**kwargs)
        self.teacher = teacher

    def _setup_model(self, model: nn.Module) -> nn.Module:
        teacher = getattr(model, "teacher", None)
        if self.teacher == "replicate" and teacher is not None:
            self.kwargs["ignored_modules"] = [teacher]
            teacher.to(self.root_device)  # FSDP moves only the modules it manages
        return super()._setup_model(model)


def trained_student(trainer: pl.Trainer, module: pl.LightningModule) -> nn.Module:
    """The student after ``trainer.fit``, with whole tensors on rank 0: gathered from the shards under FSDP and
    ZeRO-3 (every rank must call this), the module itself otherwise."""
    strategy, student = trainer.strategy, module.student
    if isinstance(strategy, FSDPStrategy):
        state = strategy.lightning_module_state_dict()  # state_dict_type=full: the whole tensors, on rank 0
    elif isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(student.parameters())):
            state = {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
    else:
        return student
    if trainer.global_rank != 0:  # only rank 0 goes on to save, evaluate and export
        return student
    whole = type(student)(student.config).to(student.dtype)
    whole.load_state_dict({k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")})
    return whole
