"""What a run records about itself: ``<run dir>/summary.json`` and the W&B run, written and finished even when a
stage fails (status ``failed`` with the error)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from autoglm_distill.evaluate import CLOSED_LOOP_COLUMNS, TABLE_COLUMNS
from autoglm_distill.utils import masked_argv, redact, write_json_atomic


def start_loggers(cfg: DictConfig, prefix: str = "") -> list:
    """The configured experiment loggers, their metric names prefixed with ``prefix`` (one W&B run for all)."""
    return [instantiate(lg, prefix=prefix) for lg in (cfg.logger or {}).values()]


@contextmanager
def tracked_run(cfg: DictConfig, summary_path: Path) -> Iterator[dict[str, Any]]:
    """Yield the run's summary dict; on exit it is ``completed`` or ``failed`` (the exception is re-raised), and rank
    0 writes it to ``summary_path`` with the resolved config and finishes the W&B run. The W&B run starts here with
    the config, so even a failed load is recorded. Secrets are masked in both."""
    summary: dict[str, Any] = {"run_name": cfg.run_name, "status": "running", "stages": {}}
    try:
        with masked_argv():
            for logger in start_loggers(cfg):
                logger.log_hyperparams(redact(OmegaConf.to_container(cfg, resolve=True)))
        yield summary
        summary["status"] = "completed"
    except BaseException as err:
        summary["status"] = "failed"
        summary["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        if rank_zero_only.rank == 0:  # several processes (trainer=ddp ...): only rank 0 writes files
            summary["config"] = OmegaConf.to_container(cfg, resolve=True)
            write_json_atomic(summary_path, redact(summary))
            finish_wandb(summary)


def finish_wandb(summary: dict) -> None:
    """Close the W&B run (if any) with the summary and the eval table, marked failed when the run failed."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:
        return
    evals = summary.get("eval") or {}
    for name, result in evals.items():
        for split, metrics in result.items():
            if isinstance(metrics, dict):
                wandb.run.summary.update({f"{split}/{name}/{k}": v for k, v in metrics.items()})
    if evals:
        columns = TABLE_COLUMNS + CLOSED_LOOP_COLUMNS  # None where not measured
        rows = [
            [name, split, result["params"], *(m.get(c) for c in columns[1:])]
            for name, result in evals.items()
            for split, m in result.items()
            if isinstance(m, dict)
        ]
        wandb.log({"eval/table": wandb.Table(columns=["model", "split", *columns], data=rows)})
    export = summary.get("export")
    if export:
        columns = list(export["artifacts"][0])
        wandb.log({"export/table": wandb.Table(columns=columns, data=[list(a.values()) for a in export["artifacts"]])})
        chart = Path(export["dir"]) / "report.png"
        if chart.is_file():
            wandb.log({"export/report": wandb.Image(str(chart))})
    wandb.finish(exit_code=0 if summary["status"] == "completed" else 1)
