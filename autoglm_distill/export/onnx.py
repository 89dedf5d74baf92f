"""ONNX artifacts: ``torch.onnx.export(dynamo=True)`` per graph; fp32, dynamic int8 and int4 (``MatMulNBits``, blocks
of 32) by onnxruntime's quantization tools.

Files per precision: ``<graph>.<precision>.onnx`` per graph (``prefill_<S>`` per bucket, ``decode``: nodes and small
constants) and ``weights.<precision>.bin``, the weights every graph reads, stored once: ONNX external data (each
large initializer points at an offset and length in it), so onnxruntime loads each graph from its own path with no
extra step. The caches take ONNX Runtime GenAI's names: ``past_key_values.<i>.key`` / ``.value`` in,
``present.<i>.key`` / ``.value`` out (an ONNX output cannot reuse an input's name); the write is a ``ScatterND`` at
``input_pos``. Key facts go into each graph's ``metadata_props``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from autoglm_distill.export.graphs import GraphSpec, graph_specs
from autoglm_distill.export.storage import INT4_BLOCK, INT4_WEIGHTS

FORMAT = "onnx"
PRECISIONS = ("fp32", "int8", "int4")
OPSET = 18
INT8_OP_TYPES = ("MatMul", "Gather")
# Initializers this large or larger go to the shared weight file (onnx's own external-data threshold); the ones of
# ALIGN_BYTES or more start at a multiple of PAGE_BYTES, so onnxruntime can memory-map them (what its own external
# data writer does).
SHARED_MIN_BYTES = 1024
ALIGN_BYTES = 1 << 20
PAGE_BYTES = 4096


CACHE_UPDATE = "index_put"
KV_CACHE = {
    "io": "inputs past_key_values.<i>.key / .value, outputs present.<i>.key / .value: per layer [1, KV, C, D] float32",
    "update": "ScatterND at input_pos; onnxruntime writes the outputs to new buffers: feed present.* back as the "
    "next past_key_values.*",
}


def specs(model: torch.nn.Module, facts: Mapping[str, Any]) -> dict[str, GraphSpec]:
    return graph_specs(model, facts, CACHE_UPDATE)


def _onnx_name(name: str, output: bool) -> str:
    """kv_cache_k_3 -> past_key_values.3.key (an input) or present.3.key (an output); other names unchanged."""
    if not name.startswith("kv_cache_"):
        return name
    kv, layer = name[len("kv_cache_") :].split("_")
    return f"{'present' if output else 'past_key_values'}.{layer}.{'key' if kv == 'k' else 'value'}"


def io_names(spec: GraphSpec) -> tuple[list[str], list[str]]:
    """The graph's input and output names in the ONNX file."""
    return [_onnx_name(n, False) for n in spec.inputs], [_onnx_name(n, True) for n in spec.outputs]


def converter_versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _value_info(values) -> list[dict]:
    out = []
    for value in values:
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        out.append({"name": value.name, "shape": dims, "dtype": dtype})
    return out


def signature(path: str | os.PathLike) -> dict[str, list[dict]]:
    proto = onnx.load(str(path), load_external_data=False)
    return {"inputs": _value_info(proto.graph.input), "outputs": _value_info(proto.graph.output)}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def write_metadata(path: str | os.PathLike, facts: Mapping[str, Any]) -> None:
    """Merge ``facts`` (non-strings as JSON) into the file's ``metadata_props`` (external data stays where it is)."""
    proto = onnx.load(str(path), load_external_data=False)
    merged = {p.key: p.value for p in proto.metadata_props}
    merged.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in facts.items()})
    del proto.metadata_props[:]
    for key, value in merged.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def _export(spec: GraphSpec, path: Path) -> None:
    input_names, output_names = io_names(spec)
    with torch.no_grad():
        torch.onnx.export(
            spec.module,
            tuple(spec.example.values()),
            str(path),
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )


