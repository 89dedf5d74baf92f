"""The offline teacher cache: the code, the CLI, training from it, and every way a cache can be wrong."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoglm_distill.data.prepare import data_module
from autoglm_distill.losses import DistillationLoss, HeadTargets, TopKTargets
from autoglm_distill.run import run
from autoglm_distill.teacher_cache import TeacherCache, TeacherCacheError, decode, encode, top_k
from autoglm_distill.teacher_cache.__main__ import build_cache
from autoglm_distill.validate import ConfigError, validate

from .conftest import compose_config, run_cli


def sample(n: int = 40, vocab: int = 5000, k: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 3
    return logits, *top_k(logits, k, 2.0)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_ids_round_trip_exactly_and_log_probs_within_half_a_step(bits: int) -> None:
    _, ids, logp, rest = sample()
    arrays = encode(ids.numpy(), logp.numpy(), rest.numpy(), bits)
    got_ids, got_logp, got_rest = decode(arrays)
    order = ids.argsort(dim=1).numpy()
    assert (got_ids == np.take_along_axis(ids.numpy(), order, 1)).all()
    expected = np.take_along_axis(logp.numpy(), order, 1)
    step = (expected.max(1) - expected.min(1)) / (2**bits - 1)
    # half a quantization step, plus fp16 rounding of the range and the renormalisation shift
    assert (np.abs(got_logp - expected) <= step[:, None] / 2 + 0.01).all()
    total = np.exp(got_logp).sum(1) + np.exp(got_rest)
    assert np.allclose(total, 1.0, atol=1e-5)


def test_bytes_per_token_and_kd_deviation_at_k_128_of_a_151k_vocabulary() -> None:
    """Worst case for the ids (spread uniformly over the vocabulary): 128 ids cost close to their entropy."""
    g = torch.Generator().manual_seed(0)
    n = 128
    logits = torch.randn(n, 151_552, generator=g) * 3
    ids, logp, rest = top_k(logits, 128, 1.0)
    arrays = encode(ids.numpy(), logp.numpy(), rest.numpy(), 6)
    # DistillKit: ~300 B/token at top-k 128 (ids in 18 bits each); the npz container adds ~1 KB per shard
    assert sum(a.nbytes for a in arrays.values()) / n < 300
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    assert len(buffer.getvalue()) - sum(a.nbytes for a in arrays.values()) < 2048
    got = [torch.from_numpy(a) for a in decode(arrays)]
    student = torch.randn(n, 151_552, generator=g) * 3
    loss = DistillationLoss(temperature=1.0, alpha=1.0)
    labels = torch.zeros(n, dtype=torch.long)
    exact = loss(student, labels, TopKTargets(ids, logp, rest, 1.0)).kd
    cached = loss(student, labels, TopKTargets(*got, 1.0)).kd
    assert abs(cached - exact) / exact < 0.01


def test_top_k_keeps_the_leftover_mass() -> None:
    logits, ids, logp, rest = sample(k=10)
    full = torch.log_softmax(logits / 2.0, -1)
    assert torch.allclose(logp.exp().sum(1) + rest.exp(), torch.ones(len(ids)), atol=1e-5)
    assert torch.equal(ids[:, 0], full.argmax(1))


# --- the CLI and training from a cache ------------------------------------------------------------------------------

SMOKE = ["recipe=smoke", "baseline=false", "distill.loss.temperature=2.0"]


def run_module(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def teacher_run(smoke_run) -> Path:
    """The shared smoke run: its scratch-trained tiny GLM-4.1V teacher (and data) are what the cache tests cache."""
    return smoke_run


def cache_args(teacher_run: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        *SMOKE,
        "teacher=pretrained",
        f"teacher.path={teacher_run / 'teacher'}",
        f"data.path={teacher_run / 'data'}",
        "data.generate=null",
        f"distill.cache.dir={cache_dir}",
        f"hydra.run.dir={cache_dir.parent / 'cache_run'}",
        *extra,
    ]


@pytest.fixture(scope="module")
def cache(teacher_run, tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("cache") / "teacher_cache"
    vocab = json.loads((teacher_run / "teacher" / "config.json").read_text())["text_config"]["vocab_size"]
    args = cache_args(teacher_run, cache_dir, f"distill.cache.k={vocab}", "distill.cache.value_bits=16")
    proc = run_module("autoglm_distill.teacher_cache", args, cache_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cache_dir


def test_cache_holds_every_split_and_its_index_says_what_it_is(cache, teacher_run) -> None:
    index = json.loads((cache / "index.json").read_text())
    assert index["k"] == index["vocab_size"] and index["temperature"] == 2.0 and index["images"] is True
    assert {s["split"] for s in index["shards"]} == {"train", "val", "test"}
    assert index["tokens"] > 0 and index["bytes_per_token"] == index["bytes"] / index["tokens"]
    assert (cache / "tokenizer.json").is_file() and (cache / "preprocessor_config.json").is_file()


def test_cached_targets_at_full_k_give_the_dense_teacher_loss(cache, teacher_run, tokenizer) -> None:
    """k = V (the whole vocabulary) at 16 bits: the cached loss of a batch equals the live teacher's."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    cfg = compose_config(cache_args(teacher_run, cache), teacher_run)
    opened = TeacherCache(cache)
    tok = AutoTokenizer.from_pretrained(cache)
    datamodule = data_module(cfg, teacher_run / "data", tok, AutoImageProcessor.from_pretrained(cache), opened)
    batch = next(iter(datamodule.val_dataloader()))
    teacher = AutoModelForImageTextToText.from_pretrained(teacher_run / "teacher").eval()
    student = AutoModelForImageTextToText.from_pretrained(teacher_run / "student").eval()
    inputs = {k: v for k, v in batch.items() if k not in ("labels",) and not k.startswith("teacher_")}
    labels = batch["labels"][:, 1:]
    loss = DistillationLoss(temperature=2.0, alpha=1.0)
    with torch.no_grad():
        hidden = student.model(**inputs).last_hidden_state[:, :-1]
        teacher_hidden = teacher.model(**inputs).last_hidden_state[:, :-1]
        weight = student.lm_head.weight
        dense = loss.from_hidden(hidden, weight, labels, HeadTargets(teacher_hidden, teacher.lm_head.weight))
        cached = loss.from_hidden(hidden, weight, labels, TopKTargets(batch["teacher_ids"], batch["teacher_logp"],
                                                                      batch["teacher_rest"], 2.0))  # fmt: skip
    assert abs(cached.kd - dense.kd) / dense.kd < 1e-3
    assert cached.agree == dense.agree


