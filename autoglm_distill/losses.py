"""Token-level knowledge-distillation losses: ``alpha * T**2 * D(teacher_T, student_T) + (1 - alpha) * CE``.

Both terms are means over the supervised tokens, computed in (at least) fp32 from ``log_softmax``;
``-inf`` logits (masked vocabulary entries) never produce NaNs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


def _check_params(kind: str, temperature: float, beta: float, skew: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown divergence kind {kind!r}; expected one of {', '.join(KINDS)}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}.")
    if not 0 <= skew < 1:
        raise ValueError(f"skew must be in [0, 1), got {skew}.")


def _check_same_shape(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} does not match "
            f"teacher_logits shape {tuple(teacher_logits.shape)}."
        )


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(A || B) summed over the last dim; entries with a == 0 contribute exactly 0 (also in backward)."""
    a = log_a.exp()
    # Masking the difference (not the product) keeps -inf - -inf = nan out of both passes.
    diff = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * diff).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w * A + (1 - w) * B) for 0 < w < 1, stable and NaN-free where both A and B are 0."""
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    x = torch.where(both_zero, 0.0, log_a + math.log(w))  # logsumexp of the two weighted terms;
    y = torch.where(both_zero, 0.0, log_b + math.log1p(-w))  # dummy 0s avoid a nan gradient at -inf/-inf
    return torch.where(both_zero, -math.inf, torch.logaddexp(x, y))


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """At least fp32 (bf16/fp16 are upcast); fp64 stays fp64."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """Per-token divergence between teacher (P) and student (Q) distributions at temperature T.

    Kinds: ``forward_kl`` KL(P||Q); ``reverse_kl`` KL(Q||P); ``jsd`` the generalized JSD of TRL's GKD,
    ``beta * KL(P||M) + (1 - beta) * KL(Q||M)`` with ``M = beta * P + (1 - beta) * Q``, where, following
    TRL's convention, ``beta == 0`` gives exactly KL(P||Q) and ``beta == 1`` exactly KL(Q||P) (note that
    the formula itself tends to 0 at those ends); ``skew_forward_kl`` (DistiLLM)
    KL(P || skew * P + (1 - skew) * Q); ``skew_reverse_kl`` KL(Q || skew * Q + (1 - skew) * P).

    Args:
        student_logits: Student logits, shape ``[N, V]`` (any leading dims are allowed).
        teacher_logits: Teacher logits, same shape as ``student_logits``.
        kind: One of ``KINDS``.
        temperature: Softmax temperature T > 0 applied to both distributions.
        beta: JSD interpolation weight in [0, 1] (``jsd`` only).
        skew: Skew weight in [0, 1) (``skew_*`` only); 0 recovers the plain KL.

    Returns:
        Divergence summed over the vocabulary, shape ``[N]``, in fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: On an unknown kind, invalid parameters or mismatched shapes.
    """
    _check_params(kind, temperature, beta, skew)
    _check_same_shape(student_logits, teacher_logits)
    dtype = _compute_dtype(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0) or (kind == "skew_forward_kl" and skew == 0):
        return _kl(log_p, log_q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1) or (kind == "skew_reverse_kl" and skew == 0):
        return _kl(log_q, log_p)
    if kind == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if kind == "skew_forward_kl":
        return _kl(log_p, _log_mix(log_p, log_q, skew))
    return _kl(log_q, _log_mix(log_q, log_p, skew))


@dataclass
class DistillationLossOutput:
    """Result of `DistillationLoss`.

    Attributes:
        loss: Scalar to backprop.
        kd: Scalar mean per-token divergence D (before alpha and T**2); 0 when there is no teacher.
        ce: Scalar mean per-token cross entropy on the hard labels (T = 1).
        num_tokens: Scalar int64, number of supervised tokens.
    """

    loss: Tensor
    kd: Tensor
    ce: Tensor
    num_tokens: Tensor


class DistillationLoss(nn.Module):
    """``alpha * T**2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, labels)`` over response tokens.

    Shapes:
        student_logits: ``[B, T, V]`` or ``[N, V]``.
        teacher_logits: same shape as ``student_logits`` (or ``None`` when ``alpha == 0``).
        labels: ``[B, T]`` or ``[N]``, already aligned with the logits (the caller does the causal
            shift); positions equal to ``ignore_index`` are excluded from both terms.

    Both terms are token-level means over the batch's supervised tokens; teacher logits are detached.

    Args:
        kind: Divergence, one of ``KINDS`` (see `token_divergence`).
        temperature: Distillation temperature T > 0.
        alpha: Weight of the distillation term in [0, 1]; 0 is the hard-label baseline.
        beta: JSD interpolation weight in [0, 1].
        skew: Skew weight in [0, 1) for the ``skew_*`` kinds.
        ignore_index: Label value marking unsupervised positions.
    """

    def __init__(
        self,
        kind: str = "forward_kl",
        temperature: float = 2.0,
        alpha: float = 0.5,
        beta: float = 0.5,
        skew: float = 0.1,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        _check_params(kind, temperature, beta, skew)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        self.kind, self.temperature, self.alpha = kind, temperature, alpha
        self.beta, self.skew, self.ignore_index = beta, skew, ignore_index

    def forward(
        self, student_logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None
    ) -> DistillationLossOutput:
        """Compute the loss; see the class docstring for shapes. Returns a `DistillationLossOutput`."""
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match student_logits shape "
                f"{tuple(student_logits.shape)} without the vocab dim."
            )
        if teacher_logits is None and self.alpha > 0:
            raise ValueError(f"teacher_logits is required when alpha > 0 (alpha={self.alpha}).")
        if teacher_logits is not None:
            _check_same_shape(student_logits, teacher_logits)
        mask = labels != self.ignore_index
        num_tokens = mask.sum()
        # Select the supervised positions first so padding never enters any computation.
        student = student_logits[mask].to(_compute_dtype(student_logits))
        denom = num_tokens.clamp(min=1).to(student.dtype)  # empty sums are 0 -> loss 0, not nan
        ce = F.cross_entropy(student, labels[mask], reduction="sum") / denom
        if teacher_logits is None:
            return DistillationLossOutput(loss=ce, kd=torch.zeros_like(ce), ce=ce, num_tokens=num_tokens)
        teacher = teacher_logits.detach()[mask]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.alpha > 0):
            per_token = token_divergence(student, teacher, self.kind, self.temperature, self.beta, self.skew)
            kd = per_token.sum() / denom
        # Zero-weighted terms are skipped so that an infinite term times 0 cannot make the loss nan.
        kd_term = self.alpha * self.temperature**2 * kd
        loss = ce if self.alpha == 0 else kd_term if self.alpha == 1 else kd_term + (1 - self.alpha) * ce
        return DistillationLossOutput(loss=loss, kd=kd, ce=ce, num_tokens=num_tokens)
