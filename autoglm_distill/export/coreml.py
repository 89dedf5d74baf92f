"""Core ML artifacts: one ``student.<precision>.mlpackage`` per precision (mlprogram, iOS 18 target), a function per
graph (``prefill_<S>`` per bucket, ``decode``, and ``vision`` for GLM-4.1V): each graph is converted on its own, then
the functions are merged with ``coremltools.utils.save_multifunction``, which stores weights with equal values once,
so the package holds one copy of the weights (the app picks the function with ``MLModelConfiguration.functionName``).

The KV cache is Core ML state (``ct.StateType``, one fp16 state per cache, ``kv_cache_k_<i>`` / ``kv_cache_v_<i>``
[1, KV, C, D]): the app makes one ``MLState`` with ``makeState()`` and passes it to every prefill and decode call;
the functions read and update it in place (``read_state`` / ``write_state`` in the program). The write is a matmul
with the one-hot positions (Core ML's converter has no scatter of several rows at a run-time position). Prefill's
one output, ``next_input_pos`` [1], is the position after the last one written (where a next chunk starts).

The graphs go through ``torch.export`` + ``run_decompositions({})`` (coremltools' torch.export path needs the core
ATen opset) into ``coremltools.convert`` with fp16 compute precision. int8 is ``coremltools.optimize``'s
``linear_quantize_weights`` (symmetric, per output channel) on every parameter, embedding included; constants that
are not weights (the causal mask, the rotary tables) stay fp16.

Core ML cannot execute on Linux (``predict`` is macOS-only), so ``check_structure`` verifies what can be verified
here: the package loads (``skip_model_load=True``), has the declared inputs/outputs, every weight is present in the
declared precision, and the weight values equal the student's within fp16 (or int8 step) rounding. ``predict_parity``
runs the real thing on macOS.

A sparse student (``export/storage.py``) has its sparse parameters stored as a bit mask plus the non-zero values
(``coremltools.optimize.coreml.prune_weights``, ``constexpr_sparse_to_dense``); int8 quantizes those non-zero values
(joint sparse + int8 compression, ``constexpr_sparse_blockwise_shift_scale``). The structural check decodes both.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoglm_distill.export.graphs import GraphSpec, graph_specs
from autoglm_distill.export.storage import INT4_BLOCK, INT4_WEIGHTS, MIN_ZERO_FRACTION, weight_storage

FORMAT = "coreml"
PRECISIONS = ("fp16", "int8", "int4")
RECIPES = {
    "int8": "coremltools.optimize.coreml.linear_quantize_weights(linear_symmetric, int8, per_channel)",
    "int4": f"coremltools.optimize.coreml.linear_quantize_weights(linear_symmetric, int4, per_block {INT4_BLOCK}); "
    "int8 per_channel for the embedding, the output head and weights that are not 2-D or not divisible in blocks",
}
WEIGHTS = {
    "int8": "int8 per output channel (embedding included)",
    "int4": INT4_WEIGHTS,
}
SPARSE_RECIPE = "coremltools.optimize.coreml.prune_weights(OpThresholdPrunerConfig(threshold=1e-12))"
SPARSE_RECIPES = {
    "fp16": SPARSE_RECIPE + ": fp16 non-zero values",
    "int8": SPARSE_RECIPE + ", then linear_quantize_weights(joint_compression=True): int8 non-zero values",
    "int4": SPARSE_RECIPE + ", then linear_quantize_weights(joint_compression=True): int4/int8 non-zero values",
}
FP16_RTOL = 2.0**-10  # fp16 has an 11-bit significand: rounding is within 2^-11 relative

log = logging.getLogger(__name__)
CACHE_UPDATE = "one_hot"
KV_CACHE = {
    "io": "state kv_cache_k_<i> / kv_cache_v_<i> (MLState from makeState()): per layer [1, KV, C, D] float16",
    "update": "in place in the state (read_state / write_state), written as a matmul with the one-hot positions",
}


class _Stateful(torch.nn.Module):
    """A graph whose caches are buffers updated in place (``copy_``), which coremltools converts to Core ML state."""

    def __init__(self, spec: GraphSpec):
        super().__init__()
        self.step = spec.module
        self.states = tuple(n for n in spec.inputs if n.startswith("kv_cache_"))
        for name in self.states:
            self.register_buffer(name, torch.zeros_like(spec.example[name]))
        self.logits = spec.outputs[0] == "logits"

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.step(*inputs, *(getattr(self, n) for n in self.states))
        updated = out[1:] if self.logits else out
        for name, value in zip(self.states, updated, strict=True):
            getattr(self, name).copy_(value)
        if self.logits:
            return out[0]
        return inputs[1][-1:] + 1  # next_input_pos: Core ML functions need an output


def specs(model: torch.nn.Module, facts: Mapping[str, Any]) -> dict[str, GraphSpec]:
    """The graphs with their caches as state: inputs without the caches, outputs ``logits`` (decode),
    ``next_input_pos`` (prefill) or ``image_embeds`` (vision)."""
    out = {}
    for name, spec in graph_specs(model, facts, CACHE_UPDATE).items():
        if not any(n.startswith("kv_cache_") for n in spec.inputs):
            out[name] = spec
            continue
        module = _Stateful(spec).eval()
        example = {n: t for n, t in spec.example.items() if n not in module.states}
        out[name] = GraphSpec(name, module, example, ("logits",) if module.logits else ("next_input_pos",))
    return out


def converter_versions() -> dict[str, str]:
    import coremltools

    return {"torch": torch.__version__, "coremltools": coremltools.__version__}


def _const_name(parameter: str) -> str:
    """The name torch.export + coremltools give a parameter's fp16 constant."""
    return "p_" + parameter.replace(".", "_") + "_to_fp16"


