"""TFLite / LiteRT artifacts: one ``.tflite`` per precision holding every graph as a named signature.

``litert-torch`` converts the fixed-shape graphs (it needs static shapes and int32 token inputs, which the graphs
have); the weights are stored once and shared by the ``prefill_<S>`` and ``decode`` signatures. The signatures follow
LiteRT-LM's conventions (``tokens``, ``input_pos``, ``kv_cache_k_<i>`` / ``kv_cache_v_<i>`` in and out, the write a
``DYNAMIC_UPDATE_SLICE`` at ``input_pos``, which LiteRT does in place when the runtime binds one buffer to a cache's
input and output, as LiteRT-LM does). int8 is
ai-edge-quantizer's ``dynamic_wi8_afp32`` recipe (int8 per-channel weights, embedding table included, fp32
activations quantized on the fly); int4 is ``dynamic_wi4b32_afp32`` with the embedding and output head kept int8
(``int4_recipe``). Key facts go into the flatbuffer's metadata under ``autoglm_distill`` (JSON).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoglm_distill.export.graphs import GraphSpec, graph_specs
from autoglm_distill.export.storage import INT4_BLOCK, INT4_WEIGHTS

FORMAT = "tflite"
PRECISIONS = ("fp32", "int8", "int4")
METADATA_NAME = "autoglm_distill"
INT8_RECIPE = "ai_edge_quantizer.recipe.dynamic_wi8_afp32"
INT4_RECIPE = (
    "ai_edge_quantizer.recipe.dynamic_wi4b32_afp32, with dynamic_wi8_afp32 for EMBEDDING_LOOKUP and for the "
    "FULLY_CONNECTED that writes the logits"
)
# The output head's FULLY_CONNECTED writes the signature's logits output, which litert-torch names
# <signature>_logits_output.
HEAD_OUTPUT_REGEX = ".*_logits_output"


def int4_recipe(path: str | os.PathLike) -> list[dict]:
    """4-bit weights in symmetric blocks of ``INT4_BLOCK`` (``dynamic_wi4b32_afp32``), except, int8 per channel: the
    token embedding and the output head (their rows pick or score single tokens, where 4-bit error shows most), and
    ops of ``path`` whose weight's input dimension does not split into blocks (a vision patch embedding of 1176).
    Later entries override earlier ones."""
    import re

    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer import recipe

    (int8,) = recipe.dynamic_wi8_afp32()
    entries = [
        *recipe.dynamic_wi4b32_afp32(),
        {**int8, "regex": ".*", "operation": "EMBEDDING_LOOKUP"},
        {**int8, "regex": HEAD_OUTPUT_REGEX, "operation": "FULLY_CONNECTED"},
    ]
    model = flatbuffer_utils.read_model(str(path))
    for graph in model.subgraphs:
        for op in graph.operators:
            weights = [graph.tensors[i] for i in op.inputs[1:2] if i >= 0 and graph.tensors[i].buffer]
            if weights and len(weights[0].shape) >= 2 and weights[0].shape[-1] % INT4_BLOCK:
                name = graph.tensors[op.outputs[0]].name.decode()
                entries.append({**int8, "regex": re.escape(name), "operation": "*"})
    return entries


CACHE_UPDATE = "dynamic_update_slice"
KV_CACHE = {
    "io": "kv_cache_k_<i> / kv_cache_v_<i> in and out (same names): per layer [1, KV, C, D] float32",
    "update": "DYNAMIC_UPDATE_SLICE at input_pos: in place where the runtime binds one buffer to a cache's input and "
    "output (LiteRT-LM); the Python interpreter copies it",
}


def specs(model: torch.nn.Module, facts: Mapping[str, Any]) -> dict[str, GraphSpec]:
    return graph_specs(model, facts, CACHE_UPDATE)


def converter_versions() -> dict[str, str]:
    return {"torch": torch.__version__} | {
        name: importlib.metadata.version(name) for name in ("litert-torch", "ai-edge-litert", "ai-edge-quantizer")
    }


class _NamedOutputs(nn.Module):
    """Returns the graph's outputs as a dict, which litert-torch turns into the signature's output names."""

    def __init__(self, spec: GraphSpec):
        super().__init__()
        self.step = spec.module  # not "graph": the name would shadow GraphModule.graph once exported
        self.names = spec.outputs

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.step(*inputs.values())
        return dict(zip(self.names, out if isinstance(out, tuple) else (out,), strict=True))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``autoglm_distill`` metadata of a .tflite file (``{}`` when absent)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == METADATA_NAME:
            return json.loads(bytes(model.buffers[entry.buffer].data).decode())
    return {}


def write_metadata(path: str | os.PathLike, facts: Mapping[str, Any]) -> None:
    """Merge ``facts`` into the file's ``autoglm_distill`` metadata entry."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    merged = {**read_metadata(path), **facts}
    data = np.frombuffer(json.dumps(merged).encode(), dtype=np.uint8)
    entries = [
        e for e in (model.metadata or []) if (e.name.decode() if isinstance(e.name, bytes) else e.name) == METADATA_NAME
    ]
    if entries:
        model.buffers[entries[0].buffer].data = data
    else:
        buffer = schema.BufferT()
        buffer.data = data
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = METADATA_NAME
        entry.buffer = len(model.buffers) - 1
        model.metadata = [*(model.metadata or []), entry]
    flatbuffer_utils.write_model(model, str(path))


