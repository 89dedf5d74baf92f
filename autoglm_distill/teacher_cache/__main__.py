"""Run the teacher once over the data and write its top-k targets: ``python -m autoglm_distill.teacher_cache``.

Takes the same config and overrides as the training run it serves, e.g.::

    python -m autoglm_distill.teacher_cache recipe=phone_small distill.cache.k=128
    python -m autoglm_distill recipe=phone_small distill.teacher=cache

Every split is cached (train and val for the loss and its metrics, test for completeness), at the run's
``distill.loss.temperature`` and with screenshots exactly when the training run would use them. The cache folder
(``distill.cache.dir``) is written under a temporary name and moved into place when complete; an existing cache is
kept unless ``distill.cache.overwrite=true``. Prints bytes per token and writes ``index.json`` (see
`autoglm_distill.teacher_cache` for the format).
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.progress import Progress
from transformers import AutoConfig

from autoglm_distill import config as config_lib
from autoglm_distill.data import SPLITS
from autoglm_distill.data.phone import model_inputs
from autoglm_distill.data.prepare import data_module, prepare_data
from autoglm_distill.losses import auto_chunk_tokens
from autoglm_distill.models import count_parameters, is_image_text, load_teacher, vocab_size
from autoglm_distill.teacher_cache import CacheWriter, TeacherCacheError, fingerprint, top_k
from autoglm_distill.utils import rank_zero_logger, save_dir_atomic

log = rank_zero_logger(__name__)


def student_takes_images(cfg: DictConfig, teacher) -> bool:
    """Whether the training run's student is image-text (the run feeds screenshots only when both models are)."""
    s = cfg.student
    if s.path is not None:
        return getattr(AutoConfig.from_pretrained(s.path), "vision_config", None) is not None
    if s.init == "pruned_teacher":
        return is_image_text(teacher)
    return s.arch == "glm4v"


@torch.inference_mode()
def cache_split(teacher, loader, split: str, writer: CacheWriter, k: int, temperature: float, progress) -> None:
    """Teacher forward per batch; per example, the top-k of its supervised positions, a chunk of logits at a time."""
    device = next(teacher.parameters()).device
    task = progress.add_task(f"teacher on {split}", total=len(loader))
    decoder, head = teacher.model, teacher.get_output_embeddings()
    chunk = auto_chunk_tokens(head.weight.shape[0])
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        hidden = decoder(**model_inputs(batch)).last_hidden_state[:, :-1]
        mask = batch["labels"][:, 1:] != -100
        for row in range(hidden.shape[0]):
            states = hidden[row][mask[row]]
            parts = [top_k(head(states[i : i + chunk]), k, temperature) for i in range(0, len(states), chunk)]
            if not parts:  # an example with no supervised token
                parts = [(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))]
            ids, logp, rest = (torch.cat(p).cpu().numpy() for p in zip(*parts, strict=True))
            writer.add(split, ids, logp, rest)
        progress.advance(task)


def build_cache(cfg: DictConfig) -> dict:
    """Write the cache for ``cfg`` into ``cfg.distill.cache.dir``; returns its index."""
    settings = cfg.distill.cache
    out = Path(settings.dir)
    if (out / "index.json").is_file() and not settings.overwrite:
        raise TeacherCacheError(
            f"A teacher cache already exists at {out}: train from it (distill.teacher=cache), choose another "
            "distill.cache.dir, or replace it with distill.cache.overwrite=true."
        )
    if cfg.teacher.path is None:
        raise TeacherCacheError(
            "python -m autoglm_distill.teacher_cache needs a trained teacher, and teacher.path is null (a teacher "
            "trained inside a run): set teacher=pretrained teacher.path=<its folder>, e.g. outputs/demo/<time>/teacher."
        )
    root = prepare_data(cfg)
    teacher, tokenizer, image_processor = load_teacher(cfg.teacher, cfg.teacher.path)
    teacher.to("cuda" if torch.cuda.is_available() else "cpu")
    images = is_image_text(teacher) and student_takes_images(cfg, teacher)
    datamodule = data_module(cfg, root, tokenizer, image_processor if images else None)
    k, temperature = int(settings.k), float(cfg.distill.loss.temperature)
    if not 0 < k <= vocab_size(teacher):
        raise TeacherCacheError(
            f"distill.cache.k={k}: must be between 1 and the vocabulary size {vocab_size(teacher)}."
        )
    started = time.perf_counter()
    index: dict = {}

    def write(folder: Path) -> None:
        writer = CacheWriter(folder, value_bits=int(settings.value_bits), shard_tokens=int(settings.shard_tokens))
        with Progress() as progress:
            for split in SPLITS:
                loader = torch.utils.data.DataLoader(
                    datamodule.splits[split].with_format(None), batch_size=int(settings.batch_size),
                    collate_fn=datamodule.collate,
                )  # fmt: skip
                cache_split(teacher, loader, split, writer, k, temperature, progress)
        tokenizer.save_pretrained(folder)
        if image_processor is not None:
            image_processor.save_pretrained(folder)
        info = {
            "k": k,
            "temperature": temperature,
            "images": images,
            "vocab_size": vocab_size(teacher),
            "teacher": {"path": str(cfg.teacher.path), "params": count_parameters(teacher)},
            "data": {s: {"examples": len(d), "fingerprint": fingerprint(d)} for s, d in datamodule.splits.items()},
            "seconds": round(time.perf_counter() - started, 1),
        }
        index.update(writer.finish(info))

    save_dir_atomic(out, write)
    log.info(
        "Teacher cache %s: %d tokens, %.1f bytes/token (k=%d, %d-bit values, T=%s), %.0f s",
        out, index["tokens"], index["bytes_per_token"], k, index["value_bits"], temperature, index["seconds"],
    )  # fmt: skip
    return index


config_lib.register_recipes()
config_lib.register_resolvers()


@hydra.main(config_path=str(config_lib.CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    build_cache(cfg)


if __name__ == "__main__":
    main()
