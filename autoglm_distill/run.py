"""The distillation run, top to bottom: ``python -m autoglm_distill recipe=<name> [overrides]``.

1. data        generate the synthetic set (if configured), read and tokenize the splits
2. teacher     load with from_pretrained (hub id or folder), or train one here first (teacher=scratch_*), or read its
               cached targets (distill.teacher=cache)
3. student     build from a preset or load with from_pretrained; vocabularies must match
4. distill     Lightning fit: KD + hard-label loss (on the student's own samples too, with distill.on_policy); the
               student is saved to <run dir>/student
5. baseline    (optional) the same student on hard labels only, same steps and data
6. evaluate    greedy generation + action metrics, teacher-forced CE and top-1 agreement
7. export      ONNX, TFLite and Core ML student artifacts, each verified, into export/<run name>/ (export=none: off)
8. summary     <run dir>/summary.json and a table; the W&B run is finished even when a stage fails
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from autoglm_distill import config as config_lib
from autoglm_distill.data.phone import PhoneDataModule, corpus_texts
from autoglm_distill.data.prepare import data_module, prepare_data
from autoglm_distill.evaluate import evaluate_models, report_tables
from autoglm_distill.export.exporter import data_goldens, export_student, settings_from_config
from autoglm_distill.models import (
    build_model,
    check_compatible,
    count_parameters,
    is_image_text,
    load_processors,
    load_teacher,
)
from autoglm_distill.on_policy import from_config as on_policy_from_config
from autoglm_distill.student import build_student, check_cache_fits, student_record
from autoglm_distill.teacher_cache import TeacherCache
from autoglm_distill.tokenizer import build_image_processor, train_glm_tokenizer
from autoglm_distill.tracking import tracked_run
from autoglm_distill.training import fit, hard_label_loss, resolve_ckpt, save_model
from autoglm_distill.utils import install_secret_filter, rank_zero_logger, redact_files
from autoglm_distill.validate import validate

log = rank_zero_logger(__name__)


def run(cfg: DictConfig) -> dict:
    """Run every stage of ``cfg``; returns the summary (also written to <run dir>/summary.json)."""
    validate(cfg)
    out_dir = Path(cfg.paths.output_dir)
    install_secret_filter()
    if HydraConfig.initialized() and HydraConfig.get().output_subdir is not None:
        redact_files(out_dir / HydraConfig.get().output_subdir)  # Hydra's dump of the config and the overrides
    ckpt_path = resolve_ckpt(cfg.ckpt_path, out_dir)  # fail before any work when it is missing
    pl.seed_everything(cfg.seed, workers=True)
    with tracked_run(cfg, out_dir / "summary.json") as summary:
        # 1. data
        root = prepare_data(cfg)

        # 2. teacher (and with it the tokenizer and image processor), or its cached targets
        cache = None
        if cfg.distill.teacher == "cache":
            cache = TeacherCache(cfg.distill.cache.dir)
            log.info("Training from the teacher cache %s (the teacher is not loaded)", cache.path)
            summary["teacher_cache"] = {
                k: cache.index[k] for k in ("k", "value_bits", "temperature", "bytes_per_token")
            }
        teacher_path = cache.path if cache is not None else cfg.teacher.path
        if teacher_path is None:
            teacher_path = Path(cfg.teacher.scratch.save_dir)
            if (teacher_path / "config.json").is_file():
                log.info("Reusing the teacher trained earlier: %s", teacher_path)
            else:
                summary["stages"]["teacher_pretrain"] = train_scratch_teacher(cfg, root, teacher_path)
        if cache is None:
            log.info("Instantiating teacher <%s> from %s", cfg.teacher.kind, teacher_path)
            teacher, tokenizer, image_processor = load_teacher(cfg.teacher, teacher_path)
            teacher_images = image_processor is not None
        else:  # the cache folder holds the teacher's tokenizer and image processor, not its weights
            teacher, teacher_images = None, cache.images
            tokenizer, image_processor = load_processors(teacher_path, teacher_images)

        # 3. student (seeded here and again for the baseline: both start from the same weights)
        pl.seed_everything(cfg.seed, workers=True)
        # init=pruned_teacher scores the teacher on training batches encoded for the teacher
        pruning = cfg.student.init == "pruned_teacher"
        calibration = data_module(cfg, root, tokenizer, image_processor) if pruning else None
        student = build_student(cfg, tokenizer, teacher, calibration)
        if cache is None:
            check_compatible(teacher, student, len(tokenizer))
        else:
            check_cache_fits(cache, student)
        use_images = teacher_images and is_image_text(student)
        datamodule = data_module(cfg, root, tokenizer, image_processor if use_images else None, cache)
        summary["data"] = {
            "path": str(root),
            "images": use_images,
            "examples": {s: len(d) for s, d in datamodule.splits.items()},
            "skipped": {s: [str(b) for b in bad] for s, bad in datamodule.bad_examples.items()},
        }
        teacher_params = cache.index["teacher"]["params"] if cache is not None else count_parameters(teacher)
        student_params = count_parameters(student)
        log.info(
            "Teacher %s params, student %s params (%.1fx smaller), images=%s",
            f"{teacher_params:,}", f"{student_params:,}", teacher_params / student_params, use_images,
        )  # fmt: skip

        # 4. distill
        log.info("Instantiating loss <%s>", cfg.distill.loss.kind)
        loss = instantiate(cfg.distill.loss)
        if cache is not None:
            loss.check_cache_temperature(cache.temperature)  # before training, not at its first step
        summary["stages"]["distill"], student = fit(
            cfg,
            "distill",
            student,
            datamodule,
            loss,
            teacher=teacher,
            cache_temperature=cache.temperature if cache is not None else None,
            on_policy=on_policy_from_config(cfg.distill.on_policy, tokenizer, cfg.seed),
            ckpt_path=ckpt_path,
            save=lambda model: save_model(out_dir / "student", model, tokenizer, image_processor),
        )
        log.info("Saved the distilled student to %s", out_dir / "student")
        summary["student"] = student_record(cfg, student)
        models = {"teacher": teacher, "student": student} if cfg.eval.teacher and teacher else {"student": student}

        # 5. baseline: same student architecture and seed, hard labels only
        if cfg.baseline:
            pl.seed_everything(cfg.seed, workers=True)
            baseline = build_student(cfg, tokenizer, teacher, calibration)
            summary["stages"]["baseline"], models["baseline"] = fit(
                cfg,
                "baseline",
                baseline,
                datamodule,
                hard_label_loss(cfg),
                save=lambda model: save_model(out_dir / "baseline", model, tokenizer, image_processor),
            )
        if rank_zero_only.rank != 0:  # the other processes only train; rank 0 evaluates, exports and writes
            return summary

        # 6. evaluate
        e = cfg.eval
        summary["eval"] = evaluate_models(
            models, teacher, datamodule, list(e.splits), out_dir, e.limit, e.batch_size, e.max_new_tokens,
            e.closed_loop,
        )  # fmt: skip
        report_tables(summary["eval"], list(e.splits), out_dir)

        # 7. export
        if cfg.export.enabled:
            summary["export"] = export_stage(cfg, student, tokenizer, datamodule, out_dir / "student")
    return summary


def train_scratch_teacher(cfg: DictConfig, root: Path, path: Path) -> dict:
    """Train a teacher here (stand-in for AutoGLM when it cannot be downloaded) and save it to ``path``."""
    scratch = cfg.teacher.scratch
    log.info("Training a tokenizer (vocab %d) on %s", scratch.tokenizer_vocab_size, root / "train.jsonl")
    tokenizer = train_glm_tokenizer(corpus_texts(root / "train.jsonl"), vocab_size=scratch.tokenizer_vocab_size)
    image_processor = None
    if scratch.arch == "glm4v":
        image_processor = build_image_processor(tuple(cfg.data.generate.image_size))
    log.info("Instantiating scratch teacher <%s>", scratch.arch)
    model = build_model(scratch.arch, OmegaConf.to_container(scratch.config), tokenizer)
    metrics, _ = fit(
        cfg,
        "teacher_pretrain",
        model,
        data_module(cfg, root, tokenizer, image_processor),
        hard_label_loss(cfg),
        max_steps=scratch.max_steps,
        lr=scratch.lr,
        warmup=scratch.warmup_steps,
        save=lambda trained: save_model(path, trained, tokenizer, image_processor),
    )
    return metrics


def export_stage(cfg: DictConfig, student, tokenizer, datamodule: PhoneDataModule, source: Path) -> dict:
    """Export the distilled student; golden prompts are the val split's, encoded as in training. Returns one summary
    row per artifact."""
    settings = settings_from_config(cfg.export)
    encoder = datamodule.encoder
    golden = data_goldens(datamodule.root, encoder, 16 * settings.golden_prompts, datamodule.episode_format)
    log.info("Exporting the student to %s (%s)", cfg.export.dir, ", ".join(settings.formats))
    manifest = export_student(
        student, tokenizer, cfg.export.dir, settings, golden, str(source), image_processor=encoder.image_processor
    )
    rows: list[dict[str, Any]] = []
    for artifact in manifest["artifacts"]:
        parity, latency = artifact["parity"], artifact["cpu_latency_ms"] or {}
        rows.append(
            {k: artifact[k] for k in ("format", "precision", "file", "bytes")}
            | {
                "passed": parity["passed"],
                "top1_agreement": parity.get("top1_agreement"),
                "prefill_ms": latency.get("prefill_ms_median"),
                "decode_ms": latency.get("decode_ms_median"),
            }
        )
    return {"dir": str(cfg.export.dir), "artifacts": rows}


config_lib.register_recipes()
config_lib.register_resolvers()


@hydra.main(config_path=str(config_lib.CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