def test_training_from_the_cache_never_loads_the_teacher(cache, teacher_run, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = [a for a in cache_args(teacher_run, cache) if not a.startswith(("hydra.run.dir", "teacher.path"))]
    proc = run_cli([*args, "teacher.path=/nonexistent", "distill.teacher=cache", "eval.limit=2",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["teacher_cache"]["value_bits"] == 16
    assert "teacher" not in summary["eval"]
    # Same seed, data, student init and steps as the smoke run's distill stage with the live teacher, and the cache
    # holds the whole vocabulary at 16 bits: the student must have seen the same soft targets.
    cached, live = summary["stages"]["distill"], json.loads((teacher_run / "summary.json").read_text())["stages"]
    for key in ("val/kd", "val/ce", "val/top1_agreement"):
        assert cached[key] == pytest.approx(live["distill"][key], rel=1e-3), key
    assert "Training from the teacher cache" in (run_dir / "run.log").read_text()


def test_an_existing_cache_is_kept(cache, teacher_run) -> None:
    before = (cache / "index.json").read_text()
    with pytest.raises(TeacherCacheError, match="distill.cache.overwrite=true"):
        build_cache(compose_config(cache_args(teacher_run, cache), cache.parent / "cache_run"))
    assert (cache / "index.json").read_text() == before


def copy_of(cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in cache.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


def test_a_corrupted_shard_is_named(cache, tmp_path) -> None:
    copy = copy_of(cache, tmp_path)
    shard = copy / "train-00000.npz"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    opened = TeacherCache(copy)
    with pytest.raises(TeacherCacheError, match=r"train-00000.npz is corrupted \(sha256 mismatch\).*teacher_cache"):
        opened.example("train", 0)


def test_a_truncated_shard_is_named_when_the_cache_is_opened(cache, tmp_path) -> None:
    copy = copy_of(cache, tmp_path)
    shard = copy / "val-00000.npz"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(TeacherCacheError, match=r"val-00000.npz is truncated or overwritten.*teacher_cache"):
        TeacherCache(copy)


def test_an_interrupted_build_is_not_a_cache(tmp_path) -> None:
    (tmp_path / "teacher_cache.tmp-abc").mkdir()
    with pytest.raises(TeacherCacheError, match=r"index.json is missing \(an interrupted build left teacher_cache"):
        TeacherCache(tmp_path / "teacher_cache")


def test_a_cache_for_other_data_is_refused(cache, teacher_run, tmp_path) -> None:
    """Here the prompts lack the screenshot tokens the cache was written with."""
    from transformers import AutoTokenizer

    cfg = compose_config(cache_args(teacher_run, cache), teacher_run)
    tok = AutoTokenizer.from_pretrained(cache)
    datamodule = data_module(cfg, teacher_run / "data", tok, None, TeacherCache(cache))
    with pytest.raises(TeacherCacheError, match=r"written for other train data.*teacher_cache"):
        datamodule.train_dataloader()


def test_a_cache_at_another_temperature_names_the_fix(cache, teacher_run, tmp_path) -> None:
    args = [a for a in cache_args(teacher_run, cache) if not a.startswith("hydra.run.dir")]
    cfg = compose_config([*args, "logger=none", "distill.teacher=cache", "distill.loss.temperature=1.0"], tmp_path)
    with pytest.raises(ValueError, match="temperature 2.0 but distill.loss.temperature=1.0"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists(), "training started before the temperature was checked"


def test_config_mistakes_name_the_fix(tmp_path) -> None:
    cfg = compose_config(["recipe=smoke", "distill.teacher=cached", "distill.cache.value_bits=0"], tmp_path)
    with pytest.raises(ConfigError, match=r"distill.teacher='cached': use model or cache(.|\n)*value_bits=0"):
        validate(cfg)
    cfg = compose_config(["recipe=smoke", "distill.teacher=cache", "student.init=pruned_teacher"], tmp_path)
    with pytest.raises(ConfigError, match="pruned_teacher needs the teacher's weights"):
        validate(cfg)
