"""The distillation run, top to bottom: ``python -m autoglm_distill recipe=<name> [overrides]``.

1. data        generate the synthetic set (if configured), read and tokenize the splits
2. teacher     load with from_pretrained (hub id or folder), or train one here first (teacher=scratch_*)
3. student     build from a preset or load with from_pretrained; vocabularies must match
4. distill     Lightning fit: KD + hard-label loss; the student is saved to <run dir>/student
5. baseline    (optional) the same student on hard labels only, same steps and data
6. evaluate    greedy generation + action metrics, teacher-forced CE and top-1 agreement
7. export      ONNX, TFLite and Core ML student artifacts, each verified, into export/<run name>/ (export=none: off)
8. summary     <run dir>/summary.json and a table; the W&B run is finished even when a stage fails
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table
from transformers import AutoImageProcessor, AutoTokenizer

from autoglm_distill import config as config_lib
from autoglm_distill.compress.qat import qat_record
from autoglm_distill.compress.structured import SHAPE_KEYS, Shape, head_dim_of, prune_to, text_config
from autoglm_distill.data import synth
from autoglm_distill.data.phone import ChatEncoder, PhoneDataModule, corpus_texts
from autoglm_distill.evaluate import generate_answers, score_answers, teacher_forced
from autoglm_distill.export.exporter import data_goldens, export_student, settings_from_config
from autoglm_distill.export.storage import weight_sparsity
from autoglm_distill.losses import DistillationLoss
from autoglm_distill.models import (
    ModelLoadError,
    build_model,
    check_compatible,
    count_parameters,
    freeze,
    is_image_text,
    load_pretrained,
    resolve_dtype,
    vocab_size,
)
from autoglm_distill.module import DistillModule
from autoglm_distill.strategies import trained_student
from autoglm_distill.teacher_cache import TeacherCache, TeacherCacheError
from autoglm_distill.tokenizer import build_image_processor, train_glm_tokenizer
from autoglm_distill.utils import (
    install_secret_filter,
    masked_argv,
    rank_zero_logger,
    redact,
    redact_files,
    save_dir_atomic,
    write_json_atomic,
)

log = rank_zero_logger(__name__)


# --- stage helpers ---------------------------------------------------------------------------------


def prepare_data(cfg: DictConfig, wait_s: float = 1800.0) -> Path:
    """The data folder; generated first when ``data.generate`` is set (reused if already there). With several
    processes, rank 0 generates it and the others wait for it (torchrun and SLURM start them all at once)."""
    root = Path(cfg.data.path)
    if cfg.data.generate is not None:
        gen = cfg.data.generate
        if rank_zero_only.rank != 0:
            wait_for(root / synth.META_FILE, wait_s, f"rank 0 to generate the data in {root}")
        log.info("Generating synthetic phone tasks in %s (reused when the parameters match)", root)
        synth.generate(
            root,
            n_train=gen.n_train,
            n_val=gen.n_val,
            n_test=gen.n_test,
            seed=gen.seed,
            images=gen.images,
            image_size=tuple(gen.image_size),
        )
    return root


def wait_for(path: Path, timeout_s: float, what: str) -> None:
    """Block until ``path`` exists (another process is making it), failing after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Waited {timeout_s:.0f} s for {what} ({path} never appeared): check rank 0's log for its error."
            )
        time.sleep(1.0)


def start_loggers(cfg: DictConfig, prefix: str = "") -> list:
    """The configured experiment loggers, their metric names prefixed with ``prefix`` (one W&B run for all)."""
    return [instantiate(lg, prefix=prefix) for lg in (cfg.logger or {}).values()]


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


def data_module(cfg: DictConfig, root: Path, tokenizer, image_processor, teacher_cache=None) -> PhoneDataModule:
    """The tokenized splits (with screenshots when ``image_processor`` is given, with cached teacher targets when
    ``teacher_cache`` is), set up."""
    encoder = ChatEncoder(tokenizer, image_processor, cfg.data.max_length)
    datamodule = PhoneDataModule(
        root, encoder, cfg.data.batch_size, cfg.data.num_workers, cfg.data.on_bad_example, cfg.seed, teacher_cache
    )
    datamodule.setup()
    return datamodule


