"""Several processes: a real 2-process DDP run on CPU (gloo), and the FSDP / DeepSpeed configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.utils import instantiate
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.glm4.modeling_glm4 import Glm4DecoderLayer
from transformers.models.glm4v.modeling_glm4v import Glm4vTextDecoderLayer, Glm4vVisionBlock

from autoglm_distill.strategies import DistillFSDPStrategy

from .conftest import compose_config, logged, read_summary, run_cli


def run_ddp(run_dir: Path, *overrides: str) -> None:
    """The smoke recipe on 2 CPU processes (gloo), CSV logs, no baseline."""
    args = ["recipe=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv"]
    args += ["baseline=false", *overrides, f"hydra.run.dir={run_dir}"]
    # The child processes import tests.helpers from the repository root.
    proc = run_cli(args, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, Path]:
    run_dir, probe = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("probe")
    run_ddp(run_dir, "+callbacks.probe._target_=tests.helpers.RankProbe", f"+callbacks.probe.out={probe}")
    return run_dir, probe


@pytest.mark.slow
def test_ddp_reduces_the_loss_and_metrics_across_both_ranks(ddp_run):
    run_dir, probe = ddp_run
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    summary = read_summary(run_dir)
    assert summary["stages"]["distill"]["world_size"] == 2
    # Each rank took 12 of the 24 training examples per epoch: 3 batches, so 4 steps cross into epoch 1.
    reduced = {step: float(v) for step, v in logged(run_dir, "train/loss").items()}
    local = [{int(k): v for k, v in r["train"].items()} for r in ranks]
    assert sorted(reduced) == [0, 1, 2, 3] and sorted(local[0]) == [1, 2, 3, 4]
    for step, value in reduced.items():  # the CSV row of step s is logged after optimizer step s + 1
        own = local[0][step + 1], local[1][step + 1]
        assert own[0] != own[1], "both ranks saw the same batch"
        assert value == pytest.approx(sum(own) / 2, rel=1e-6)
    # val/ce is token-weighted over the whole val split: both ranks' sums, not rank 0's alone.
    (sum0, weight0, step), (sum1, weight1, _) = ranks[0]["val"][-1], ranks[1]["val"][-1]
    assert step == 4
    final = summary["stages"]["distill"]["val/ce"]
    assert final == pytest.approx((sum0 + sum1) / (weight0 + weight1), rel=1e-6)
    # A weighted mean of the two ranks' values lies strictly between them (rank 0's alone would sit on one end).
    low, high = sorted((sum0 / weight0, sum1 / weight1))
    assert high - low > 1e-5 * high and low < final < high


@pytest.mark.slow
def test_ddp_only_rank_zero_writes_files(ddp_run):
    run_dir, _ = ddp_run
    # Rank 1 leaves its own log (train_ddp_process_1.log, Hydra's file for that process) and nothing else:
    # one summary, one student, one set of checkpoints and logs, no second Hydra config dump.
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra",
        "checkpoints",
        "csv",
        "data",
        "predictions",
        "results.md",
        "run.log",
        "student",
        "summary.json",
        "teacher",
        "train_ddp_process_1.log",
    ]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "distill").iterdir()) == ["last.ckpt", "step000004.ckpt"]
    assert not list(run_dir.rglob("*.tmp*")), "a temporary file was left behind"
    assert (run_dir / "train_ddp_process_1.log").read_text().count("ERROR") == 0
    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    assert summary["eval"]["student"]["test"]["n"] == summary["data"]["examples"]["test"]  # rank 0 scored every step


def test_ddp_config_instantiates_a_gloo_ddp_trainer_on_cpu(tmp_path):
    cfg = compose_config(["recipe=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2 and trainer.num_nodes == 1
    assert trainer.strategy.checkpoint_io.__class__.__name__ == "AtomicCheckpointIO"


@pytest.mark.parametrize("placement", ["shard", "replicate"])
def test_fsdp_config_composes_and_its_strategy_instantiates(tmp_path, placement):
    cfg = compose_config(["recipe=smoke", "trainer=fsdp", f"trainer.strategy.teacher={placement}"], tmp_path)
    assert cfg.trainer.accelerator == "gpu"
    strategy = instantiate(cfg.trainer.strategy)  # the Trainer itself needs a GPU for FSDP
    assert isinstance(strategy, DistillFSDPStrategy) and strategy.teacher == placement
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "full" and strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert policy._module_classes == {Glm4vTextDecoderLayer, Glm4vVisionBlock, Glm4DecoderLayer}


def test_fsdp_teacher_placement_must_be_shard_or_replicate():
    with pytest.raises(ValueError, match="use shard or replicate"):
        DistillFSDPStrategy(teacher="everywhere")


def test_deepspeed_config_instantiates_a_zero3_trainer(tmp_path):
    pytest.importorskip("deepspeed", reason="make setup installs deepspeed (pip install --no-build-isolation)")
    cfg = compose_config(
        ["recipe=smoke", "trainer=deepspeed", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed"], tmp_path
    )
    trainer = instantiate(cfg.trainer, logger=False, devices=1)
    assert isinstance(trainer.strategy, DeepSpeedStrategy)
    assert trainer.strategy.config["zero_optimization"]["stage"] == 3


@pytest.mark.gpu
def test_fsdp_smoke_run_on_one_gpu(tmp_path):
    proc = run_cli(
        ["recipe=smoke", "trainer=fsdp", "trainer.devices=1", "logger=csv", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_summary(tmp_path)
    assert summary["status"] == "completed" and summary["stages"]["distill"]["steps"] == 4
    assert (tmp_path / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ddp_on_policy_run_samples_on_both_ranks(tmp_path):
    """distill.on_policy under DDP: every rank draws the same source each step (no rank waits on a generate the
    other skipped) and samples its own share of the batch; the logged metrics are the two ranks' mean."""
    run_ddp(tmp_path, "eval.teacher=false", "distill.on_policy.lmbda=0.5", "distill.on_policy.seq_kd=true")
    summary = read_summary(tmp_path)
    assert summary["stages"]["distill"]["world_size"] == 2 and summary["stages"]["distill"]["steps"] == 4
    student_steps = logged(tmp_path, "train/student_sample_len")
    teacher_steps = logged(tmp_path, "train/teacher_sample_len")
    # lmbda=0.5 with seq_kd: each of the 4 steps is sampled by exactly one of the two models.
    assert student_steps and teacher_steps and sorted(student_steps | teacher_steps) == [0, 1, 2, 3]
    share = [float(v) for v in logged(tmp_path, "train/on_policy_share").values()]
    assert share == [pytest.approx(len(student_steps) / 4)]
