"""Where the Hydra config lives, the ``recipe`` group, and the resolvers the configs use (the checks run before
any work starts are in ``validate.py``)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

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
