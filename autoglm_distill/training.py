"""One training stage (teacher_pretrain, distill, baseline): its Trainer, callbacks and loggers, the fit, the save."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from autoglm_distill.data.phone import PhoneDataModule
from autoglm_distill.losses import DistillationLoss
from autoglm_distill.module import DistillModule
from autoglm_distill.on_policy import OnPolicy
from autoglm_distill.strategies import trained_student
from autoglm_distill.tracking import start_loggers
from autoglm_distill.utils import rank_zero_logger, save_dir_atomic

log = rank_zero_logger(__name__)


def stage_callbacks(cfg: DictConfig, stage: str) -> dict[str, DictConfig]:
    """The callback configs that apply to ``stage``: a callback with a ``stages`` list (the compression callbacks:
    distill only) is left out of the other stages; the key itself is not passed to the callback."""
    chosen = {}
    for name, cb_cfg in (cfg.callbacks or {}).items():
        if "_target_" not in cb_cfg:  # a recipe's settings for a callback that callbacks=[...] did not select
            log.info("callbacks.%s is not selected in callbacks=[...]: its settings are ignored", name)
            continue
        if "stages" in cb_cfg and stage not in cb_cfg.stages:
            continue
        resolved = OmegaConf.to_container(cb_cfg, resolve=True)
        resolved.pop("stages", None)
        chosen[name] = OmegaConf.create(resolved)
    return chosen


def make_trainer(cfg: DictConfig, stage: str, max_steps: int | None = None) -> pl.Trainer:
    """A Trainer for one stage: its own checkpoint folder, its metrics prefixed in the loggers."""
    callbacks = []
    for name, cb_cfg in stage_callbacks(cfg, stage).items():
        overrides = {"dirpath": str(Path(cb_cfg.dirpath) / stage)} if "dirpath" in cb_cfg else {}
        callbacks.append(instantiate(cb_cfg, **overrides))
        log.info("Instantiating callback %s <%s> for %s", name, cb_cfg._target_, stage)
    loggers = start_loggers(cfg, prefix="" if stage == "distill" else stage)
    overrides: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    if not callbacks:
        overrides["enable_checkpointing"] = False
    return instantiate(cfg.trainer, **overrides)


def hard_label_loss(cfg: DictConfig) -> DistillationLoss:
    """The configured loss with ``alpha=0`` (labels only): the baseline's and the scratch teacher's. It keeps the
    other settings, ``chunk_size`` among them, so every stage makes its loss the same way."""
    return instantiate(cfg.distill.loss, alpha=0.0)


def fit(
    cfg: DictConfig,
    stage: str,
    student,
    datamodule: PhoneDataModule,
    loss: DistillationLoss,
    teacher=None,
    cache_temperature: float | None = None,
    on_policy: OnPolicy | None = None,
    max_steps: int | None = None,
    lr: float | None = None,
    warmup: int | None = None,
    ckpt_path: str | None = None,
    save: Callable[[Any], None] | None = None,
) -> tuple[dict, Any]:
    """Train ``student`` (against ``teacher`` when given) for one stage; returns the stage's final metrics and the
    trained student (a new object when a callback pruned it to smaller tensors, or gathered whole from a sharded
    strategy). ``save(student)`` runs on rank 0 only, and every rank waits for it before going on."""
    optimizer = instantiate(cfg.optimizer, **({"lr": lr} if lr is not None else {}))
    scheduler = instantiate(cfg.scheduler, **({"num_warmup_steps": warmup} if warmup is not None else {}))
    module = DistillModule(
        student=student,
        teacher=teacher,
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        cache_temperature=cache_temperature,
        on_policy=on_policy,
    )
    trainer = make_trainer(cfg, stage, max_steps)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(
        steps=trainer.global_step, seconds=round(time.perf_counter() - started, 1), world_size=trainer.world_size
    )
    student = trained_student(trainer, module)
    if save is not None:
        if trainer.is_global_zero:
            save(student)
        trainer.strategy.barrier(f"{stage} saved")
    return metrics, student


def resolve_ckpt(ckpt_path: str | None, out_dir: Path) -> str | None:
    """The checkpoint to resume the distill stage from: ``last`` is this run folder's last one."""
    if ckpt_path is None:
        return None
    path = out_dir / "checkpoints" / "distill" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r}: no checkpoint at {path}. Rerun the same command with the same "
            "hydra.run.dir to resume its last checkpoint, or pass ckpt_path=<file.ckpt>."
        )
    return str(path)


def save_model(path: Path, model, tokenizer, image_processor) -> Path:
    """A Hugging Face folder (weights, tokenizer, image processor) loadable with from_pretrained."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if image_processor is not None:
            image_processor.save_pretrained(tmp)

    return save_dir_atomic(path, write)