def _quantize_int8(src: Path, dst: Path, vocab_size: int) -> dict:
    """Dynamic int8 (QInt8 weights) on MatMul and on the token-embedding Gather; other Gathers (cos/sin tables,
    shape bookkeeping) stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}

    def is_embedding(node) -> bool:
        init = inits.get(node.input[0])
        return init is not None and len(init.dims) == 2 and init.dims[0] == vocab_size

    exclude = [n.name for n in proto.graph.node if n.op_type == "Gather" and not is_embedding(n)]
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=list(INT8_OP_TYPES),
        nodes_to_exclude=exclude,
    )
    quant = onnx.load(str(dst))
    eight_bit = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}
    quant_inits = {t.name: eight_bit[t.data_type] for t in quant.graph.initializer if t.data_type in eight_bit}
    embedding = [
        quant_inits[n.input[0]] for n in quant.graph.node if n.op_type == "Gather" and n.input[0] in quant_inits
    ]
    return {
        "recipe": "onnxruntime quantize_dynamic, QInt8 weights per output channel, dynamic uint8 activations",
        "weights": "int8 per output channel (embedding included)",
        "op_types": list(INT8_OP_TYPES),
        "quantized_matmuls": sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in quant.graph.node),
        # Dynamic quantization stores a Gather's table with the activation type (uint8, per tensor).
        "embedding_dtype": embedding[0] if embedding else "float32",
    }


def _quantize_int4(src: Path, dst: Path, vocab_size: int) -> dict:
    """Every MatMul but the output head as ``MatMulNBits`` (4-bit weights, symmetric blocks of ``INT4_BLOCK`` along
    the input dimension, fp32 activations); then the head's MatMul and the token embedding as in int8."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}
    head = [
        n.name
        for n in proto.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and inits[n.input[1]].dims[-1] == vocab_size
    ]
    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True, bits=4)
    quantizer = MatMulNBitsQuantizer(proto, nodes_to_exclude=head, algo_config=config)
    quantizer.process()
    four_bit = dst.with_suffix(".matmulnbits.onnx")
    quantizer.model.save_model_to_file(str(four_bit), use_external_data_format=False)
    try:
        int8 = _quantize_int8(four_bit, dst, vocab_size)
    finally:
        four_bit.unlink()
    quant = onnx.load(str(dst))
    return {
        "recipe": f"onnxruntime MatMulNBitsQuantizer (RTN, symmetric, block {INT4_BLOCK}); output head and "
        "embedding: quantize_dynamic int8",
        "weights": INT4_WEIGHTS,
        "matmulnbits": sum(n.op_type == "MatMulNBits" for n in quant.graph.node),
        "quantized_matmuls": int8["quantized_matmuls"],
        "embedding_dtype": int8["embedding_dtype"],
    }


def share_weights(paths: Sequence[Path], weights: Path) -> dict[str, int]:
    """Move the initializers of ``paths`` (graphs of one model, each a single protobuf) of ``SHARED_MIN_BYTES`` or
    more into ``weights``, each distinct tensor once: the graphs keep their nodes and small constants and point at
    an offset in ``weights`` for the rest (ONNX external data). Tensors are matched by their bytes, not their names:
    the exporter folds each weight's transpose into a constant named per graph. The exporter's per-node debug
    metadata (source stack traces) is dropped. Returns the bytes referenced by all graphs together and the bytes
    stored."""
    stored: dict[bytes, tuple[int, int]] = {}
    referenced = 0
    with open(weights, "wb") as blob:
        for path in paths:
            proto = onnx.load(str(path), load_external_data=False)
            for tensor in proto.graph.initializer:
                if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) < SHARED_MIN_BYTES:
                    continue
                data = tensor.raw_data
                key = hashlib.sha256(data).digest()
                if key not in stored:
                    if len(data) >= ALIGN_BYTES:
                        blob.write(b"\0" * (-blob.tell() % PAGE_BYTES))
                    stored[key] = (blob.tell(), len(data))
                    blob.write(data)
                offset, length = stored[key]
                referenced += length
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for k, v in (("location", weights.name), ("offset", str(offset)), ("length", str(length))):
                    tensor.external_data.add(key=k, value=v)
            for node in proto.graph.node:  # the exporter's per-node debug info (stack traces): most of a graph's bytes
                del node.metadata_props[:]
                node.ClearField("doc_string")
            onnx.save(proto, str(path))
    return {"referenced_bytes": referenced, "stored_bytes": sum(length for _, length in stored.values())}


def write(graphs: Mapping[str, GraphSpec], folder: Path, precision: str, facts: Mapping[str, Any]) -> list[dict]:
    """Write every graph at ``precision`` into ``folder``, their weights once in ``weights.<precision>.bin``; one
    record per graph file. int8 and int4 need the fp32 files first."""
    paths, quantizations = {}, {}
    for name, spec in graphs.items():
        path = paths[name] = folder / f"{name}.{precision}.onnx"
        if precision == "fp32":
            _export(spec, path)
            quantizations[name] = None
        else:
            quantize = _quantize_int8 if precision == "int8" else _quantize_int4
            quantizations[name] = quantize(folder / f"{name}.fp32.onnx", path, facts["vocab_size"])
        write_metadata(
            path,
            {**facts, "format": FORMAT, "graph": name, "precision": precision, "quantization": quantizations[name]},
        )
    weights = folder / f"weights.{precision}.bin"
    sharing = share_weights(list(paths.values()), weights)
    return [
        {
            "graphs": [name],
            "file": path,
            "weights_file": weights,
            "weight_sharing": sharing,
            "quantization": quantizations[name],
            "signatures": {name: signature(path)},
        }
        for name, path in paths.items()
    ]


class OrtGraph:
    """An onnxruntime session (CPU EP) called like the torch wrappers: tensors in (positional, in the session's input
    order), tensors out (in its output order)."""

    def __init__(self, path: str | os.PathLike):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = tuple(i.name for i in self.session.get_inputs())

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: np.asarray(t) for name, t in zip(self.input_names, tensors, strict=True)}
        return tuple(torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feeds))


def load(record: Mapping[str, Any], spec: GraphSpec) -> OrtGraph:
    """The session of ``record``'s file (one graph per ONNX file; inputs and outputs in ``spec``'s order)."""
    return OrtGraph(record["file"])
