"""ONNX artifacts: ``torch.onnx.export(dynamo=True)`` per graph, fp32 and dynamic int8 (onnxruntime quantization).

Files: ``prefill.fp32.onnx`` / ``decode.fp32.onnx`` and ``prefill.int8.onnx`` / ``decode.int8.onnx``, each a single
protobuf (which caps one graph at 2 GiB in fp32). Key facts go into the file's ``metadata_props``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from autoglm_distill.export.graphs import GraphSpec

FORMAT = "onnx"
PRECISIONS = ("fp32", "int8")
OPSET = 18
INT8_OP_TYPES = ("MatMul", "Gather")


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
    """Merge ``facts`` (non-strings as JSON) into the file's ``metadata_props``."""
    proto = onnx.load(str(path))
    merged = {p.key: p.value for p in proto.metadata_props}
    merged.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in facts.items()})
    del proto.metadata_props[:]
    for key, value in merged.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def _export(spec: GraphSpec, path: Path) -> None:
    with torch.no_grad():
        torch.onnx.export(
            spec.module,
            tuple(spec.example.values()),
            str(path),
            dynamo=True,
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
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
        "op_types": list(INT8_OP_TYPES),
        "quantized_matmuls": sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in quant.graph.node),
        # Dynamic quantization stores a Gather's table with the activation type (uint8, per tensor).
        "embedding_dtype": embedding[0] if embedding else "float32",
    }


def write(specs: Mapping[str, GraphSpec], folder: Path, precision: str, facts: Mapping[str, Any]) -> list[dict]:
    """Write both graphs at ``precision`` into ``folder``; one record per file. int8 needs the fp32 files first."""
    records = []
    for name, spec in specs.items():
        path = folder / f"{name}.{precision}.onnx"
        if precision == "fp32":
            _export(spec, path)
            quantization = None
        else:
            quantization = _quantize_int8(folder / f"{name}.fp32.onnx", path, facts["vocab_size"])
        write_metadata(
            path, {**facts, "format": FORMAT, "graph": name, "precision": precision, "quantization": quantization}
        )
        records.append(
            {"graphs": [name], "file": path, "quantization": quantization, "signatures": {name: signature(path)}}
        )
    return records


class OrtGraph:
    """An onnxruntime session (CPU EP) called like the torch wrappers: tensors in (positional), tensors out."""

    def __init__(self, path: str | os.PathLike, input_names: Sequence[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = tuple(input_names or (i.name for i in self.session.get_inputs()))

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: np.asarray(t) for name, t in zip(self.input_names, tensors, strict=True)}
        return tuple(torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feeds))


def load(record: Mapping[str, Any], graph: str, input_names: Sequence[str], output_names: Sequence[str]) -> OrtGraph:
    """The session of ``record``'s file (one graph per ONNX file; outputs come in the exported order)."""
    return OrtGraph(record["file"], input_names)
