"""Shared fixtures: tiny synthetic data, a tiny GLM tokenizer, a composed config and one real smoke run, all made
locally.

Tests marked ``slow`` (full three-format exports, DDP, kill -9, multirun, the wheel build) are left out of the inner
loop, ``pytest -m "not slow"``; ``make test`` runs everything."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

# No hub and no W&B account here or in CI: fail fast offline instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from autoglm_distill import config as config_lib
from autoglm_distill.data import synth
from autoglm_distill.data.phone import corpus_texts
from autoglm_distill.tokenizer import build_image_processor, train_glm_tokenizer

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (56, 112)
# A one-layer GLM-4 text decoder: builds and runs in milliseconds.
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
}

config_lib.register_recipes()
config_lib.register_resolvers()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small synthetic data folder with screenshots: 12 + 3 + 3 episodes (~70 + 17 + 17 steps)."""
    return synth.generate(tmp_path_factory.mktemp("data") / "synth", 12, 3, 3, seed=0, image_size=IMAGE_SIZE)


@pytest.fixture(scope="session")
def tokenizer(data_dir):
    return train_glm_tokenizer(corpus_texts(data_dir / "train.jsonl"), vocab_size=400)


@pytest.fixture(scope="session")
def image_processor():
    return build_image_processor(IMAGE_SIZE)


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The run config exactly as the CLI composes it, with the run folder pointed at ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_lib.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.root_dir = str(output_dir)
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One real ``python -m autoglm_distill recipe=smoke`` run (scratch teacher, distill, baseline, eval), shared:
    CLI tests that need a trained teacher, its data or a run folder reuse this one instead of training their own."""
    run_dir = tmp_path_factory.mktemp("smoke")
    proc = run_cli(["recipe=smoke", f"hydra.run.dir={run_dir}"], cwd=run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def reuse_teacher(run_dir: Path) -> list[str]:
    """Overrides that load the teacher a smoke run trained (and its data) instead of training one again."""
    return [
        "teacher=pretrained",
        f"teacher.path={run_dir / 'teacher'}",
        f"data.path={run_dir / 'data'}",
        "data.generate=null",
    ]


def main_in_process(args: list[str], monkeypatch) -> int | str | None:
    """``python -m autoglm_distill <args>`` in this process (Hydra's CLI parsing and error printing included, without
    the interpreter start-up); returns the exit code, 0 when it returned."""
    from autoglm_distill import run as run_lib

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["autoglm_distill", *args])
    try:
        run_lib.main()
    except SystemExit as exit_:
        return exit_.code
    finally:
        GlobalHydra.instance().clear()
    return 0


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m autoglm_distill`` for real, offline, and return the finished process."""
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "autoglm_distill", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def logged(run_dir: Path, column: str) -> dict[int, str]:
    """step -> ``column`` exactly as logged (the CSV text) by every CSV log in the run dir (logger=csv)."""
    values = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get(column):
                values[int(row["step"])] = row[column]
    return values
