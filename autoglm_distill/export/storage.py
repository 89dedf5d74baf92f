"""How sparse the student's weights are, and how each exported file stores the zeros.

A sparse student (``autoglm_distill.compress.sparsity.Sparsity``) gets smaller on disk only where the format stores
zeros sparse. Core ML does: ``coreml.py`` writes such weights as a bit mask plus the non-zero values
(``coremltools.optimize.coreml.prune_weights``). torch.onnx and litert-torch write every weight dense, so for those
files the manifest says that the zeros are stored as zeros rather than claiming a saving that is not there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autoglm_distill.models import MIN_ZERO_FRACTION

# int4, the same layout in every format: 4-bit symmetric blocks of INT4_BLOCK input weights; the token embedding and
# the output head (and weights that do not split into blocks) stay int8 per channel.
INT4_BLOCK = 32
INT4_WEIGHTS = f"int4 in blocks of {INT4_BLOCK} (embedding and output head int8 per channel)"

DENSE_FORMAT = "dense: the format/converter writes no sparse weights; zeros are stored as zeros"
DENSE_STUDENT = f"dense: under {MIN_ZERO_FRACTION:.0%} of the student's Linear weights are zero"


def weight_storage(facts: Mapping[str, Any], sparse_weights: int = 0, recipe: str | None = None) -> dict[str, Any]:
    """The ``weight_storage`` entry of a manifest artifact: whether the file stores the student's zeros sparse.

    Args:
        facts: the export's model facts (``weight_sparsity`` comes from ``models.weight_sparsity``).
        sparse_weights: how many weights the file really stores sparse (0: a format that writes every weight dense).
        recipe: how the sparse weights were written.
    """
    sparsity = facts.get("weight_sparsity") or {"zero_fraction": 0.0, "pattern": None}
    if sparse_weights:
        detail = f"sparse: {sparse_weights} weights stored as a bit mask plus their non-zero values ({recipe})"
    else:
        detail = DENSE_FORMAT if sparsity["pattern"] else DENSE_STUDENT
    return {"sparse": bool(sparse_weights), "sparse_weights": sparse_weights, "detail": detail, **sparsity}
