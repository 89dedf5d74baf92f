"""ONNX export of a text-only GLM-4 student: fixed-shape prefill + decode graphs, fp32 and int8, verified.

``export_onnx`` writes ``prefill.onnx`` / ``decode.onnx`` (fp32, ``torch.onnx.export(dynamo=True)``) and their
dynamic-int8 copies ``prefill.int8.onnx`` / ``decode.int8.onnx`` into a temporary folder beside ``out_dir``, checks
them against PyTorch with ``verify_onnx`` and only then moves the folder into place (``os.replace``), so a failed
export never leaves a complete-looking folder. An ``export.json`` in the folder records the file facts and the
verification figures.

The graphs are stored as single protobuf files, which caps a model at 2 GiB per graph (fp32).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from autoglm_distill.export.graphs import (
    DECODE_INPUTS,
    DECODE_OUTPUTS,
    PREFILL_INPUTS,
    PREFILL_OUTPUTS,
    DecodeGraph,
    PrefillGraph,
    greedy_generate,
)

log = logging.getLogger(__name__)

OPSET = 18
GRAPHS = ("prefill", "decode")
PRECISIONS = ("fp32", "int8")
# Bars: fp32 must be exact to float noise and reproduce greedy decoding; int8 is recorded against its bar but
# not enforced (a random tiny model has near-tied logits that int8 noise flips).
FP32_MAX_ABS_DIFF = 1e-4
INT8_MIN_TOP1_AGREEMENT = 0.95
INT8_OP_TYPES = ("MatMul", "Gather")


class ExportVerificationError(RuntimeError):
    """The exported graphs do not match PyTorch; ``report`` holds the figures. Nothing was written."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def file_name(graph: str, precision: str) -> str:
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _value_info(values) -> list[dict]:
    out = []
    for value in values:
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        out.append({"name": value.name, "shape": dims, "dtype": dtype})
    return out


def _file_info(path: Path) -> dict:
    proto = onnx.load(str(path), load_external_data=False)
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "sha256": _sha256(path),
        "inputs": _value_info(proto.graph.input),
        "outputs": _value_info(proto.graph.output),
        "metadata": {p.key: p.value for p in proto.metadata_props},
    }


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _set_metadata(path: Path, facts: Mapping[str, Any]) -> None:
    proto = onnx.load(str(path))
    merged = {p.key: p.value for p in proto.metadata_props}
    merged.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in facts.items()})
    del proto.metadata_props[:]
    for key, value in merged.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def _model_facts(model: nn.Module, max_context: int) -> dict[str, Any]:
    cfg = model.config
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or cfg.eos_token_id
    return {
        "producer": "autoglm_distill",
        "architecture": "glm4",
        "max_context": max_context,
        "vocab_size": cfg.vocab_size,
        "num_layers": cfg.num_hidden_layers,
        "num_kv_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "eos_token_ids": [eos] if isinstance(eos, int) else list(eos or []),
        "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else 0,
    }


def _fp32_cpu(model: nn.Module) -> nn.Module:
    """The model itself when it is already fp32 on CPU, else an fp32 CPU copy (the caller's model is untouched)."""
    if all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32)