def package_weights(path, function: str = "main") -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Every weight constant of one function of an mlprogram package, read from its spec and weight blob:
    ``{op name: (values, None)}`` for plain constants and ``{op name: (int8 data, scale)}`` for
    ``constexpr_blockwise_shift_scale``.
    A ``constexpr_sparse_to_dense`` weight (name ``..._sparsified``) comes back dense, zeros filled in: fp16 values,
    or int8 data and scale when its non-zero values are quantized (``constexpr_sparse_blockwise_shift_scale``).

    (``coremltools.optimize.coreml.get_weights_metadata`` is not used: within one process it returned dequantized
    constants for a package it had read before.)"""
    import coremltools as ct
    from coremltools.libmilstoragepython import _BlobStorageReader
    from coremltools.proto import MIL_pb2

    model = ct.models.MLModel(str(path), skip_model_load=True)
    function = model.get_spec().mlProgram.functions[function]
    reader = _BlobStorageReader(str(Path(model.weights_dir) / "weight.bin"))
    readers = {
        "float16": "read_fp16_data",
        "float32": "read_float_data",
        "int8": "read_int8_data",
        "int4": "read_int4_data",
        "uint1": "read_uint1_data",
    }

    def value(proto) -> np.ndarray | None:
        if not proto.HasField("blobFileValue"):
            return None
        tensor = proto.type.tensorType
        dtype = MIL_pb2.DataType.Name(tensor.dataType).lower()
        if dtype not in readers:
            return None
        data = np.asarray(getattr(reader, readers[dtype])(proto.blobFileValue.offset))
        data = data.view(np.float16) if dtype == "float16" else data
        shape = [d.constant.size for d in tensor.dimensions]
        return data[: int(np.prod(shape))].reshape(shape)  # uint1 is read as one byte per bit, padded to whole bytes

    produced = {}  # outputs of sparse quantized constants, by name, for the constexpr_sparse_to_dense that reads them

    def argument(op, key: str):
        binding = op.inputs[key].arguments[0]
        return produced.get(binding.name) if binding.name else value(binding.value)

    out = {}
    for op in function.block_specializations[function.opset].operations:
        if not op.outputs:  # write_state
            continue
        name = op.outputs[0].name
        if op.type == "const":
            values = value(op.attributes["val"])
            if values is not None:
                out[name] = (values, None)
        elif op.type == "constexpr_blockwise_shift_scale" and "offset" not in op.inputs:
            data = value(op.inputs["data"].arguments[0].value)
            scale = value(op.inputs["scale"].arguments[0].value)
            if data is not None and scale is not None:
                out[name] = (data, scale)
        elif op.type == "constexpr_sparse_blockwise_shift_scale" and "offset" not in op.inputs:
            data, scale = argument(op, "nonzero_data"), argument(op, "scale")
            produced[op.outputs[0].name] = argument(op, "data_mask")
            produced[op.outputs[1].name] = None if data is None or scale is None else (data, scale)
        elif op.type == "constexpr_sparse_to_dense":
            mask, nonzero = argument(op, "mask"), argument(op, "nonzero_data")
            if mask is None or nonzero is None:
                continue
            data, scale = nonzero if isinstance(nonzero, tuple) else (nonzero, None)
            dense = np.zeros(mask.shape, dtype=data.dtype)
            dense[mask != 0] = data
            out[name] = (dense, scale)
    return out


def _convert(spec: GraphSpec):
    import coremltools as ct

    with torch.no_grad():
        program = torch.export.export(spec.module, tuple(spec.example.values())).run_decompositions({})
    inputs = [
        ct.TensorType(name=name, shape=tuple(t.shape), dtype=np.int32 if t.dtype == torch.int32 else np.float32)
        for name, t in spec.example.items()
    ]
    states = [
        ct.StateType(wrapped_type=ct.TensorType(shape=tuple(getattr(spec.module, n).shape), dtype=np.float16), name=n)
        for n in getattr(spec.module, "states", ())
    ]
    return ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        inputs=inputs,
        states=states,
        outputs=[ct.TensorType(name=name) for name in spec.outputs],
    )


def _sparsify(model):
    """Store every parameter with at least ``MIN_ZERO_FRACTION`` exact zeros sparse. The threshold is below the
    smallest fp16 magnitude, so exactly the zeros leave the stored values."""
    import coremltools.optimize as cto

    pruner = cto.coreml.OpThresholdPrunerConfig(
        threshold=1e-12, minimum_sparsity_percentile=MIN_ZERO_FRACTION, weight_threshold=1
    )
    names = [
        name
        for name, (values, _) in package_weights(model.package_path).items()
        if name.startswith("p_") and np.mean(values == 0) >= MIN_ZERO_FRACTION
    ]
    return cto.coreml.prune_weights(model, cto.coreml.OptimizationConfig(op_name_configs={n: pruner for n in names}))


def _int4_weights(path, function: str) -> set[str]:
    """Names of the weights one function of the package stores as 4-bit blocks (a sparse one under the name of its
    ``constexpr_sparse_to_dense``)."""
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    function = ct.models.MLModel(str(path), skip_model_load=True).get_spec().mlProgram.functions[function]
    names = set()
    for op in function.block_specializations[function.opset].operations:
        arguments = [a for key in ("data", "nonzero_data") if key in op.inputs for a in op.inputs[key].arguments]
        if op.type in ("constexpr_blockwise_shift_scale", "constexpr_sparse_blockwise_shift_scale") and any(
            a.value.type.tensorType.dataType == MIL_pb2.DataType.INT4 for a in arguments
        ):
            names.update(o.name for o in op.outputs)
        elif op.type == "constexpr_sparse_to_dense" and any(a.name in names for a in arguments):
            names.add(op.outputs[0].name)
    return names


def _sparse_weights(path) -> int:
    """How many weights the package stores sparse (a weight that several functions read counts once)."""
    import coremltools as ct

    names = set()
    for function in ct.models.MLModel(str(path), skip_model_load=True).get_spec().mlProgram.functions.values():
        operations = function.block_specializations[function.opset].operations
        names.update(op.outputs[0].name for op in operations if op.type == "constexpr_sparse_to_dense")
    return len(names)


def _quantize(model, precision: str, vocab_size: int, sparse: bool = False):
    """int8 per output channel, or int4 in blocks of ``INT4_BLOCK`` input weights (the embedding and output head,
    whose first dimension is the vocabulary, and weights that do not split into blocks stay int8); ``sparse``: a
    sparse weight's non-zero values are quantized and stay sparse."""
    import coremltools.optimize as cto

    int8 = cto.coreml.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=1
    )
    int4 = cto.coreml.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=(1, INT4_BLOCK), weight_threshold=1
    )

    def choose(values: np.ndarray):
        blocks = values.ndim == 2 and values.shape[0] != vocab_size and values.shape[1] % INT4_BLOCK == 0
        return int4 if precision == "int4" and blocks else int8

    weights = package_weights(model.package_path)
    names = {name: choose(values) for name, (values, _) in weights.items() if name.startswith("p_")}
    config = cto.coreml.OptimizationConfig(op_name_configs=names)
    # An all-zero row (the padding token's embedding) has scale 0: numpy warns on 0/0, the row dequantizes to 0.
    with np.errstate(invalid="ignore", divide="ignore"):
        return cto.coreml.linear_quantize_weights(model, config, joint_compression=sparse)


