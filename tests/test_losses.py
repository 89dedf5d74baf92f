"""Tests for autoglm_distill.losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from autoglm_distill.losses import KINDS, DistillationLoss, DistillationLossOutput, token_divergence

# Tiny hand-checkable case: 2 tokens, vocabulary of 3.
STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [0.5, 0.5, -1.0]]
LABELS = [1, 2]
NEG_INF = float("-inf")


# ---- plain-Python reference maths -------------------------------------------------------------------


def softmax(logits: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(x / t) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def mix(p: list[float], q: list[float], w: float) -> list[float]:
    return [w * pi + (1 - w) * qi for pi, qi in zip(p, q, strict=True)]


def ref_divergence(s: list[float], t: list[float], kind: str, temp: float, beta: float, skew: float) -> float:
    p, q = softmax(t, temp), softmax(s, temp)
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = mix(p, q, beta)
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_forward_kl":
        return kl(p, mix(p, q, skew))
    return kl(q, mix(q, p, skew))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1.3e-6, atol: float = 1e-5) -> None:
    # torch.testing.assert_close costs ~1 s on first use (it imports torch.distributed), so a lean version.
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), f"{actual} != {expected}"


def tensors(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(STUDENT, dtype=dtype), torch.tensor(TEACHER, dtype=dtype), torch.tensor(LABELS)


# ---- hand-computed values ---------------------------------------------------------------------------


def test_forward_kl_written_out() -> None:
    # First token at T=1, fully written out: KL(P||Q) = sum_i p_i * log(p_i / q_i).
    zt = math.exp(2) + math.exp(0) + math.exp(1)
    zs = math.exp(1) + math.exp(2) + math.exp(0.5)
    p = [math.exp(2) / zt, math.exp(0) / zt, math.exp(1) / zt]
    q = [math.exp(1) / zs, math.exp(2) / zs, math.exp(0.5) / zs]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    s, t, _ = tensors()
    got = token_divergence(s[:1], t[:1], "forward_kl")
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_every_kind_matches_hand_computed(kind: str, temp: float) -> None:
    s, t, _ = tensors()
    got = token_divergence(s, t, kind, temperature=temp, beta=0.3, skew=0.2)
    expected = [ref_divergence(si, ti, kind, temp, 0.3, 0.2) for si, ti in zip(STUDENT, TEACHER, strict=True)]
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert min(expected) > 1e-3  # the case is non-degenerate


@pytest.mark.parametrize("kind", KINDS)
def test_full_loss_matches_hand_computed(kind: str) -> None:
    temp, alpha = 2.0, 0.7
    s, t, y = tensors()
    out = DistillationLoss(kind, temperature=temp, alpha=alpha, beta=0.4, skew=0.3)(s, y, t)
    kd = sum(ref_divergence(si, ti, kind, temp, 0.4, 0.3) for si, ti in zip(STUDENT, TEACHER, strict=True)) / 2
    ce = -sum(math.log(softmax(si)[yi]) for si, yi in zip(STUDENT, LABELS, strict=True)) / 2
    assert isinstance(out, DistillationLossOutput)
    assert out.kd.item() == pytest.approx(kd, rel=1e-5)
    assert out.ce.item() == pytest.approx(ce, rel=1e-5)
    assert out.loss.item() == pytest.approx(alpha * temp**2 * kd + (1 - alpha) * ce, rel=1e-5)
    assert out.num_tokens.dtype == torch.int64 and out.num_tokens.item() == 2
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0


# ---- limits -----------------------------------------------------------------------------------------


def test_alpha_zero_t1_equals_cross_entropy() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    y = torch.randint(0, 7, (2, 5))
    y[0, :2] = -100
    out = DistillationLoss(temperature=1.0, alpha=0.0)(s, y, t)
    expected = F.cross_entropy(s.reshape(-1, 7), y.reshape(-1), ignore_index=-100)
    assert_close(out.loss, expected)
    assert_close(out.ce, expected)
    assert out.kd.item() > 0.1  # still reported for logging


@pytest.mark.parametrize("kind", KINDS)
def test_identical_logits_give_zero_kd(kind: str) -> None:
    torch.manual_seed(1)
    s = torch.randn(6, 11) * 3
    assert token_divergence(s, s.clone(), kind, temperature=1.5).abs().max().item() < 1e-6
    out = DistillationLoss(kind, alpha=1.0)(s, torch.zeros(6, dtype=torch.long), s.clone())
    assert abs(out.kd.item()) < 1e-6


def test_jsd_beta_endpoints_are_kl() -> None:
    torch.manual_seed(2)
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    fkl, rkl = token_divergence(s, t, "forward_kl", 2.0), token_divergence(s, t, "reverse_kl", 2.0)
    assert not torch.allclose(fkl, rkl)
    assert_close(token_divergence(s, t, "jsd", 2.0, beta=0.0), fkl)
    assert_close(token_divergence(s, t, "jsd", 2.0, beta=1.0), rkl)


def test_skew_zero_is_kl() -> None:
    torch.manual_seed(3)
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    fkl, rkl = token_divergence(s, t, "forward_kl"), token_divergence(s, t, "reverse_kl")
    assert_close(token_divergence(s, t, "skew_forward_kl", skew=0.0), fkl)
    assert_close(token_divergence(s, t, "skew_reverse_kl", skew=0.0), rkl)
    # A non-zero skew really changes the value (and bounds it: the mixture contains P resp. Q).
    assert (token_divergence(s, t, "skew_forward_kl", skew=0.5) < fkl).all()
    assert (token_divergence(s, t, "skew_reverse_kl", skew=0.5) < rkl).all()


def test_jsd_symmetric_at_half() -> None:
    torch.manual_seed(4)
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    assert_close(token_divergence(s, t, "jsd", beta=0.5), token_divergence(t, s, "jsd", beta=0.5))
    assert not torch.allclose(token_divergence(s, t, "jsd", beta=0.2), token_divergence(t, s, "jsd", beta=0.2))
    assert (token_divergence(s, t, "jsd", beta=0.5) <= math.log(2) + 1e-6).all()


# ---- masking and token-level mean -------------------------------------------------------------------


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    y = torch.randint(0, 6, (2, 4))
    y[0, 3] = -100  # row 0: 3 real tokens
    y[1, 0] = y[1, 2] = y[1, 3] = -100  # row 1: 1 real token
    return s, t, y


@pytest.mark.parametrize("kind", KINDS)
def test_token_level_mean_over_real_tokens(kind: str) -> None:
    s, t, y = _padded_batch()
    out = DistillationLoss(kind, temperature=2.0, alpha=0.5)(s, y, t)
    real = [(0, 0), (0, 1), (0, 2), (1, 1)]
    per_kd = [token_divergence(s[i, j : j + 1], t[i, j : j + 1], kind, 2.0).item() for i, j in real]
    per_ce = [F.cross_entropy(s[i, j : j + 1], y[i, j : j + 1]).item() for i, j in real]
    assert out.num_tokens.item() == 4
    assert out.kd.item() == pytest.approx(sum(per_kd) / 4, rel=1e-5)
    assert out.ce.item() == pytest.approx(sum(per_ce) / 4, rel=1e-5)
    assert out.loss.item() == pytest.approx(0.5 * 4 * sum(per_kd) / 4 + 0.5 * sum(per_ce) / 4, rel=1e-5)
    # Not the mean of per-sequence means.
    seq_mean = (sum(per_kd[:3]) / 3 + per_kd[3]) / 2
    assert out.kd.item() != pytest.approx(seq_mean, rel=1e-3)


def test_custom_ignore_index_and_detached_teacher() -> None:
    s, t, y = _padded_batch()
    ref = DistillationLoss(alpha=0.5)(s, y, t)
    t = t.clone().requires_grad_(True)
    out = DistillationLoss(alpha=0.5, ignore_index=-1)(s, torch.where(y == -100, -1, y), t)
    assert_close(out.loss, ref.loss)
    assert out.num_tokens.item() == 4
    assert not out.loss.requires_grad  # the teacher is a constant; s does not require grad here


def test_padding_garbage_does_not_matter() -> None:
    s, t, y = _padded_batch()
    ref = DistillationLoss("jsd", alpha=0.5)(s, y, t)
    pad = y == -100
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[pad] = torch.tensor([1e30, float("nan"), float("inf"), -1e30, 0.0, float("-inf")])
    t_bad[pad] = float("nan")
    s_bad.requires_grad_(True)
    out = DistillationLoss("jsd", alpha=0.5)(s_bad, y, t_bad)
    assert_close(out.loss, ref.loss)
    out.loss.backward()
    assert torch.isfinite(s_bad.grad).all()
    assert (s_bad.grad[pad] == 0).all()


# ---- numerical stability ----------------------------------------------------------------------------


def _inf_case(where: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 1.0]])
    t = torch.tensor([[2.0, 0.0, 1.0, 0.3], [0.5, 0.5, -1.0, 2.0]])
    if where in ("teacher", "both"):
        t[:, 1] = NEG_INF
    if where in ("student", "both"):
        s[:, 1] = NEG_INF
    return s, t


# Which kinds are mathematically finite when only one side has zero-probability entries.
FINITE = {
    "both": KINDS,
    "teacher": ("forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"),
    "student": ("reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"),
}


@pytest.mark.parametrize("where", ["teacher", "student", "both"])
@pytest.mark.parametrize("kind", KINDS)
def test_neg_inf_logits(where: str, kind: str) -> None:
    s, t = _inf_case(where)
    s.requires_grad_(True)
    out = DistillationLoss(kind, temperature=2.0, alpha=0.5, beta=0.3, skew=0.2)(s, torch.tensor([0, 2]), t)
    if kind not in FINITE[where]:
        assert out.kd.item() == math.inf
        return
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(s.grad).all()
    # Masked entries on both sides: equals the divergence on the remaining vocabulary.
    if where == "both":
        keep = [0, 2, 3]
        expected = token_divergence(s.detach()[:, keep], t[:, keep], kind, 2.0, beta=0.3, skew=0.2)
        assert_close(out.kd, expected.mean())


def test_zero_weighted_infinite_term_does_not_poison_loss() -> None:
    s, t = _inf_case("teacher")  # reverse KL is +inf here
    out = DistillationLoss("reverse_kl", alpha=0.0)(s, torch.tensor([0, 2]), t)
    assert out.kd.item() == math.inf
    assert_close(out.loss, F.cross_entropy(s, torch.tensor([0, 2])))
    s, t = _inf_case("student")  # CE is +inf for a label on a -inf student logit
    out = DistillationLoss("reverse_kl", alpha=1.0, temperature=2.0)(s, torch.tensor([1, 1]), t)
    assert out.ce.item() == math.inf
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(4 * out.kd.item())


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_give_fp32_loss(kind: str) -> None:
    torch.manual_seed(6)
    s, t = torch.randn(2, 5, 32) * 2, torch.randn(2, 5, 32) * 2
    y = torch.randint(0, 32, (2, 5))
    y[1, 3:] = -100
    loss_fn = DistillationLoss(kind, temperature=2.0)
    out16 = loss_fn(s.bfloat16(), y, t.bfloat16())
    assert out16.loss.dtype == torch.float32 and out16.kd.dtype == torch.float32
    # Upcast happens before any maths: identical to the fp32 computation on the rounded values ...
    exact = loss_fn(s.bfloat16().float(), y, t.bfloat16().float())
    assert_close(out16.loss, exact.loss)
    # ... and close to the full-precision result.
    assert_close(out16.loss, loss_fn(s, y, t).loss, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_gradcheck_float64(kind: str) -> None:
    torch.manual_seed(7)
    s = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, dtype=torch.float64)
    y = torch.tensor([[0, 3, -100], [2, -100, -100]])
    loss_fn = DistillationLoss(kind, temperature=1.7, alpha=0.6, beta=0.3, skew=0.2)
    assert loss_fn(s, y, t).loss.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, y, t).loss, (s,))


def test_gradcheck_float64_with_masked_vocab() -> None:
    s = torch.tensor([[0.3, NEG_INF, -0.2, 1.1], [1.0, NEG_INF, 0.4, -0.7]], dtype=torch.float64)
    t = torch.tensor([[0.9, NEG_INF, 0.1, -0.5], [-0.2, NEG_INF, 0.8, 0.6]], dtype=torch.float64)
    loss_fn = DistillationLoss("jsd", temperature=2.0, alpha=0.5)

    def f(x: torch.Tensor) -> torch.Tensor:  # perturb only the finite entries
        full = torch.cat([x[:, :1], s[:, 1:2], x[:, 1:]], dim=1)
        return loss_fn(full, torch.tensor([0, 3]), t).loss

    x = s[:, [0, 2, 3]].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,))


# ---- degenerate batches and errors ------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_no_supervised_tokens(alpha: float) -> None:
    s = torch.randn(2, 3, 5, requires_grad=True)
    y = torch.full((2, 3), -100)
    out = DistillationLoss(alpha=alpha)(s, y, torch.randn(2, 3, 5))
    assert out.loss.item() == 0.0 and out.kd.item() == 0.0 and out.ce.item() == 0.0
    assert out.num_tokens.item() == 0
    assert out.loss.grad_fn is not None
    out.loss.backward()
    assert s.grad is not None and (s.grad == 0).all()


def test_no_teacher() -> None:
    s, _, y = tensors()
    with pytest.raises(ValueError, match="a teacher is required"):
        DistillationLoss(alpha=0.5)(s, y)
    out = DistillationLoss(alpha=0.0, temperature=3.0)(s, y)
    assert_close(out.loss, out.ce)
    assert_close(out.loss, F.cross_entropy(s, y))
    assert out.kd.item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "kl"}, r"forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl"),
        ({"temperature": 0.0}, r"temperature must be > 0"),
        ({"temperature": -1.0}, r"temperature must be > 0"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"beta": 1.01}, r"beta must be in \[0, 1\]"),
        ({"skew": 1.0}, r"skew must be in \[0, 1\)"),
        ({"skew": -0.1}, r"skew must be in \[0, 1\)"),
    ],
)
def test_constructor_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillationLoss(**kwargs)


def test_shape_mismatch_errors() -> None:
    loss_fn = DistillationLoss()
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 3, 6\)"):
        loss_fn(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"labels shape \(2, 4\)"):
        loss_fn(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 7\)"):
        token_divergence(torch.randn(4, 5), torch.randn(4, 7), "forward_kl")
    with pytest.raises(ValueError, match="expected one of"):
        token_divergence(torch.randn(4, 5), torch.randn(4, 5), "cross_entropy")
