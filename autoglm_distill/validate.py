"""The checks a run makes before any work starts: every problem in the config at once, each with its fix.

Components check their own arguments: the loss, the export settings and every selected callback are built here
(cheap objects: no weights, no data) and their errors collected under their config key, so each of those rules
lives once, in the class that needs it. What is checked here is what no single object owns: choices between
config groups, rules across fields, and names that select a code path.
"""

from __future__ import annotations

from collections.abc import Callable

from hydra.utils import instantiate
from omegaconf import DictConfig

from autoglm_distill.data import SPLITS, synth
from autoglm_distill.data.phone import ON_BAD_EXAMPLE
from autoglm_distill.data.prepare import episode_format
from autoglm_distill.export.exporter import settings_from_config
from autoglm_distill.models import ARCHS, LOAD_KINDS
from autoglm_distill.on_policy import OnPolicy
from autoglm_distill.training import stage_callbacks

GENERATE_KEYS = {"n_train", "n_val", "n_test", "seed", "images", "image_size", "kind"}


class ConfigError(ValueError):
    """The run's config is inconsistent; the message lists every problem and its fix."""


def validate(cfg: DictConfig) -> None:
    """Check the whole config before anything is loaded; raise one ``ConfigError`` listing every problem."""
    problems = component_problems(cfg) + choice_problems(cfg) + cross_field_problems(cfg)
    if problems:
        raise ConfigError("Invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def _built(key: str, make: Callable[[], object]) -> list[str]:
    """``[]`` when ``make()`` builds, else the reason it refused, under ``key``."""
    try:
        make()
    except Exception as err:  # noqa: BLE001 - every refusal is reported, whatever its type
        reason = err.__cause__ or err  # hydra.utils.instantiate wraps the constructor's error
        return [f"{key}: {reason}"]
    return []


def component_problems(cfg: DictConfig) -> list[str]:
    """What the loss, the episode format, the export settings and the selected callbacks refuse, each under its
    config key."""
    problems = _built("distill.loss", lambda: instantiate(cfg.distill.loss))
    problems += _built("data", lambda: episode_format(cfg))
    p = cfg.distill.on_policy
    problems += _built(
        "distill.on_policy",
        lambda: OnPolicy(p.lmbda, p.seq_kd, p.temperature, p.max_new_tokens, 0, 0, start_step=p.start_step),
    )
    export = cfg.get("export")
    if export is not None and export.enabled:
        problems += _built("export", lambda: settings_from_config(export))
    for name, cb_cfg in stage_callbacks(cfg, "distill").items():  # every callback runs in the distill stage
        problems += _built(f"callbacks.{name}", lambda cb_cfg=cb_cfg: instantiate(cb_cfg))
    return problems


def choice_problems(cfg: DictConfig) -> list[str]:
    """Names that select a code path, checked against the lists the code itself uses."""
    problems = []
    if cfg.teacher.kind not in (*LOAD_KINDS, "auto"):
        problems.append(f"teacher.kind={cfg.teacher.kind!r}: use {', '.join(LOAD_KINDS)} or auto.")
    if cfg.student.path is None and cfg.student.arch not in ARCHS:
        problems.append(
            f"student.arch={cfg.student.arch!r}: use {' or '.join(ARCHS)}, or load one with student.path=<folder>."
        )
    if cfg.student.init not in ("random", "pruned_teacher"):
        problems.append(f"student.init={cfg.student.init!r}: use random or pruned_teacher.")
    if cfg.data.on_bad_example not in ON_BAD_EXAMPLE:
        problems.append(f"data.on_bad_example={cfg.data.on_bad_example!r}: use {' or '.join(ON_BAD_EXAMPLE)}.")
    if cfg.distill.teacher not in ("model", "cache"):
        problems.append(f"distill.teacher={cfg.distill.teacher!r}: use model or cache.")
    if not 1 <= cfg.distill.cache.value_bits <= 16:
        problems.append(f"distill.cache.value_bits={cfg.distill.cache.value_bits}: use 4 to 8 (at most 16).")
    unknown = set(cfg.eval.splits) - set(SPLITS)
    if unknown:
        problems.append(f"eval.splits has {sorted(unknown)}: choose from {', '.join(SPLITS)}.")
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps <= 0:
        problems.append("trainer.max_steps must be a positive number of optimizer steps.")
    return problems


def cross_field_problems(cfg: DictConfig) -> list[str]:
    """Settings that are fine alone but do not go together."""
    problems = []
    if cfg.teacher.path is None and cfg.teacher.scratch is None:
        problems.append(
            "teacher.path is null and the teacher has no `scratch` section: set teacher.path=<hub id or "
            "folder>, or choose a teacher trained here (teacher=scratch_text)."
        )
    if cfg.student.init == "pruned_teacher" and cfg.student.path is not None:
        problems.append(
            "student.init=pruned_teacher builds the student from the teacher, but student.path is set too: "
            "drop student.path (student=<preset>) or use student.init=random."
        )
    if cfg.distill.teacher == "cache" and cfg.student.init == "pruned_teacher":
        problems.append(
            "student.init=pruned_teacher needs the teacher's weights, which distill.teacher=cache never loads: "
            "use student.init=random, or distill.teacher=model."
        )
    on_policy = cfg.distill.on_policy
    if cfg.distill.teacher == "cache" and (on_policy.lmbda > 0 or on_policy.seq_kd):
        problems.append(
            "distill.on_policy needs the live teacher to score the answers it samples, and a cache cannot score "
            "tokens it never saw: use distill.teacher=model, or distill.on_policy.lmbda=0 "
            "distill.on_policy.seq_kd=false."
        )
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if (on_policy.lmbda > 0 or on_policy.seq_kd) and ("FSDP" in target or "DeepSpeed" in target):
        problems.append(
            "distill.on_policy samples with generate, which needs the whole model on each GPU; under sharded "
            f"strategies ({target.rsplit('.', 1)[-1]}) that is not built or tested yet: use trainer=ddp, or "
            "distill.on_policy.lmbda=0 distill.on_policy.seq_kd=false."
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
    generate = cfg.data.get("generate")
    missing = GENERATE_KEYS - set(generate or {})
    if generate is not None and missing:
        problems.append(
            f"data.generate lacks {sorted(missing)} (a recipe set only part of it?): to use your own data "
            "add data.generate=null, else give the missing keys."
        )
    if generate is not None and "kind" in generate and generate.kind not in synth.KINDS:
        problems.append(
            f"data.generate.kind={generate.kind!r} is not a synthetic data kind: use one of {', '.join(synth.KINDS)}."
        )
    return problems
