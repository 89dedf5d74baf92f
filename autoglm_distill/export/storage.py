"""How sparse the student's weights are, and how each exported file stores the zeros.

A sparse student (``autoglm_distill.compress.sparsity.Sparsity``) gets smaller on disk only where the format stores
zeros sparse. Core ML does: ``coreml.py`` writes such weights as a bit mask plus the non-zero values
(``coremltools.optimize.coreml.prune_weights``). torch.onnx and litert-torch write every weight dense, so for those
files the manifest says that the zeros are stored as zeros rather than claiming a saving that is not there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

# Below this fraction of zeros the student counts as dense. A sparse weight costs 1 mask bit per value plus its
# non-zero values, which pays off from about 1/16 zeros in fp16.
MIN_ZERO_FRACTION = 0.1
NM_GROUPS = (4, 8)  # the M of the N:M patterns that are recognised
DENSE_FORMAT = "dense: the format/converter writes no sparse weights; zeros are stored as zeros"
DENSE_STUDENT = f"dense: under {MIN_ZERO_FRACTION:.0%} of the student's Linear weights are zero"


def linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's ``nn.Linear`` modules by name, except an output head whose weight is the (tied) input
    embedding: embeddings are never sparsified."""
    get_embedding = getattr(model, "get_input_embeddings", None)
    embedding = get_embedding() if get_embedding is not None else None
    tied = getattr(embedding, "weight", None)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is not tied}


def nm_pattern(weights: Sequence[torch.Tensor]) -> str | None:
    """``"N:M"`` when every group of M consecutive weights along the input (last) dimension of every tensor has at
    least M-N zeros (the smallest M of ``NM_GROUPS`` that fits), else None."""
    for group in NM_GROUPS:
        if not weights or any(w.shape[-1] % group for w in weights):
            continue
        zeros = min(int((w.reshape(-1, group) == 0).sum(dim=1).min()) for w in weights)
        if zeros:
            return f"{group - zeros}:{group}"
    return None


def weight_sparsity(model: nn.Module) -> dict[str, Any]:
    """The zero fraction over the model's Linear weights and its pattern: ``"N:M"``, ``"unstructured"``, or None
    when under ``MIN_ZERO_FRACTION`` (a dense student)."""
    weights = [m.weight.detach() for m in linear_weights(model).values()]
    total = sum(w.numel() for w in weights)
    fraction = sum(int((w == 0).sum()) for w in weights) / total if total else 0.0
    pattern = None if fraction < MIN_ZERO_FRACTION else nm_pattern(weights) or "unstructured"
    return {"zero_fraction": round(fraction, 4), "pattern": pattern}


def weight_storage(facts: Mapping[str, Any], sparse_weights: int = 0, recipe: str | None = None) -> dict[str, Any]:
    """The ``weight_storage`` entry of a manifest artifact: whether the file stores the student's zeros sparse.

    Args:
        facts: the export's model facts (``weight_sparsity`` comes from ``weight_sparsity``).
        sparse_weights: how many weights the file really stores sparse (0: a format that writes every weight dense).
        recipe: how the sparse weights were written.
    """
    sparsity = facts.get("weight_sparsity") or {"zero_fraction": 0.0, "pattern": None}
    if sparse_weights:
        detail = f"sparse: {sparse_weights} weights stored as a bit mask plus their non-zero values ({recipe})"
    else:
        detail = DENSE_FORMAT if sparsity["pattern"] else DENSE_STUDENT
    return {"sparse": bool(sparse_weights), "sparse_weights": sparse_weights, "detail": detail, **sparsity}
