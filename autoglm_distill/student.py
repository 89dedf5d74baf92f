"""The student: loaded (``student.path``), a fresh preset, or the teacher pruned to the preset's shape; checks that
it fits the teacher cache; and the record of what it became."""

from __future__ import annotations

import itertools
from dataclasses import asdict

from omegaconf import DictConfig, OmegaConf

from autoglm_distill.compress.structured import SHAPE_KEYS, Shape, prune_to
from autoglm_distill.data.phone import PhoneDataModule
from autoglm_distill.models import (
    ModelLoadError,
    build_model,
    count_parameters,
    head_dim_of,
    is_image_text,
    load_pretrained,
    qat_record,
    resolve_dtype,
    text_config,
    vocab_size,
    weight_sparsity,
)
from autoglm_distill.teacher_cache import TeacherCache, TeacherCacheError
from autoglm_distill.utils import rank_zero_logger

log = rank_zero_logger(__name__)


def build_student(cfg: DictConfig, tokenizer, teacher=None, datamodule: PhoneDataModule | None = None):
    """The student: loaded (student.path), a fresh preset, or (student.init=pruned_teacher) a copy of the teacher
    pruned to the preset's shape, its heads, channels and layers chosen on calibration batches."""
    s = cfg.student
    if s.path is not None:
        log.info("Instantiating student from %s", s.path)
        return load_pretrained(s.path, "auto", s.dtype, s.trust_remote_code, role="student")
    if s.init == "pruned_teacher":
        target = student_shape(s, teacher)
        log.info("Instantiating student by pruning the teacher to %s", target)
        batches = itertools.islice(datamodule.train_dataloader(), s.calibration_batches)
        return prune_to(teacher, target, batches).requires_grad_(True).train().to(resolve_dtype(s.dtype))
    log.info("Instantiating student <%s> from preset", s.arch)
    return build_model(s.arch, OmegaConf.to_container(s.config), tokenizer).to(resolve_dtype(s.dtype))


def check_cache_fits(cache: TeacherCache, student) -> None:
    """The cached targets must be over the student's vocabulary, and (with screenshots) for an image-text student."""
    if cache.index["vocab_size"] != vocab_size(student):
        raise ModelLoadError(
            f"The teacher cache {cache.path} is over a vocabulary of {cache.index['vocab_size']} tokens, the student "
            f"has {vocab_size(student)} logits: the student must use the cached teacher's tokenizer."
        )
    if cache.images and not is_image_text(student):
        raise TeacherCacheError(
            f"The teacher cache {cache.path} was written with screenshots, but this student reads text only: rebuild "
            "it (python -m autoglm_distill.teacher_cache) with this student config, or use an image-text student."
        )


def student_shape(s: DictConfig, teacher) -> Shape:
    """The shape student.init=pruned_teacher prunes the teacher to: the student preset's text dimensions."""
    preset = OmegaConf.to_container(s.config)
    text = preset.get("text_config", preset)
    teacher_arch = "glm4v" if is_image_text(teacher) else "glm4"
    problems = [
        f"student.config{'.text_config' if s.arch == 'glm4v' else ''} lacks {k}" for k in SHAPE_KEYS if k not in text
    ]
    if s.arch != teacher_arch:
        problems.append(
            f"student.arch={s.arch} but the teacher is {teacher_arch}: pruning keeps the teacher's architecture"
        )
    if "head_dim" in text and text["head_dim"] != head_dim_of(text_config(teacher)):
        problems.append(
            f"student head_dim={text['head_dim']} but the teacher's is {head_dim_of(text_config(teacher))}: "
            "pruning keeps head_dim, so set the student's to the teacher's"
        )
    if problems:
        raise ModelLoadError(
            "student.init=pruned_teacher cannot prune this teacher to the student preset: "
            + "; ".join(problems)
            + ". Or use student.init=random."
        )
    ignored = sorted(set(text) - set(SHAPE_KEYS) - {"head_dim"}) + sorted(set(preset) - {"text_config"} - set(text))
    if ignored:
        log.warning("student.init=pruned_teacher keeps the teacher's values of %s (set in student.config)", ignored)
    return Shape(**{k: int(text[k]) for k in SHAPE_KEYS})


def student_record(cfg: DictConfig, student) -> dict:
    """What the distilled student became: size, shape, how it started, and the compression it carries."""
    record = {"params": count_parameters(student), "init": cfg.student.init if cfg.student.path is None else "loaded"}
    if hasattr(student.model, "layers") or hasattr(student.model, "language_model"):
        record["shape"] = asdict(Shape.of(student))
    record["qat"] = qat_record(student)
    record["weight_sparsity"] = weight_sparsity(student)
    return record