def _set_metadata(model, facts: Mapping[str, Any]) -> None:
    for key, value in facts.items():
        model.user_defined_metadata[key] = value if isinstance(value, str) else json.dumps(value)


def read_metadata(path) -> dict[str, str]:
    import coremltools as ct

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    return dict(spec.description.metadata.userDefined)


def signature(path, function: str) -> dict[str, list[dict]]:
    """Inputs, outputs and states of one function of a multifunction package."""
    import coremltools as ct

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    description = next(f for f in spec.description.functions if f.name == function)
    array = ct.proto.FeatureTypes_pb2.ArrayFeatureType

    def describe(features) -> list[dict]:
        out = []
        for feature in features:
            kind = feature.type.WhichOneof("Type")
            multi = feature.type.stateType.arrayType if kind == "stateType" else feature.type.multiArrayType
            dtype = array.ArrayDataType.Name(multi.dataType).lower()
            out.append({"name": feature.name, "shape": [int(d) for d in multi.shape], "dtype": dtype})
        return out

    return {
        "inputs": describe(description.input),
        "outputs": describe(description.output),
        "states": describe(description.state),
    }


def _quiet_converter() -> None:
    """coremltools logs every graph-pass op removal at INFO, which drowns the run's log."""
    logging.getLogger("coremltools").setLevel(logging.WARNING)


