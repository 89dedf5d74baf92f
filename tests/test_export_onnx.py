"""Prefill/decode wrappers are exact against HF GLM-4, and the ONNX export is verified before it is put in place."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from autoglm_distill.export import (
    DecodeGraph,
    ExportVerificationError,
    PrefillGraph,
    export_onnx,
    greedy_generate,
    read_metadata,
    verify_onnx,
)
from autoglm_distill.export import onnx as onnx_export
from autoglm_distill.models import build_model

from .conftest import TINY_TEXT

MAX_CONTEXT = 64
TEXTS = ["open the settings app", "tap the search box and type weather", "go back"]


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return build_model("glm4", {**TINY_TEXT, "num_hidden_layers": 2}, tokenizer).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(text)["input_ids"] for text in TEXTS]


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "student"
    return export_onnx(model, out, max_context=MAX_CONTEXT)


def _graphs(model):
    return PrefillGraph(model, MAX_CONTEXT).eval(), DecodeGraph(model, MAX_CONTEXT).eval()


@torch.no_grad()
def test_wrapper_logits_match_hf(model, prompts):
    prefill, decode = _graphs(model)
    for prompt in prompts:
        ids = torch.zeros((1, MAX_CONTEXT), dtype=torch.int32)
        ids[0, : len(prompt)] = torch.tensor(prompt)
        logits, k_cache, v_cache = prefill(ids, torch.tensor([len(prompt)], dtype=torch.int32))
        assert logits.shape == (1, model.config.vocab_size)
        assert k_cache.shape == v_cache.shape == (2, TINY_TEXT["num_key_value_heads"], MAX_CONTEXT, 16)
        hf = model(torch.tensor([prompt])).logits[:, -1]
        assert (logits - hf).abs().max() < 1e-5
        # Feed a few more tokens through decode and compare with HF on the whole sequence.
        sequence = list(prompt)
        for token in (5, 17, 42):
            position = torch.tensor([len(sequence)], dtype=torch.int32)
            logits, k_cache, v_cache = decode(torch.tensor([[token]], dtype=torch.int32), position, k_cache, v_cache)
            sequence.append(token)
            hf = model(torch.tensor([sequence])).logits[:, -1]
            assert (logits - hf).abs().max() < 1e-5


def test_greedy_generate_matches_hf_generate(model, prompts):
    prefill, decode = _graphs(model)
    eos = model.generation_config.eos_token_id
    for prompt in prompts:
        ours = greedy_generate(prefill, decode, prompt, 32, eos, MAX_CONTEXT)
        ids = torch.tensor([prompt])
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        assert ours == hf[0, len(prompt) :].tolist()
    with pytest.raises(ValueError, match="max_context"):
        greedy_generate(prefill, decode, [1] * 40, 32, eos, MAX_CONTEXT)


def test_onnx_fp32_parity(exported, model, prompts):
    report = exported["verification"]
    fp32 = report["fp32"]
    assert report["passed"] and fp32["passed"]
    assert fp32["prefill_max_abs_diff"] <= 1e-4 and fp32["decode_max_abs_diff"] <= 1e-4
    assert fp32["greedy_match"] and fp32["top1_agreement"] == 1.0
    assert fp32["prefill_min_cosine"] > 0.9999
    # The final files (not only the temp ones) verify again on tokenizer prompts.
    again = verify_onnx(model, exported["files"], prompts, max_new_tokens=32)
    assert again["passed"] and again["fp32"]["greedy_match"]
    assert 0.0 <= again["int8"]["top1_agreement"] <= 1.0 and again["int8"]["enforced"] is False


def test_int8_is_smaller_and_quantized(exported):
    files = exported["files"]
    for graph in ("prefill", "decode"):
        assert files[f"{graph}_int8"]["bytes"] < files[f"{graph}_fp32"]["bytes"]
        info = exported["int8"][graph]
        assert info["weight_type"] == "QInt8" and info["quantized_matmuls"] > 0
        assert info["embedding_quantized"], info


def test_files_metadata_and_layout(exported, model):
    out = Path(exported["out_dir"])
    assert sorted(p.name for p in out.iterdir()) == [
        "decode.int8.onnx",
        "decode.onnx",
        "export.json",
        "prefill.int8.onnx",
        "prefill.onnx",
    ]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    assert json.loads((out / "export.json").read_text())["files"] == exported["files"]
    vocab = model.config.vocab_size
    for key, info in exported["files"].items():
        graph, precision = key.split("_")
        path = Path(info["path"])
        assert path.parent == out and info["bytes"] == path.stat().st_size
        assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        meta = read_metadata(path)
        assert meta["graph"] == graph and meta["precision"] == precision
        assert int(meta["max_context"]) == MAX_CONTEXT and int(meta["vocab_size"]) == vocab
        names = {v["name"]: (v["shape"], v["dtype"]) for v in info["inputs"] + info["outputs"]}
        assert names["logits"] == ([1, vocab], "float32")
        if graph == "prefill":
            assert names["input_ids"] == ([1, MAX_CONTEXT], "int32") and names["length"] == ([1], "int32")
            assert names["k_cache"] == ([2, 1, MAX_CONTEXT, 16], "float32")
        else:
            assert names["token"] == ([1, 1], "int32") and names["position"] == ([1], "int32")
            assert names["k_cache"] == names["k_cache_out"] == ([2, 1, MAX_CONTEXT, 16], "float32")


def test_failed_verification_leaves_no_folder(model, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "FP32_MAX_ABS_DIFF", -1.0)  # no export can meet this bar
    target = tmp_path / "student"
    with pytest.raises(ExportVerificationError) as err:
        export_onnx(model, target, max_context=32, max_new_tokens=4, int8=False)
    assert err.value.report["passed"] is False
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
