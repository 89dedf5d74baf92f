"""Play a saved model through a split's episodes on the synthetic phone (`autoglm_distill.environment`):

    python -m autoglm_distill.play recipe=demo play.model=<run dir>/student

The data folder and its chat format (``data.*``), the splits (``eval.splits``), the batch and the answer length
(``eval.batch_size``, ``eval.max_new_tokens``) are the run's, so pass the overrides the model was trained with. Prints
one row per split and writes them to ``play.out``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from autoglm_distill import config as config_lib
from autoglm_distill.data.phone import ChatEncoder
from autoglm_distill.data.prepare import episode_format, prepare_data
from autoglm_distill.environment import closed_loop, read_episodes
from autoglm_distill.evaluate import generate_batch
from autoglm_distill.models import is_image_text, load_pretrained, load_processors
from autoglm_distill.utils import write_json_atomic
from autoglm_distill.validate import ConfigError


def play(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Closed-loop metrics of ``play.model`` on every split of ``eval.splits``, also written to ``play.out``."""
    folder = None if cfg.play.model is None else Path(cfg.play.model).expanduser()
    if folder is None or not (folder / "config.json").is_file():
        raise ConfigError(
            f"play.model={cfg.play.model!r} is not a saved model folder (no config.json there): pass "
            "play.model=<run dir>/student (or baseline, or teacher)."
        )
    root = prepare_data(cfg)
    model = load_pretrained(str(folder), "auto", dtype="float32", role="student")
    tokenizer, image_processor = load_processors(folder, is_image_text(model))
    answer = partial(
        generate_batch,
        model,
        ChatEncoder(tokenizer, image_processor, cfg.data.max_length),
        root=root,
        max_new_tokens=cfg.eval.max_new_tokens,
    )
    fmt = episode_format(cfg)
    results = {
        split: closed_loop(answer, read_episodes(root, split), fmt, cfg.eval.batch_size) for split in cfg.eval.splits
    }
    table = Table(title=f"closed loop: {cfg.play.model}")
    columns = ["episode_success", "progress", "actions_per_episode", "episodes"]
    for column in ["split", *columns]:
        table.add_column(column, justify="right")
    for split, metrics in results.items():
        table.add_row(split, *(f"{metrics[c]:.3f}" for c in columns))
    Console(width=140).print(table)
    write_json_atomic(Path(cfg.play.out), {"model": str(cfg.play.model), "data": str(root), "splits": results})
    return results


config_lib.register_recipes()
config_lib.register_resolvers()


@hydra.main(config_path=str(config_lib.CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    play(cfg)


if __name__ == "__main__":
    main()