def signatures(path: str | os.PathLike) -> dict[str, dict[str, list[dict]]]:
    """Per signature: inputs and outputs with name, shape and dtype, as the LiteRT interpreter reports them."""
    interpreter = _interpreter(path)
    out = {}
    for name in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(name)

        def describe(details: dict) -> list[dict]:
            return [
                {"name": key, "shape": [int(d) for d in value["shape"]], "dtype": np.dtype(value["dtype"]).name}
                for key, value in details.items()
            ]

        out[name] = {"inputs": describe(runner.get_input_details()), "outputs": describe(runner.get_output_details())}
    return out


def _interpreter(path: str | os.PathLike):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path))


def write(graphs: Mapping[str, GraphSpec], folder: Path, precision: str, facts: Mapping[str, Any]) -> list[dict]:
    """Write ``student.<precision>.tflite`` with a signature per graph. int8 and int4 need the fp32 file first."""
    path = folder / f"student.{precision}.tflite"
    if precision == "fp32":
        import litert_torch

        converter = None
        for name, spec in graphs.items():
            step = litert_torch.signature if converter is None else converter.signature
            converter = step(name, _NamedOutputs(spec).eval(), sample_kwargs=spec.example)
        converter.convert().export(str(path))
        quantization = None
    else:
        from ai_edge_quantizer import quantizer, recipe

        fp32 = folder / "student.fp32.tflite"
        chosen = recipe.dynamic_wi8_afp32() if precision == "int8" else int4_recipe(fp32)
        result = quantizer.Quantizer(str(fp32), chosen).quantize()
        result.export_model(str(path), overwrite=True)
        quantization = {
            "recipe": INT8_RECIPE if precision == "int8" else INT4_RECIPE,
            "weights": "int8 per channel (embedding included)" if precision == "int8" else INT4_WEIGHTS,
            "activations": "fp32, quantized dynamically",
        }
    write_metadata(
        path, {**facts, "format": FORMAT, "graphs": list(graphs), "precision": precision, "quantization": quantization}
    )
    return [{"graphs": list(graphs), "file": path, "quantization": quantization, "signatures": signatures(path)}]


class LiteRtGraph:
    """One signature of a .tflite file called like the torch wrappers: tensors in (positional), tensors out."""

    def __init__(self, path: str | os.PathLike, graph: str, input_names: Sequence[str], output_names: Sequence[str]):
        self.runner = _interpreter(path).get_signature_runner(graph)
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: np.asarray(t) for name, t in zip(self.input_names, tensors, strict=True)}
        out = self.runner(**feeds)
        return tuple(torch.from_numpy(np.array(out[name])) for name in self.output_names)


def load(record: Mapping[str, Any], spec: GraphSpec) -> LiteRtGraph:
    return LiteRtGraph(record["file"], spec.name, spec.inputs, spec.outputs)