def _merge(parts: Mapping[str, Path], path: Path) -> None:
    """One package at ``path`` with a function per single-function package in ``parts`` (name -> package)."""
    import coremltools as ct

    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, part in parts.items():
        descriptor.add_function(str(part), "main", name)
    descriptor.default_function_name = next(iter(parts))
    ct.utils.save_multifunction(descriptor, str(path))


def _single_function(package: Path, function: str, path: Path):
    """``function`` of a multifunction package as a plain single-function model (``coremltools.optimize`` refuses
    multifunction models): extracted into ``path`` with ``save_multifunction``, then its description made the
    model's own (the structural check verifies what comes out of it)."""
    import coremltools as ct

    descriptor = ct.utils.MultiFunctionDescriptor()
    descriptor.add_function(str(package), function, "main")
    descriptor.default_function_name = "main"
    ct.utils.save_multifunction(descriptor, str(path))
    extracted = ct.models.MLModel(str(path), skip_model_load=True)
    spec = extracted.get_spec()
    (description,) = spec.description.functions
    spec.description.input.extend(description.input)
    spec.description.output.extend(description.output)
    spec.description.state.extend(description.state)
    del spec.description.functions[:]
    spec.description.defaultFunctionName = ""
    return ct.models.MLModel(spec, weights_dir=extracted.weights_dir, skip_model_load=True)


