"""Mobile export of text-only GLM-4 students: fixed-shape prefill/decode graphs and the ONNX exporter."""

from autoglm_distill.export.graphs import DecodeGraph, PrefillGraph, greedy_generate
from autoglm_distill.export.onnx import ExportVerificationError, export_onnx, read_metadata, verify_onnx

__all__ = [
    "DecodeGraph",
    "ExportVerificationError",
    "PrefillGraph",
    "export_onnx",
    "greedy_generate",
    "read_metadata",
    "verify_onnx",
]
