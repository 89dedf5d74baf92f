"""Crash safety: kill -9 mid-training and resume to the same final metrics, a non-finite loss, checkpoint files."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from autoglm_distill.checkpointing import AtomicCheckpointIO, CheckpointError

from .conftest import logged, read_summary, run_cli

ROOT = Path(__file__).resolve().parents[1]  # the CLI runs from here so that it can import tests.helpers
# 8 steps over 6 batches per epoch, last.ckpt every 2 steps, dropout on so that the RNG state matters too.
RUN = [
    "recipe=smoke",
    "baseline=false",
    "eval.teacher=false",
    "logger=csv",
    "trainer.max_steps=8",
    "+student.config.text_config.attention_dropout=0.3",
]


def final_metrics(summary: dict) -> dict:
    distill = {k: v for k, v in summary["stages"]["distill"].items() if k != "seconds"}
    return {"distill": distill, "eval": summary["eval"]}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run (it also trains the teacher that the crashed runs load)."""
    run_dir = tmp_path_factory.mktemp("straight")
    proc = run_cli([*RUN, f"hydra.run.dir={run_dir}"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_kill_9_mid_training_then_ckpt_path_last_ends_with_the_same_metrics(straight, tmp_path):
    crashed = tmp_path / "crashed"
    same = [*RUN, "teacher=pretrained", f"teacher.path={straight / 'teacher'}", f"hydra.run.dir={crashed}"]

    # The process kills itself with SIGKILL as step 6 starts: no exception handling, no summary, no cleanup.
    proc = run_cli([*same, "+callbacks.kill._target_=tests.helpers.KillAtStep", "+callbacks.kill.step=5"], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    assert not (crashed / "summary.json").exists()
    last = crashed / "checkpoints" / "distill" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert not list(last.parent.glob(".*tmp")), "a half-written checkpoint was left behind"

    proc = run_cli([*same, "ckpt_path=last"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
    resumed = logged(crashed, "train/loss")
    assert min(step for step in resumed if step >= 4) == 4  # the CSV row of step 4 is the 5th step: resumed at 4
    # Every step after the resume, and every final number, is bit-for-bit the uninterrupted run's.
    expected = logged(straight, "train/loss")
    assert [resumed[s] for s in range(4, 8)] == [expected[s] for s in range(4, 8)]
    assert final_metrics(read_summary(crashed)) == final_metrics(read_summary(straight))
    assert read_summary(crashed)["stages"]["distill"]["steps"] == 8


@pytest.mark.slow
def test_resume_without_the_rng_state_would_not_be_exact(straight, tmp_path):
    """The check above can fail: without the ResumeRng callback the dropout masks after the resume differ."""
    crashed = tmp_path / "crashed"
    same = [*RUN, "~callbacks.resume_rng", "teacher=pretrained", f"teacher.path={straight / 'teacher'}"]
    kill = ["+callbacks.kill._target_=tests.helpers.KillAtStep", "+callbacks.kill.step=5"]
    assert run_cli([*same, *kill, f"hydra.run.dir={crashed}"], cwd=ROOT).returncode == -signal.SIGKILL
    assert run_cli([*same, "ckpt_path=last", f"hydra.run.dir={crashed}"], cwd=ROOT).returncode == 0
    assert logged(crashed, "train/loss")[4] != logged(straight, "train/loss")[4]


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(straight, tmp_path):
    proc = run_cli(
        [
            *RUN,
            "teacher=pretrained",
            f"teacher.path={straight / 'teacher'}",
            "+callbacks.nan._target_=tests.helpers.PoisonAtStep",
            "+callbacks.nan.step=3",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "Non-finite training loss (nan) at step 3" in proc.stderr
    summary = read_summary(tmp_path)
    assert summary["status"] == "failed" and "at step 3" in summary["error"]
    checkpoint = torch.load(tmp_path / "checkpoints" / "distill" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


class NotATensor:
    pass


def test_a_checkpoint_holding_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_an_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 2, "w": torch.ones(3)}, path)

    def dies_half_way(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 4, "w": torch.zeros(3)}, path)
    assert io.load_checkpoint(path)["global_step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
