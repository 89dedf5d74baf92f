"""Where the Hydra config lives, the ``recipe`` group, and the checks run before any work starts."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

_PACKAGE_DIR = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    """``conf/`` and ``recipes/`` sit at the repo top level, and inside the package in a built wheel."""
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"autoglm_distill cannot find its {name}/ folder next to {_PACKAGE_DIR}")


CONF_DIR = _find("conf")
RECIPES_DIR = _find("recipes")


def register_recipes() -> list[str]:
    """Register every ``recipes/*.yaml`` as an option of the group ``recipe`` (package ``_global_``).

    The group is not optional, so ``recipe=typo`` fails with Hydra's list of the recipes.
    """
    store = ConfigStore.instance()
    names = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


def best_precision() -> str:
    """bf16 autocast on a GPU that has it, fp32 otherwise."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def export_name(student: str) -> str:
    """Export folder name for a student folder: the run's ``<name>_<time>`` for ``outputs/<name>/<time>/student``,
    else the folder's own name."""
    path = Path(str(student)).resolve()
    if path.name in ("student", "baseline") and path.parent.parent.name:
        return f"{path.parent.parent.name}_{path.parent.name}" + ("_baseline" if path.name == "baseline" else "")
    return path.name


def _sweep_job():
    """Hydra's config of this job when it is one run of a ``--multirun`` sweep, else None."""
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    return hydra_cfg if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN else None


def sweep_group(run_name: str) -> str | None:
    """The W&B group of a run: ``<run name>-<sweep folder>`` for every run of one ``--multirun`` sweep, else none."""
    job = _sweep_job()
    return f"{run_name}-{Path(job.sweep.dir).name}" if job else None


def job_label(run_name: str) -> str:
    """The W&B name of a run: the run name, in a sweep followed by the job number (its folder in the sweep dir)."""
    job = _sweep_job()
    return f"{run_name}-{job.job.num}" if job else run_name


def register_resolvers() -> None:
    resolvers = (
        ("best_precision", best_precision),
        ("export_name", export_name),
        ("sweep_group", sweep_group),
        ("job_label", job_label),
    )
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


class ConfigError(ValueError):
    """The run's config is inconsistent; the message lists every problem and its fix."""


def validate(cfg: DictConfig) -> None:
    """Check the whole config before anything is loaded; report all problems at once."""
    problems = []
    if cfg.teacher.path is None and cfg.teacher.scratch is None:
        problems.append(
            "teacher.path is null and the teacher has no `scratch` section: set teacher.path=<hub id or "
            "folder>, or choose a teacher trained here (teacher=scratch_text)."
        )
    if cfg.teacher.kind not in ("image_text", "causal_lm", "auto"):
        problems.append(f"teacher.kind={cfg.teacher.kind!r}: use image_text, causal_lm or auto.")
    if cfg.student.path is None and cfg.student.arch not in ("glm4v", "glm4"):
        problems.append(
            f"student.arch={cfg.student.arch!r}: use glm4v or glm4, or load one with student.path=<folder>."
        )
    if cfg.student.init not in ("random", "pruned_teacher"):
        problems.append(f"student.init={cfg.student.init!r}: use random or pruned_teacher.")
    if cfg.student.init == "pruned_teacher" and cfg.student.path is not None:
        problems.append(
            "student.init=pruned_teacher builds the student from the teacher, but student.path is set too: "
            "drop student.path (student=<preset>) or use student.init=random."
        )
    callbacks = {name for name, cb in (cfg.get("callbacks") or {}).items() if "_target_" in cb}  # selected ones
    if "sparsity" in callbacks and callbacks & {"prune_structured", "qat"}:
        problems.append(
            "callbacks: sparsity does not combine with prune_structured or qat yet (its masks live on the layers "
            "those callbacks replace): choose callbacks=[default,sparsity] alone, or drop sparsity."
        )
    if {"prune_structured", "qat"} <= callbacks:
        last_prune, qat_start = max(cfg.callbacks.prune_structured.schedule), cfg.callbacks.qat.start_fraction
        if last_prune >= qat_start:
            problems.append(
                f"callbacks.prune_structured.schedule ends at {last_prune} but callbacks.qat.start_fraction is "
                f"{qat_start}: prune before QAT starts (e.g. schedule=[0.2,0.4] with start_fraction=0.7)."
            )
    if cfg.data.on_bad_example not in ("fail", "skip"):
        problems.append(f"data.on_bad_example={cfg.data.on_bad_example!r}: use fail or skip.")
    generate = cfg.data.get("generate")
    missing = {"n_train", "n_val", "n_test", "seed", "images", "image_size"} - set(generate or {})
    if generate is not None and missing:
        problems.append(
            f"data.generate lacks {sorted(missing)} (a recipe set only part of it?): to use your own data "
            "add data.generate=null, else give the missing keys."
        )
    if cfg.distill.teacher not in ("model", "cache"):
        problems.append(f"distill.teacher={cfg.distill.teacher!r}: use model or cache.")
    if cfg.distill.teacher == "cache" and cfg.student.init == "pruned_teacher":
        problems.append(
            "student.init=pruned_teacher needs the teacher's weights, which distill.teacher=cache never loads: "
            "use student.init=random, or distill.teacher=model."
        )
    if not 1 <= cfg.distill.cache.value_bits <= 16:
        problems.append(f"distill.cache.value_bits={cfg.distill.cache.value_bits}: use 4 to 8 (at most 16).")
    loss = cfg.distill.loss
    if not 0.0 <= loss.alpha <= 1.0:
        problems.append(f"distill.loss.alpha={loss.alpha}: must lie in [0, 1].")
    if loss.temperature <= 0:
        problems.append(f"distill.loss.temperature={loss.temperature}: must be > 0.")
    unknown = set(cfg.eval.splits) - {"train", "val", "test"}
    if unknown:
        problems.append(f"eval.splits has {sorted(unknown)}: choose from train, val, test.")
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps <= 0:
        problems.append("trainer.max_steps must be a positive number of optimizer steps.")
    export = cfg.get("export")
    if export is not None and export.enabled:
        unknown_formats = set(export.formats) - {"onnx", "tflite", "coreml"}
        if unknown_formats:
            problems.append(f"export.formats has {sorted(unknown_formats)}: choose from onnx, tflite, coreml.")
        if export.max_context <= export.max_new_tokens:
            problems.append(
                f"export.max_context={export.max_context} must exceed export.max_new_tokens={export.max_new_tokens}."
            )
    if problems:
        raise ConfigError("Invalid config:\n" + "\n".join(f"  - {p}" for p in problems))