def write(graphs: Mapping[str, GraphSpec], folder: Path, precision: str, facts: Mapping[str, Any]) -> list[dict]:
    """Write ``student.<precision>.mlpackage``, a function per graph, the weights once. Each graph is converted (fp16)
    or quantized from the fp16 package's function (int8, int4; fp16 is written first) on its own, then the functions
    are merged."""
    import coremltools as ct

    _quiet_converter()
    sparse = bool((facts.get("weight_sparsity") or {}).get("pattern"))
    quantization = (
        None
        if precision == "fp16"
        else {"recipe": RECIPES[precision], "weights": WEIGHTS[precision], "activations": "fp16"}
    )
    path = folder / f"student.{precision}.mlpackage"
    with tempfile.TemporaryDirectory(dir=folder) as parts_dir:
        parts = {}
        for name, spec in graphs.items():
            if precision == "fp16":
                model = _sparsify(_convert(spec)) if sparse else _convert(spec)
            else:
                single = Path(parts_dir) / f"{name}.fp16.mlpackage"
                fp16 = _single_function(folder / "student.fp16.mlpackage", name, single)
                model = _quantize(fp16, precision, facts["vocab_size"], sparse)
            parts[name] = Path(parts_dir) / f"{name}.mlpackage"
            model.save(str(parts[name]))
        merged = Path(parts_dir) / "merged.mlpackage"
        _merge(parts, merged)
        model = ct.models.MLModel(str(merged), skip_model_load=True)
        _set_metadata(
            model,
            {
                **facts,
                "format": FORMAT,
                "graphs": list(graphs),
                "precision": precision,
                "quantization": quantization,
                "kv_cache": "state",
            },
        )
        model.save(str(path))  # (MLModel.save cannot write over the package it was read from)
    return [
        {
            "graphs": list(graphs),
            "file": path,
            "quantization": quantization,
            "signatures": {name: signature(path, name) for name in graphs},
            "weight_storage": weight_storage(facts, _sparse_weights(path), SPARSE_RECIPES[precision]),
        }
    ]