def _example_inputs(prefill: PrefillGraph) -> tuple[tuple, tuple]:
    c = prefill.max_context
    ids = torch.zeros((1, c), dtype=torch.int32)
    length = torch.tensor([max(c // 2, 1)], dtype=torch.int32)
    # Two distinct tensors: torch.export treats one tensor passed twice as an alias and would wire v_cache into both.
    k_cache = torch.zeros(prefill.cache_shape(), dtype=torch.float32)
    v_cache = torch.zeros(prefill.cache_shape(), dtype=torch.float32)
    decode_args = (torch.zeros((1, 1), dtype=torch.int32), torch.tensor([c // 2], dtype=torch.int32), k_cache, v_cache)
    return (ids, length), decode_args


def _quantize_int8(src: Path, dst: Path, vocab_size: int) -> dict:
    """Dynamic int8 (QInt8 weights) on MatMul and on the token-embedding Gather; other Gathers (cos/sin tables,
    shape bookkeeping) stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}

    def is_embedding(node) -> bool:
        init = inits.get(node.input[0])
        return init is not None and len(init.dims) == 2 and init.dims[0] == vocab_size

    gathers = [n for n in proto.graph.node if n.op_type == "Gather"]
    exclude = [n.name for n in gathers if not is_embedding(n)]
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=list(INT8_OP_TYPES),
        nodes_to_exclude=exclude,
    )
    quant = onnx.load(str(dst))
    eight_bit = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}
    quant_inits = {t.name: eight_bit[t.data_type] for t in quant.graph.initializer if t.data_type in eight_bit}
    embedding = [
        quant_inits[n.input[0]] for n in quant.graph.node if n.op_type == "Gather" and n.input[0] in quant_inits
    ]
    info = {
        "weight_type": "QInt8",
        "op_types": list(INT8_OP_TYPES),
        "quantized_matmuls": sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in quant.graph.node),
        "embedding_quantized": bool(embedding),
        # Dynamic quantization stores a Gather's table with the activation type (uint8, per tensor), not QInt8.
        "embedding_dtype": embedding[0] if embedding else "float32",
    }
    if not embedding:
        info["note"] = "onnxruntime did not quantize the embedding Gather; it stays fp32"
    return info


class _OrtGraph:
    """An onnxruntime session called like the torch wrappers: tensors in (positional), tensors out."""

    def __init__(self, path: str | os.PathLike, input_names: Sequence[str]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = tuple(input_names)

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, tensors, strict=True)}
        return tuple(torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feeds))


def _paths(files: Mapping[str, Any]) -> dict[str, Path]:
    return {key: Path(value["path"] if isinstance(value, Mapping) else value) for key, value in files.items()}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@torch.no_grad()
def _trajectory(prefill, decode, prompt: Sequence[int], tokens: Sequence[int], max_context: int, pad_id: int):
    """Logits from prefill, then from decode fed ``tokens`` (teacher forcing): one [V] row per step."""
    ids = torch.full((1, max_context), pad_id, dtype=torch.int32)
    ids[0, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.int32)
    logits, k_cache, v_cache = prefill(ids, torch.tensor([len(prompt)], dtype=torch.int32))
    rows = [logits[0]]
    for step, token in enumerate(tokens[:-1]):
        position = torch.tensor([len(prompt) + step], dtype=torch.int32)
        logits, k_cache, v_cache = decode(torch.tensor([[token]], dtype=torch.int32), position, k_cache, v_cache)
        rows.append(logits[0])
    return rows


@torch.no_grad()
def verify_onnx(
    model: nn.Module, files: Mapping[str, Any], prompts: Sequence[Sequence[int]], max_new_tokens: int = 32
) -> dict:
    """Compare the ONNX graphs (onnxruntime, CPU) with the PyTorch wrappers on ``prompts``.

    Args:
        model: the ``Glm4ForCausalLM`` the files were exported from.
        files: ``{"prefill_fp32": info-or-path, "decode_fp32": ..., "prefill_int8": ..., "decode_int8": ...}``
            (the int8 pair is optional), as ``export_onnx`` returns them.
        prompts: token-id lists; each must leave room for ``max_new_tokens`` in ``max_context``.
        max_new_tokens: greedy tokens generated per prompt (EOS does not stop it, so every step is compared).

    Returns:
        per precision: ``prefill_max_abs_diff`` / ``prefill_min_cosine`` (prefill logits), ``decode_max_abs_diff``,
        ``top1_agreement`` (teacher-forced along PyTorch's greedy path, prefill step included), ``greedy_match``
        (ONNX-driven greedy generation == PyTorch's for every prompt) and ``passed``; plus ``passed`` overall, which
        enforces only the fp32 bars (max |delta| <= 1e-4, identical greedy tokens).
    """
    paths = _paths(files)
    if not prompts:
        raise ValueError("verify_onnx needs at least one prompt")
    meta = read_metadata(paths["prefill_fp32"])
    max_context = int(meta["max_context"])
    pad_id = int(meta.get("pad_token_id", 0))
    model = _fp32_cpu(model)
    was_training = model.training
    torch_prefill, torch_decode = PrefillGraph(model, max_context).eval(), DecodeGraph(model, max_context).eval()
    try:
        reference = []
        for prompt in prompts:
            tokens = greedy_generate(torch_prefill, torch_decode, prompt, max_new_tokens, (), max_context, pad_id)
            rows = _trajectory(torch_prefill, torch_decode, prompt, tokens, max_context, pad_id)
            reference.append((list(prompt), tokens, rows))
    finally:
        model.train(was_training)

    report: dict[str, Any] = {"max_context": max_context, "prompts": len(prompts), "max_new_tokens": max_new_tokens}
    for precision in PRECISIONS:
        if f"prefill_{precision}" not in paths:
            continue
        prefill = _OrtGraph(paths[f"prefill_{precision}"], PREFILL_INPUTS)
        decode = _OrtGraph(paths[f"decode_{precision}"], DECODE_INPUTS)
        prefill_diff, decode_diff, min_cos, agree, steps, greedy_match = 0.0, 0.0, 1.0, 0, 0, True
        for prompt, tokens, rows in reference:
            onnx_rows = _trajectory(prefill, decode, prompt, tokens, max_context, pad_id)
            prefill_diff = max(prefill_diff, float((onnx_rows[0] - rows[0]).abs().max()))
            min_cos = min(min_cos, _cosine(onnx_rows[0], rows[0]))
            for ours, ref in zip(onnx_rows[1:], rows[1:]):
                decode_diff = max(decode_diff, float((ours - ref).abs().max()))
            agree += sum(int(torch.argmax(o)) == int(torch.argmax(r)) for o, r in zip(onnx_rows, rows))
            steps += len(rows)
            generated = greedy_generate(prefill, decode, prompt, max_new_tokens, (), max_context, pad_id)
            greedy_match = greedy_match and generated == tokens
        result = {
            "prefill_max_abs_diff": prefill_diff,
            "prefill_min_cosine": min_cos,
            "decode_max_abs_diff": decode_diff,
            "top1_agreement": agree / steps,
            "greedy_match": greedy_match,
        }
        if precision == "fp32":
            result["passed"] = max(prefill_diff, decode_diff) <= FP32_MAX_ABS_DIFF and greedy_match
        else:
            result["passed"] = result["top1_agreement"] >= INT8_MIN_TOP1_AGREEMENT
            result["enforced"] = False
        report[precision] = result
    report["passed"] = bool(report.get("fp32", {}).get("passed", False))
    return report


def default_prompts(vocab_size: int, max_context: int, max_new_tokens: int, seed: int = 0) -> list[list[int]]:
    """Three deterministic random prompts of different lengths that leave room for ``max_new_tokens``."""
    room = max_context - max_new_tokens + 1
    if room < 1:
        raise ValueError(f"max_context={max_context} leaves no room for {max_new_tokens} new tokens")
    gen = torch.Generator().manual_seed(seed)
    lengths = sorted({1, max(room // 4, 1), room})
    return [torch.randint(1, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def export_onnx(
    model: nn.Module,
    out_dir: str | os.PathLike,
    max_context: int = 128,
    prompts: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 32,
    int8: bool = True,
) -> dict:
    """Export ``model`` (a text-only ``Glm4ForCausalLM``) to ``out_dir`` and verify it against PyTorch.

    Args:
        model: the student; exported in fp32 on CPU (a copy is made when it is not already).
        out_dir: the final folder; replaced only after verification passes.
        max_context: the fixed sequence length of the graphs and the KV cache.
        prompts: token-id lists to verify on; default: three seeded random prompts (``default_prompts``).
        max_new_tokens: greedy tokens compared per prompt.
        int8: also write the dynamic-int8 copies.

    Returns:
        ``{"out_dir", "max_context", "opset", "files": {"prefill_fp32": info, ...}, "int8": {...},
        "verification": verify_onnx's report}``; each info has path, bytes, sha256, inputs, outputs (name, shape,
        dtype) and metadata.

    Raises:
        ExportVerificationError: the fp32 graphs failed the parity bars (nothing is left at ``out_dir``).
    """
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model = _fp32_cpu(model)
    facts = _model_facts(model, max_context)
    if prompts is None:
        prompts = default_prompts(facts["vocab_size"], max_context, max_new_tokens)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    was_training = model.training
    try:
        prefill, decode = PrefillGraph(model, max_context).eval(), DecodeGraph(model, max_context).eval()
        prefill_args, decode_args = _example_inputs(prefill)
        specs = {
            "prefill": (prefill, prefill_args, PREFILL_INPUTS, PREFILL_OUTPUTS),
            "decode": (decode, decode_args, DECODE_INPUTS, DECODE_OUTPUTS),
        }
        quant_info: dict[str, Any] = {}
        for graph, (module, args, inputs, outputs) in specs.items():
            fp32_path = tmp / file_name(graph, "fp32")
            with torch.no_grad():
                torch.onnx.export(
                    module,
                    args,
                    str(fp32_path),
                    dynamo=True,
                    input_names=list(inputs),
                    output_names=list(outputs),
                    opset_version=OPSET,
                    external_data=False,
                    verbose=False,
                )
            _set_metadata(fp32_path, {**facts, "graph": graph, "precision": "fp32"})
            if int8:
                int8_path = tmp / file_name(graph, "int8")
                quant_info[graph] = _quantize_int8(fp32_path, int8_path, facts["vocab_size"])
                _set_metadata(int8_path, {**facts, "graph": graph, "precision": "int8"})
        model.train(was_training)

        precisions = PRECISIONS if int8 else ("fp32",)
        tmp_files = {f"{g}_{p}": tmp / file_name(g, p) for p in precisions for g in GRAPHS}
        report = verify_onnx(model, tmp_files, prompts, max_new_tokens)
        if not report["passed"]:
            raise ExportVerificationError(f"ONNX export does not match PyTorch: {report.get('fp32')}", report)

        summary = {
            "out_dir": str(out_dir),
            "max_context": max_context,
            "opset": OPSET,
            "files": {key: {**_file_info(path), "path": str(out_dir / path.name)} for key, path in tmp_files.items()},
            "int8": quant_info,
            "verification": report,
        }
        (tmp / "export.json").write_text(json.dumps(summary, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the final folder gets the usual permissions
        _swap_into_place(tmp, out_dir)
    except BaseException:
        model.train(was_training)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("ONNX export verified and written to %s", out_dir)
    return summary


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Move the verified ``tmp`` folder to ``out_dir``; an existing ``out_dir`` is replaced only at the end."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
