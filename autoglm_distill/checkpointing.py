"""Crash-safe checkpoints: written atomically, loaded without unpickling code, and carrying every rank's RNG state so
that a run resumed with ``ckpt_path=last`` continues exactly as if it had never stopped.

The position in the data is Lightning's part: the training loader is a ``StatefulDataLoader`` whose state Lightning
saves in the checkpoint and restores on resume (see `autoglm_distill.data.phone.PhoneDataModule`).
"""

from __future__ import annotations

import pickle
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback

from autoglm_distill.utils import rank_zero_logger, write_file_atomic

log = rank_zero_logger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded safely; the message says what to do."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint format, written to a temporary file in the same folder, fsynced and renamed over
    the old one: a kill -9 in the middle of a save leaves the previous checkpoint whole. Loads refuse pickled code
    (``weights_only=True``): a checkpoint can only carry tensors and plain Python values."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        write_file_atomic(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path} holds pickled Python objects besides tensors, and checkpoints load with weights_only=True "
                "so that a file cannot run code. Resume only from checkpoints this tool wrote (ckpt_path=last); "
                f"to start from other weights, save them with save_pretrained and set student.path. ({err})"
            ) from err


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


class ResumeRng(Callback):
    """Saves every rank's RNG states with each checkpoint and puts them back just before the first training step
    after a resume, so dropout and anything else random continue as in an uninterrupted run with the same seed."""

    def __init__(self) -> None:
        self._to_restore: list[dict] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank when a checkpoint is made; rank 0 writes the file, so it carries all ranks' states.
        states = [rng_state()]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, rng_state())
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict["ranks"]

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._to_restore is None:
            return
        states, self._to_restore = self._to_restore, None
        if len(states) != trainer.world_size:
            log.warning(
                "The checkpoint was written by %d processes, this run has %d: random streams (dropout) will not "
                "continue exactly as before; resume with the same number of devices for an exact continuation.",
                len(states),
                trainer.world_size,
            )
        set_rng_state(states[trainer.global_rank % len(states)])
