"""Sweeps: W&B grouping, and the report over a --multirun folder (table, JSON, chart; failed runs listed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from autoglm_distill import config as config_lib
from autoglm_distill.sweep_report import SweepError, main, report


def fake_run(folder: Path, overrides: list[str], status: str = "completed", exact: float = 0.0, val_ce=1.0) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    summary = {"status": status, "stages": {"distill": {"val/ce": val_ce, "steps": 400, "seconds": 10.0}}}
    if status == "completed":
        summary["eval"] = {"student": {"params": 1, "test": {"exact_match": exact}}}
    else:
        summary["error"] = "FloatingPointError: Non-finite training loss (nan) at step 7"
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path) -> Path:
    grid = [(t, a) for t in ("1.0", "2.0") for a in ("0.5", "1.0")]
    for job, (t, a) in enumerate(grid):
        overrides = [f"distill.loss.temperature={t}", f"distill.loss.alpha={a}", "recipe=demo_sweep"]
        status = "failed" if job == 3 else "completed"
        fake_run(tmp_path / str(job), overrides, status, exact=0.1 * (job + 1), val_ce=2.0 - 0.1 * job)
    return tmp_path


def test_report_tabulates_every_run_and_charts_the_completed_ones(sweep, capsys):
    result = report(sweep)
    assert result["swept"] == ["distill.loss.temperature", "distill.loss.alpha"]  # recipe= is the same in all
    rows = result["runs"]
    assert [(r["distill.loss.temperature"], r["distill.loss.alpha"], r["status"]) for r in rows] == [
        ("1.0", "0.5", "completed"),
        ("1.0", "1.0", "completed"),
        ("2.0", "0.5", "completed"),
        ("2.0", "1.0", "failed"),
    ]
    assert [r["test/student/exact_match"] for r in rows] == pytest.approx([0.1, 0.2, 0.3, None])
    assert rows[3]["error"].endswith("at step 7")
    markdown = (sweep / "sweep_report.md").read_text()
    assert markdown.count("| completed |") == 3 and "job 3: failed: FloatingPointError" in markdown
    assert (sweep / "sweep_report.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((sweep / "sweep_report.json").read_text())["chart"].endswith("sweep_report.png")
    assert "distill.loss.temperature" in capsys.readouterr().out


def test_report_on_another_metric_and_from_the_command_line(sweep, capsys):
    main([str(sweep), "--metric", "val/ce"])
    assert "Wrote" in capsys.readouterr().out
    rows = json.loads((sweep / "sweep_report.json").read_text())["runs"]
    assert [r["val/ce"] for r in rows] == pytest.approx([2.0, 1.9, 1.8, 1.7])


def test_report_on_a_folder_that_is_not_a_sweep_names_the_fix(tmp_path, capsys):
    with pytest.raises(SweepError, match="pass the folder a `--multirun` wrote"):
        report(tmp_path)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert "is not a folder" in capsys.readouterr().err


def demo_sweep_config(mode: RunMode, sweep_dir: Path, job: int):
    """The demo_sweep config as the job ``job`` of a sweep (or a single run) sees it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_lib.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["recipe=demo_sweep"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.sweep.dir, cfg.hydra.job.num = mode, str(sweep_dir), job
    HydraConfig().set_config(cfg)
    return cfg


def test_the_runs_of_one_sweep_share_a_wandb_group_and_are_named_by_job(tmp_path):
    sweep_dir = tmp_path / "multirun" / "demo_sweep" / "2026-11-24_10-00-00"
    cfg = demo_sweep_config(RunMode.MULTIRUN, sweep_dir, 3)
    assert cfg.logger.wandb.group == "demo_sweep-2026-11-24_10-00-00"
    assert cfg.logger.wandb.name == "demo_sweep-3"
    assert cfg.teacher.scratch.save_dir == f"{sweep_dir}/teacher"  # one teacher for the whole sweep
    assert dict(cfg.hydra.sweeper.params) == {"distill.loss.temperature": "1.0,2.0", "distill.loss.alpha": "0.5,1.0"}
    cfg = demo_sweep_config(RunMode.RUN, sweep_dir, 0)
    assert cfg.logger.wandb.group is None and cfg.logger.wandb.name == "demo_sweep"
