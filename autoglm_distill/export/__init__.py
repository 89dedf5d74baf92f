"""Mobile export of GLM-4 / GLM-4.1V students: fixed-shape graphs in ONNX, TFLite and Core ML, each verified."""

from autoglm_distill.export.exporter import ExportSettings, export_student
from autoglm_distill.export.graphs import (
    DecodeGraph,
    Glm4vDecodeGraph,
    Glm4vPrefillGraph,
    PrefillGraph,
    VisionGraph,
    graph_modules,
    graph_specs,
)
from autoglm_distill.export.verify import Bars, ExportVerificationError, Golden, Session

__all__ = [
    "Bars",
    "DecodeGraph",
    "ExportSettings",
    "ExportVerificationError",
    "Glm4vDecodeGraph",
    "Glm4vPrefillGraph",
    "Golden",
    "PrefillGraph",
    "Session",
    "VisionGraph",
    "export_student",
    "graph_modules",
    "graph_specs",
]
