"""Lightning callbacks the end-to-end tests add to real CLI runs (``+callbacks.<name>._target_=tests.helpers.<Class>``):
a process that kills itself, a weight that turns NaN, and a probe of what each DDP rank computed locally."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch


class KillAtStep(pl.Callback):
    """SIGKILL this process (kill -9: no cleanup, no finally blocks) when training reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonAtStep(pl.Callback):
    """Fill one student weight with NaN before training step ``step``: that step's loss is not finite."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.student.get_output_embeddings().weight.fill_(float("nan"))


class RankProbe(pl.Callback):
    """Each rank writes ``<out>/rank<r>.json``: its own (not reduced) training loss per step and its local sums of
    the validation CE (sum of token-weighted values and of weights) per validation run."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.train: dict[int, float] = {}
        self.val: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train[trainer.global_step] = float(outputs["loss"])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        metric = pl_module.val_ce
        self.val.append([float(metric.mean_value), float(metric.weight), trainer.global_step])

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"train": self.train, "val": self.val, "world_size": trainer.world_size}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
