"""Mobile export of GLM-4 students: fixed-shape prefill/decode graphs in ONNX, TFLite and Core ML, verified."""

from autoglm_distill.export.exporter import ExportSettings, export_student
from autoglm_distill.export.graphs import DecodeGraph, PrefillGraph, graph_specs, greedy_generate
from autoglm_distill.export.verify import Bars, ExportVerificationError

__all__ = [
    "Bars",
    "DecodeGraph",
    "ExportSettings",
    "ExportVerificationError",
    "PrefillGraph",
    "export_student",
    "graph_specs",
    "greedy_generate",
]
