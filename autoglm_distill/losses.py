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


def _param_problems(kind: str, temperature: float, beta: float, skew: float) -> list[str]:
    problems = []
    if kind not in KINDS:
        problems.append(f"unknown divergence kind {kind!r}; expected one of {', '.join(KINDS)}.")
    if not temperature > 0:
        problems.append(f"temperature must be > 0, got {temperature}.")
    if not 0 <= beta <= 1:
        problems.append(f"beta must be in [0, 1], got {beta}.")
    if not 0 <= skew < 1:
        problems.append(f"skew must be in [0, 1), got {skew}.")
    return problems


def _check(problems: list[str]) -> None:
    """Raise one ValueError naming every problem."""
    if problems:
        raise ValueError(" ".join(problems))


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


def divergence(log_q: Tensor, log_p: Tensor, kind: str, beta: float = 0.5, skew: float = 0.1) -> Tensor:
    """Per-token divergence between teacher log-probs ``log_p`` and student log-probs ``log_q`` (last dim).

    Both are normalised log-distributions over the same buckets: the full vocabulary, or a teacher's top-k
    tokens plus one bucket for the rest (`TopKTargets`). See `token_divergence` for the kinds.
    """
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
    _check(_param_problems(kind, temperature, beta, skew))
    _check_same_shape(student_logits, teacher_logits)
    dtype = _compute_dtype(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return divergence(log_q, log_p, kind, beta, skew)


@dataclass
class HeadTargets:
    """A teacher given by its final hidden states and ``lm_head`` weight: its logits are made chunk by chunk.

    Attributes:
        hidden: ``[N, H]`` hidden states at the supervised positions (or ``[B, T, H]`` before selection).
        weight: ``[V, H]`` lm_head weight (GLM heads have no bias).
    """

    hidden: Tensor
    weight: Tensor

    def select(self, mask: Tensor) -> HeadTargets:
        return HeadTargets(self.hidden[mask], self.weight)

    def rows(self, start: int, end: int) -> Tensor:
        """The teacher logits of rows ``start:end``."""
        return self.hidden[start:end] @ self.weight.T


@dataclass
class TopKTargets:
    """A teacher given by its top-k tokens per position (the offline teacher cache).

    The distribution has ``k + 1`` buckets: the k tokens and the rest of the vocabulary. The student's is
    collapsed the same way, so every divergence kind is computed on ``k + 1`` buckets; with the whole
    vocabulary cached (k = V) it is the dense divergence.

    Attributes:
        ids: ``[N, k]`` token ids (int64), supervised positions only, in batch order.
        logp: ``[N, k]`` teacher log-probs of those tokens at ``temperature``.
        rest: ``[N]`` log of the teacher's leftover mass (``-inf`` when the k tokens hold it all).
        temperature: the temperature the log-probs were taken at; must equal the loss's.
    """

    ids: Tensor
    logp: Tensor
    rest: Tensor
    temperature: float

    def select(self, mask: Tensor) -> TopKTargets:
        """Already stored for supervised positions only; checks the count matches."""
        if int(mask.sum()) != self.ids.shape[0]:
            raise ValueError(
                f"The teacher cache has {self.ids.shape[0]} positions for this batch but it has {int(mask.sum())} "
                "supervised tokens: the cache was written for other data or another tokenizer/max_length. "
                "Rebuild it: python -m autoglm_distill.teacher_cache with the training run's overrides."
            )
        return self

    def rows(self, start: int, end: int) -> TopKTargets:
        sl = slice(start, end)
        return TopKTargets(self.ids[sl], self.logp[sl], self.rest[sl], self.temperature)


Teacher = Tensor | HeadTargets | TopKTargets


@dataclass
class DistillationLossOutput:
    """Result of `DistillationLoss`.

    Attributes:
        loss: Scalar to backprop.
        kd: Scalar mean per-token divergence D (before alpha and T**2); 0 when there is no teacher.
        ce: Scalar mean per-token cross entropy on the hard labels (T = 1).
        num_tokens: Scalar int64, number of supervised tokens.
        agree: Scalar int64, supervised tokens where the student's top-1 token is the teacher's (0 without one).
    """

    loss: Tensor
    kd: Tensor
    ce: Tensor
    num_tokens: Tensor
    agree: Tensor


class DistillationLoss(nn.Module):
    """``alpha * T**2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, labels)`` over response tokens.

    Two ways in, same result (tested to 1e-5 in fp32, loss and gradients):

    * `forward` takes full logits ``[B, T, V]``: the naive reference;
    * `from_hidden` takes the student's final hidden states and lm_head weight and makes the logits
      ``chunk_size`` tokens at a time inside a custom autograd Function that computes the gradients in the
      same pass, so full-vocabulary logits of the batch never exist, in forward or backward.

    The teacher is given as logits (naive), as hidden states + lm_head weight (`HeadTargets`), or as cached
    top-k log-probs (`TopKTargets`), or ``None`` when ``alpha == 0``. Labels are already aligned with the
    positions (the caller does the causal shift); ``ignore_index`` positions are excluded from both terms,
    which are token-level means over the batch's supervised tokens. Teacher targets are never differentiated.

    Args:
        kind: Divergence, one of ``KINDS`` (see `token_divergence`).
        temperature: Distillation temperature T > 0.
        alpha: Weight of the distillation term in [0, 1]; 0 is the hard-label baseline.
        beta: JSD interpolation weight in [0, 1].
        skew: Skew weight in [0, 1) for the ``skew_*`` kinds.
        ignore_index: Label value marking unsupervised positions.
        chunk_size: tokens per chunk in `from_hidden`; ``"auto"`` keeps a chunk's logits near 2**22
            values (27 tokens at V=151,552); ``None`` makes the caller use full logits (`forward`).
    """

    def __init__(
        self,
        kind: str = "forward_kl",
        temperature: float = 2.0,
        alpha: float = 0.5,
        beta: float = 0.5,
        skew: float = 0.1,
        ignore_index: int = -100,
        chunk_size: int | str | None = "auto",
    ) -> None:
        super().__init__()
        problems = _param_problems(kind, temperature, beta, skew)
        if not 0 <= alpha <= 1:
            problems.append(f"alpha must be in [0, 1], got {alpha}.")
        if not (chunk_size is None or chunk_size == "auto" or (isinstance(chunk_size, int) and chunk_size > 0)):
            problems.append(
                f"chunk_size must be a positive number of tokens, auto or null (full logits), got {chunk_size!r}."
            )
        _check(problems)
        self.kind, self.temperature, self.alpha = kind, temperature, alpha
        self.beta, self.skew, self.ignore_index = beta, skew, ignore_index
        self.chunk_size = chunk_size

    def with_alpha(self, alpha: float) -> DistillationLoss:
        """The same loss with another ``alpha`` (1: the divergence alone)."""
        return DistillationLoss(
            self.kind, self.temperature, alpha, self.beta, self.skew, self.ignore_index, self.chunk_size
        )

    def chunk_tokens(self, vocab_size: int) -> int:
        """Tokens per chunk for a vocabulary of ``vocab_size``."""
        return auto_chunk_tokens(vocab_size) if self.chunk_size == "auto" else int(self.chunk_size)

    def check_cache_temperature(self, temperature: float) -> None:
        """Cached top-k targets hold log-probs at one temperature, which must be this loss's."""
        if temperature != self.temperature:
            raise ValueError(
                f"The teacher cache holds log-probs at temperature {temperature} but "
                f"distill.loss.temperature={self.temperature}: set distill.loss.temperature={temperature} "
                "or rebuild the cache with python -m autoglm_distill.teacher_cache at the new temperature."
            )

    def forward(self, student_logits: Tensor, labels: Tensor, teacher: Teacher | None = None) -> DistillationLossOutput:
        """The naive loss from full student logits ``[B, T, V]`` (or ``[N, V]``); see the class docstring."""
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match student_logits shape "
                f"{tuple(student_logits.shape)} without the vocab dim."
            )
        if isinstance(teacher, Tensor):
            _check_same_shape(student_logits, teacher)
        mask = self._mask(labels, teacher)
        student = student_logits[mask].to(_compute_dtype(student_logits))
        targets = self._targets(teacher, mask)
        num_tokens = mask.sum()
        kd, ce, agree = self._sums(student, labels[mask], targets)
        denom = num_tokens.clamp(min=1).to(student.dtype)  # empty sums are 0 -> loss 0, not nan
        kd, ce = kd / denom, ce / denom
        return DistillationLossOutput(self.combine(kd, ce), kd, ce, num_tokens, agree)

    def from_hidden(
        self, hidden: Tensor, weight: Tensor, labels: Tensor, teacher: HeadTargets | TopKTargets | None = None
    ) -> DistillationLossOutput:
        """The same loss from the student's final hidden states ``[B, T, H]`` and lm_head weight ``[V, H]``,
        ``chunk_size`` tokens at a time (see the class docstring)."""
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match hidden shape {tuple(hidden.shape)} without "
                "the hidden dim."
            )
        mask = self._mask(labels, teacher)
        targets = self._targets(teacher, mask)
        chunk = self.chunk_tokens(weight.shape[0])
        args = (hidden[mask], weight, labels[mask], targets, self, chunk)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            loss, kd, ce, agree = _ChunkedLoss.apply(*args)
        else:
            loss, kd, ce, agree, _, _ = _chunked(*args, with_grads=False)
        return DistillationLossOutput(loss, kd, ce, mask.sum(), agree)

    def combine(self, kd: Tensor, ce: Tensor) -> Tensor:
        """``alpha * T**2 * kd + (1 - alpha) * ce``; a zero-weighted term is skipped, so inf * 0 cannot be nan."""
        kd_term = self.alpha * self.temperature**2 * kd
        return ce if self.alpha == 0 else kd_term if self.alpha == 1 else kd_term + (1 - self.alpha) * ce

    def _mask(self, labels: Tensor, teacher: Teacher | None) -> Tensor:
        if teacher is None and self.alpha > 0:
            raise ValueError(f"a teacher is required when alpha > 0 (alpha={self.alpha}).")
        if isinstance(teacher, TopKTargets):
            self.check_cache_temperature(teacher.temperature)
        return labels != self.ignore_index

    @staticmethod
    def _targets(teacher: Teacher | None, mask: Tensor) -> Teacher | None:
        """The teacher at the supervised positions only, so that padding never enters any computation."""
        if isinstance(teacher, Tensor):
            return teacher.detach()[mask]
        return None if teacher is None else teacher.select(mask)

    def _sums(self, student: Tensor, labels: Tensor, teacher: Tensor | TopKTargets | None):
        """(summed divergence, summed CE, top-1 agreement count) over rows of student logits ``[n, V]``."""
        ce = F.cross_entropy(student, labels, reduction="sum")
        if teacher is None:
            zero = torch.zeros((), dtype=torch.long, device=student.device)
            return torch.zeros_like(ce), ce, zero
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.alpha > 0):
            if isinstance(teacher, TopKTargets):
                log_q, log_p = _collapse(student, teacher, self.temperature)
                teacher_top = teacher.ids.gather(-1, teacher.logp.argmax(-1, keepdim=True)).squeeze(-1)
            else:
                dtype = _compute_dtype(student, teacher)
                log_q = F.log_softmax(student.to(dtype) / self.temperature, dim=-1)
                log_p = F.log_softmax(teacher.detach().to(dtype) / self.temperature, dim=-1)
                teacher_top = teacher.argmax(-1)
            kd = divergence(log_q, log_p, self.kind, self.beta, self.skew).sum()
        agree = (student.detach().argmax(-1) == teacher_top).sum()
        return kd, ce, agree


