"""Safe by default: no credential in anything a run writes, safetensors only, no path out of its folder."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from autoglm_distill.data import prepare
from autoglm_distill.models import ModelLoadError, build_model, load_pretrained
from autoglm_distill.teacher_cache import FORMAT as CACHE_FORMAT
from autoglm_distill.teacher_cache import TeacherCache, TeacherCacheError
from autoglm_distill.utils import install_secret_filter

from .conftest import TINY_TEXT, compose_config, run_cli

WANDB_KEY, HF_TOKEN, TYPED = "wandb-key-0123456789abcdef", "hf_token-value-98765", "typed-secret-55555"


def test_no_secret_reaches_a_log_a_config_dump_the_summary_or_wandb(tmp_path, monkeypatch):
    """Credentials in the environment, one interpolated into the config and one typed on the command line under a
    secret-like key: none of them is in any file of the run folder or in the console output."""
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    proc = run_cli(
        [
            "recipe=smoke",
            "baseline=false",
            "eval.limit=2",
            f"+extra.hf_token={TYPED}",
            "+extra.note=${oc.env:HF_TOKEN}",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (tmp_path / ".hydra" / "overrides.yaml").is_file()
    for secret in (WANDB_KEY, HF_TOKEN, TYPED):
        leaks = [str(p.relative_to(tmp_path)) for p in files if secret.encode() in p.read_bytes()]
        assert not leaks, f"{secret} written to {leaks}"
        assert secret not in proc.stdout + proc.stderr
    config = json.loads((tmp_path / "summary.json").read_text())["config"]
    assert config["extra"] == {"hf_token": "***", "note": "***"}
    assert "extra.hf_token=***" in (tmp_path / ".hydra" / "overrides.yaml").read_text()


def test_log_records_carrying_a_credential_are_masked(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install_secret_filter()
        logging.getLogger("autoglm_distill.test").warning("loading with token %s", HF_TOKEN)
    finally:
        root.removeHandler(handler)
    assert stream.getvalue() == "loading with token ***\n"


def test_weights_load_from_safetensors_only(tokenizer, tmp_path):
    model = build_model("glm4", TINY_TEXT, tokenizer)
    model.save_pretrained(tmp_path)
    assert load_pretrained(str(tmp_path), "causal_lm").config.model_type == "glm4"
    # The same weights as a pickle (pytorch_model.bin) only: refused, with the way out.
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="as safetensors"):
        load_pretrained(str(tmp_path), "causal_lm")


def test_a_teacher_cache_index_cannot_point_outside_its_folder(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (tmp_path / "secret.npz").write_bytes(b"x")
    index = {"format": CACHE_FORMAT, "shards": [{"file": "../secret.npz", "bytes": 1, "split": "train"}]}
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherCacheError, match="outside the cache folder"):
        TeacherCache(cache)


def test_other_ranks_wait_for_rank_zero_to_generate_the_data(tmp_path, monkeypatch):
    """torchrun and SLURM start every rank at once: rank 1 waits for rank 0's data and says so when it never comes."""
    cfg = compose_config(["recipe=smoke"], tmp_path)
    monkeypatch.setattr(prepare.rank_zero_only, "rank", 1)
    with pytest.raises(TimeoutError, match="rank 0 to generate the data"):
        prepare.prepare_data(cfg, wait_s=0.5)
    assert not Path(cfg.data.path).exists()  # rank 1 wrote nothing
    monkeypatch.setattr(prepare.rank_zero_only, "rank", 0)
    root = prepare.prepare_data(cfg)
    monkeypatch.setattr(prepare.rank_zero_only, "rank", 1)
    assert prepare.prepare_data(cfg, wait_s=0.5) == root
    shutil.rmtree(root)