def check_structure(record: Mapping[str, Any], specs: Mapping[str, GraphSpec], precision: str, graph: str) -> dict:
    """What can be checked of one function (``graph``) of a Core ML package off macOS (see the module docstring);
    figures plus ``passed``."""
    spec = specs[graph]
    io = signature(record["file"], graph)
    states = {n: list(getattr(spec.module, n).shape) for n in getattr(spec.module, "states", ())}
    io_ok = (
        [i["name"] for i in io["inputs"]] == list(spec.inputs)
        and [o["name"] for o in io["outputs"]] == list(spec.outputs)
        and all(i["shape"] == list(spec.example[i["name"]].shape) for i in io["inputs"])
        and {s["name"]: s["shape"] for s in io["states"]} == states
    )

    consts = package_weights(record["file"], graph)
    int4_names = _int4_weights(record["file"], graph)
    parameters = used_parameters(spec)
    missing, folded, worst, compressed, four_bit, sparse = [], [], 0.0, 0, 0, 0
    for name, parameter in parameters.items():
        expected = parameter.detach().float().numpy()
        plain, packed = consts.get(_const_name(name)), consts.get(_const_name(name) + "_quantized")
        stored_sparse = consts.get(_const_name(name) + "_sparsified")
        if stored_sparse is not None:
            sparse += 1
            plain, packed = (stored_sparse, None) if stored_sparse[1] is None else (None, stored_sparse)
        if (
            plain is None
            and packed is None
            and expected.ndim == 1
            and np.all(expected == expected.flat[0])
            and (expected.flat[0] in (0.0, 1.0))
        ):
            folded.append(name)  # an all-ones scale or all-zeros bias: the converter drops the no-op multiply/add
            continue
        if packed is not None:
            data, scale = packed
            compressed += 1
            four_bit += bool({_const_name(name) + "_quantized", _const_name(name) + "_sparsified"} & int4_names)
            step = scale.astype(np.float32).reshape(scale.shape + (1,) * (expected.ndim - scale.ndim))
            for axis, (size, blocks) in enumerate(zip(data.shape, step.shape, strict=True)):  # per block: repeat
                step = np.repeat(step, size // blocks, axis=axis)
            values = data.astype(np.float32) * step
            # Half a quantization step, plus the fp16 rounding of the weight and of the scale.
            tolerance = 0.5 * step + np.abs(expected) * FP16_RTOL + 127 * step * FP16_RTOL
        elif plain is not None and not (precision != "fp16" and expected.ndim >= 2):
            values = plain[0].astype(np.float32)
            tolerance = np.abs(expected) * FP16_RTOL
        else:
            missing.append(name)
            continue
        if values.shape != expected.shape:
            missing.append(f"{name} (shape {list(values.shape)} != {list(expected.shape)})")
            continue
        worst = max(worst, float((np.abs(values - expected) / (tolerance + 1e-7)).max()))
    checked = len(parameters) - len(missing) - len(folded)
    passed = io_ok and not missing and checked > 0 and worst <= 1.0
    return {
        "check": "structural (Core ML predict runs on macOS only)",
        "io_as_declared": io_ok,
        "weights_checked": checked,
        "weights_folded_as_identity": len(folded),
        "weights_missing": missing[:10],
        "weights_int8": compressed - four_bit,
        "weights_int4": four_bit,
        "weights_sparse": sparse,
        "worst_weight_error_in_tolerances": worst,
        "passed": bool(passed),
    }


def _has_effects(node: torch.fx.Node) -> bool:
    return node.is_impure() and node.target is not torch.ops.aten._assert_tensor_metadata.default


def used_parameters(spec: GraphSpec) -> dict[str, torch.Tensor]:
    """The parameters the graph really uses (a graph holds the whole model, vision tower included, and a prefill graph
    computes no logits), under the names torch.export gives them, which are the names the converter derives its
    constants' names from."""
    if not hasattr(spec, "_used_parameters"):
        with torch.no_grad():
            program = torch.export.export(spec.module, tuple(spec.example.values()))
        # Drop what no output depends on (e.g. the last layer's query and MLP in a prefill graph), as the converter
        # does; torch.export's metadata asserts count as side effects by default and would keep it all.
        program.graph_module.graph.eliminate_dead_code(is_impure_node=_has_effects)
        signature = program.graph_signature
        spec._used_parameters = {
            signature.inputs_to_parameters[node.name]: program.state_dict[signature.inputs_to_parameters[node.name]]
            for node in program.graph.nodes
            if node.op == "placeholder" and node.name in signature.inputs_to_parameters and node.users
        }
    return spec._used_parameters


def predict_parity(record: Mapping[str, Any], spec: GraphSpec, graph: str) -> dict:
    """macOS only: run the package's ``graph`` function (a graph with ``logits``: decode) with Core ML on the graph's
    example inputs and fresh (zero) state, and compare with PyTorch."""
    import coremltools as ct

    model = ct.models.MLModel(str(record["file"]), compute_units=ct.ComputeUnit.CPU_ONLY, function_name=graph)
    feeds = {name: t.numpy() for name, t in spec.example.items()}
    out = model.predict(feeds, state=model.make_state())
    stateful = spec.module
    with torch.no_grad():  # the wrapped graph on zero caches, leaving the wrapper's buffers as they are
        zeros = [torch.zeros_like(getattr(stateful, n)) for n in stateful.states]
        expected = stateful.step(*spec.example.values(), *zeros)[0]
    logits = np.asarray(out["logits"], dtype=np.float32).reshape(-1)
    reference = expected.float().numpy().reshape(-1)
    return {
        "logits_max_abs_diff": float(np.abs(logits - reference).max()),
        "top1_match": bool(int(logits.argmax()) == int(reference.argmax())),
    }