def fit(
    cfg: DictConfig,
    stage: str,
    student,
    datamodule: PhoneDataModule,
    loss: DistillationLoss,
    teacher=None,
    cache_temperature: float | None = None,
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


TABLE_COLUMNS = ["params", "action_type_acc", "tap_in_element", "exact_match", "parse_rate", "top1_agreement", "ce"]


def eval_rows(results: dict[str, dict], split: str) -> list[list[str]]:
    """One row of formatted cells per model: name, then TABLE_COLUMNS."""
    rows = []
    for name, r in results.items():
        m = r.get(split, {})
        rows.append([name, f"{r['params']:,}"] + [f"{m[c]:.3f}" if c in m else "-" for c in TABLE_COLUMNS[1:]])
    return rows


def report_tables(results: dict[str, dict], splits: list[str], out_dir: Path) -> None:
    """Print the eval table of every split and write it as Markdown to <run dir>/results.md."""
    markdown = []
    for split in splits:
        table = Table(title=f"autoglm_distill: {split} split")
        table.add_column("model")
        for c in TABLE_COLUMNS:
            table.add_column(c, justify="right")
        rows = eval_rows(results, split)
        for row in rows:
            table.add_row(*row)
        Console(width=140).print(table)
        header = ["model", *TABLE_COLUMNS]
        markdown += [f"**{split} split**", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        markdown += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    (out_dir / "results.md").write_text("\n".join(markdown))


# --- the run ---------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    """Run every stage of ``cfg``; returns the summary (also written to <run dir>/summary.json)."""
    config_lib.validate(cfg)
    out_dir = Path(cfg.paths.output_dir)
    install_secret_filter()
    if HydraConfig.initialized() and HydraConfig.get().output_subdir is not None:
        redact_files(out_dir / HydraConfig.get().output_subdir)  # Hydra's dump of the config and the overrides
    rank_zero = rank_zero_only.rank == 0  # several processes (trainer=ddp ...): only rank 0 writes files
    ckpt_path = resolve_ckpt(cfg.ckpt_path, out_dir)  # fail before any work when it is missing
    summary: dict[str, Any] = {"run_name": cfg.run_name, "status": "running", "stages": {}}
    summary_path = out_dir / "summary.json"
    pl.seed_everything(cfg.seed, workers=True)
    try:
        # The W&B run starts now with the config, so even a failed load is recorded.
        with masked_argv():
            for logger in start_loggers(cfg):
                logger.log_hyperparams(redact(OmegaConf.to_container(cfg, resolve=True)))
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
        teacher = None
        if cache is None:
            log.info("Instantiating teacher <%s> from %s", cfg.teacher.kind, teacher_path)
            teacher = freeze(
                load_pretrained(
                    str(teacher_path),
                    cfg.teacher.kind,
                    cfg.teacher.dtype,
                    cfg.teacher.trust_remote_code,
                    role="teacher",
                )
            )
        tokenizer = AutoTokenizer.from_pretrained(str(teacher_path))
        teacher_images = cache.images if cache is not None else is_image_text(teacher)
        image_processor = AutoImageProcessor.from_pretrained(str(teacher_path)) if teacher_images else None

        # 3. student (seeded here and again for the baseline: both start from the same weights)
        pl.seed_everything(cfg.seed, workers=True)
        # init=pruned_teacher scores the teacher on training batches encoded for the teacher
        calibration = (
            data_module(cfg, root, tokenizer, image_processor) if cfg.student.init == "pruned_teacher" else None
        )
        student = build_student(cfg, tokenizer, teacher, calibration)
        if cache is None:
            check_compatible(teacher, student, len(tokenizer))
        else:
            check_cache_fits(cache, student)
        use_images = teacher_images and is_image_text(student)
        datamodule = data_module(cfg, root, tokenizer, image_processor if use_images else None, cache)
        encoder = datamodule.encoder
        summary["data"] = {
            "path": str(root),
            "images": use_images,
            "examples": {s: len(d) for s, d in datamodule.splits.items()},
            "skipped": {s: [str(b) for b in bad] for s, bad in datamodule.bad_examples.items()},
        }
        teacher_params = cache.index["teacher"]["params"] if cache is not None else count_parameters(teacher)
        log.info(
            "Teacher %s params, student %s params (%.1fx smaller), images=%s",
            f"{teacher_params:,}",
            f"{count_parameters(student):,}",
            teacher_params / count_parameters(student),
            use_images,
        )

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
            hard = DistillationLoss(kind=loss.kind, temperature=loss.temperature, alpha=0.0)
            summary["stages"]["baseline"], baseline = fit(
                cfg,
                "baseline",
                baseline,
                datamodule,
                hard,
                save=lambda model: save_model(out_dir / "baseline", model, tokenizer, image_processor),
            )
            models["baseline"] = baseline
        if not rank_zero:  # the other processes only train; rank 0 evaluates, exports and writes the summary
            summary["status"] = "completed"
            return summary

        # 6. evaluate
        summary["eval"] = evaluate_models(cfg, models, teacher, encoder, datamodule, out_dir)
        report_tables(summary["eval"], list(cfg.eval.splits), out_dir)

        # 7. export
        if cfg.export.enabled:
            summary["export"] = export_stage(cfg, student, tokenizer, encoder, root, out_dir / "student")
        summary["status"] = "completed"
        return summary
    except BaseException as err:
        summary["status"] = "failed"
        summary["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        if rank_zero:
            summary["config"] = OmegaConf.to_container(cfg, resolve=True)
            write_json_atomic(summary_path, redact(summary))
            finish_wandb(summary)


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
    datamodule = data_module(cfg, root, tokenizer, image_processor)
    hard = DistillationLoss(alpha=0.0)
    metrics, _ = fit(
        cfg,
        "teacher_pretrain",
        model,
        datamodule,
        hard,
        max_steps=scratch.max_steps,
        lr=scratch.lr,
        warmup=scratch.warmup_steps,
        save=lambda trained: save_model(path, trained, tokenizer, image_processor),
    )
    return metrics


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
            "it (python -m autoglm_distill.cache_teacher) with this student config, or use an image-text student."
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


def evaluate_models(cfg, models, teacher, encoder, datamodule, out_dir: Path) -> dict:
    """Greedy-generation action metrics and teacher-forced metrics for every model on every eval split."""
    results: dict[str, dict] = {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, model in models.items():
        model.to(device)
        results[name] = {"params": count_parameters(model)}
        for split in cfg.eval.splits:
            data = datamodule.splits[split]
            if cfg.eval.limit is not None:
                data = data.select(range(min(cfg.eval.limit, len(data))))
            answers = generate_answers(
                model,
                encoder,
                data,
                datamodule.root,
                cfg.eval.batch_size,
                cfg.eval.max_new_tokens,
                desc=f"{name} on {split}",
            )
            metrics = score_answers(answers, data)
            metrics.update(
                teacher_forced(
                    model,
                    None if name == "teacher" or teacher is None else teacher.to(device),
                    encoder,
                    data,
                    datamodule.root,
                    cfg.eval.batch_size,
                )
            )
            results[name][split] = metrics
            write_json_atomic(
                out_dir / "predictions" / f"{name}_{split}.json",
                [{"id": i, "answer": a} for i, a in zip(data["id"], answers)],
            )
            log.info("%s on %s: %s", name, split, {k: round(v, 4) for k, v in metrics.items()})
    return results


def export_stage(cfg: DictConfig, student, tokenizer, encoder: ChatEncoder, root: Path, source: Path) -> dict:
    """Export the distilled student; golden prompts are the val split's, encoded as in training."""
    settings = settings_from_config(cfg.export)
    golden = data_goldens(root, encoder, limit=16 * settings.golden_prompts)
    log.info("Exporting the student to %s (%s)", cfg.export.dir, ", ".join(settings.formats))
    manifest = export_student(
        student,
        tokenizer,
        cfg.export.dir,
        settings,
        golden=golden,
        source=str(source),
        image_processor=encoder.image_processor,
    )
    rows = []
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


def finish_wandb(summary: dict) -> None:
    """Close the W&B run (if any) with the summary and the eval table, marked failed when the run failed."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:
        return
    for name, result in summary.get("eval", {}).items():
        for split, metrics in result.items():
            if isinstance(metrics, dict):
                wandb.run.summary.update({f"{split}/{name}/{k}": v for k, v in metrics.items()})
    if summary.get("eval"):
        columns = [
            "model",
            "split",
            "params",
            "action_type_acc",
            "tap_in_element",
            "exact_match",
            "top1_agreement",
        ]
        rows = [
            [n, s, r["params"], *(m.get(c) for c in columns[3:])]
            for n, r in summary["eval"].items()
            for s, m in r.items()
            if isinstance(m, dict)
        ]
        wandb.log({"eval/table": wandb.Table(columns=columns, data=rows)})
    export = summary.get("export")
    if export:
        columns = list(export["artifacts"][0])
        wandb.log({"export/table": wandb.Table(columns=columns, data=[list(a.values()) for a in export["artifacts"]])})
        chart = Path(export["dir"]) / "report.png"
        if chart.is_file():
            wandb.log({"export/report": wandb.Image(str(chart))})
    wandb.finish(exit_code=0 if summary["status"] == "completed" else 1)


config_lib.register_recipes()
config_lib.register_resolvers()


@hydra.main(config_path=str(config_lib.CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
