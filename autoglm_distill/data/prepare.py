"""The run's data: generate the synthetic folder when configured (or reuse it), then the tokenized splits."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from autoglm_distill.data import synth
from autoglm_distill.data.episodes import EpisodeFormat, read_system_prompt
from autoglm_distill.data.phone import ChatEncoder, DataError, PhoneDataModule
from autoglm_distill.utils import rank_zero_logger

log = rank_zero_logger(__name__)


def prepare_data(cfg: DictConfig, wait_s: float = 1800.0) -> Path:
    """The data folder; generated first when ``data.generate`` is set (reused if already there). With several
    processes, rank 0 generates it and the others wait for it (torchrun and SLURM start them all at once)."""
    root = Path(cfg.data.path)
    if cfg.data.generate is not None:
        gen = cfg.data.generate
        if rank_zero_only.rank != 0:
            wait_for(root / synth.META_FILE, wait_s, f"rank 0 to generate the data in {root}")
        log.info("Generating synthetic phone tasks in %s (reused when the parameters match)", root)
        try:
            synth.generate(
                root,
                n_train=gen.n_train,
                n_val=gen.n_val,
                n_test=gen.n_test,
                seed=gen.seed,
                images=gen.images,
                image_size=tuple(gen.image_size),
                kind=gen.kind,
            )
        except FileExistsError as err:  # e.g. a folder from an older generator version: name the fix in Hydra terms
            raise DataError(
                f"{err}\nThe synthetic data is regenerated from its parameters, so nothing is lost by deleting that "
                f"folder (rm -r {root}); or keep it and generate elsewhere with data.path=<another folder>."
            ) from None
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


def episode_format(cfg: DictConfig) -> EpisodeFormat:
    """How the run renders episode lines (``data.system_prompt_file``, ``data.history_steps``,
    ``data.elements_in_text``)."""
    d = cfg.data
    return EpisodeFormat(read_system_prompt(d.system_prompt_file), d.history_steps, bool(d.elements_in_text))


def data_module(cfg: DictConfig, root: Path, tokenizer, image_processor, teacher_cache=None) -> PhoneDataModule:
    """The tokenized splits (with screenshots when ``image_processor`` is given, with cached teacher targets when
    ``teacher_cache`` is), set up."""
    encoder = ChatEncoder(tokenizer, image_processor, cfg.data.max_length)
    datamodule = PhoneDataModule(
        root,
        encoder,
        cfg.data.batch_size,
        cfg.data.num_workers,
        cfg.data.on_bad_example,
        cfg.seed,
        teacher_cache,
        episode_format(cfg),
    )
    datamodule.setup()
    return datamodule