def auto_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk that keep one chunk's logits near 2**22 values (27 tokens at V=151,552)."""
    return max(1, 2**22 // vocab_size)


def _collapse(student: Tensor, teacher: TopKTargets, temperature: float) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs over the ``k + 1`` buckets of a `TopKTargets` (k tokens, then the rest)."""
    log_q_full = F.log_softmax(student.float() / temperature, dim=-1)
    log_q_top = log_q_full.gather(-1, teacher.ids)
    log_q_rest = torch.logsumexp(log_q_full.scatter(-1, teacher.ids, -math.inf), dim=-1, keepdim=True)
    log_p = torch.cat([teacher.logp.float(), teacher.rest.float().unsqueeze(-1)], dim=-1)
    return torch.cat([log_q_top, log_q_rest], dim=-1), log_p


def _chunked(hidden, weight, labels, teacher, loss: DistillationLoss, chunk: int, with_grads: bool):
    """Loss terms over ``chunk``-token slices of ``hidden @ weight.T``, plus (when ``with_grads``) the gradients
    of the final loss with respect to ``hidden`` and ``weight``: each chunk's logits are differentiated and freed
    before the next chunk is made. Returns (loss, kd, ce, agree, grad_hidden, grad_weight)."""
    n = hidden.shape[0]
    dtype = _compute_dtype(hidden, weight)
    denom = max(n, 1)
    kd = torch.zeros((), dtype=dtype, device=hidden.device)
    ce, agree = kd.clone(), torch.zeros((), dtype=torch.long, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if with_grads else None
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if with_grads else None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h = hidden[start:end]
        target = None if teacher is None else teacher.rows(start, end)
        logits = (h @ weight.T).to(dtype)
        if not with_grads:
            kd_c, ce_c, agree_c = loss._sums(logits, labels[start:end], target)
        else:
            with torch.enable_grad():
                logits.requires_grad_(True)
                kd_c, ce_c, agree_c = loss._sums(logits, labels[start:end], target)
                (grad_logits,) = torch.autograd.grad(loss.combine(kd_c / denom, ce_c / denom), logits)
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[start:end] = grad_logits @ weight.to(hidden.dtype)
            grad_weight.addmm_(grad_logits.T.to(dtype), h.to(dtype))
        kd, ce, agree = kd + kd_c.detach(), ce + ce_c.detach(), agree + agree_c
    kd, ce = kd / denom, ce / denom
    return loss.combine(kd, ce), kd, ce, agree, grad_hidden, grad_weight


class _ChunkedLoss(torch.autograd.Function):
    """Chunked loss whose gradients are made in the forward pass (one pass over the chunks, no recompute);
    backward only scales them in place, so nothing of vocabulary size is saved or allocated for it."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, teacher, loss, chunk):
        out = _chunked(hidden, weight, labels, teacher, loss, chunk, with_grads=True)
        # Kept on ctx rather than save_for_backward: backward hands these very tensors to autograd as the
        # gradients (scaled in place), so the weight gradient exists once, not twice.
        ctx.grads = (out[4], out[5].to(weight.dtype))
        ctx.mark_non_differentiable(out[1], out[2], out[3])
        return out[0].clone(), out[1], out[2], out[3]  # a clone: with alpha = 0 the loss *is* ce

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("The chunked KD loss supports one backward pass per forward (no retain_graph).")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad_hidden.mul_(grad_loss)
            grad_weight.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None
