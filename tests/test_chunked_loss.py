"""The chunked loss (`DistillationLoss.from_hidden`) against the naive full-logits reference, and top-k targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoglm_distill.losses import KINDS, DistillationLoss, HeadTargets, TopKTargets

B, T, H, V = 3, 7, 16, 50


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative closeness in the sense of the issue: |a - e| <= rtol * max|e| (elementwise atol at that scale)."""
    scale = expected.abs().max().clamp(min=1e-12)
    assert (actual - expected).abs().max() <= rtol * scale, f"{(actual - expected).abs().max()} > {rtol} * {scale}"


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    teacher = HeadTargets(torch.randn(B, T, H, generator=g) * 2, torch.randn(V, H, generator=g) / H**0.5)
    return hidden, weight, labels, teacher


def naive(loss: DistillationLoss, hidden, weight, labels, teacher):
    """Full logits of both models, then the loss; returns (output, grad hidden, grad weight)."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    teacher_logits = None if teacher is None else teacher.hidden @ teacher.weight.T
    out = loss(hidden @ weight.T, labels, teacher_logits)
    out.loss.backward()
    return out, hidden.grad, weight.grad


def chunked(loss: DistillationLoss, hidden, weight, labels, teacher):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = loss.from_hidden(hidden, weight, labels, teacher)
    out.loss.backward()
    return out, hidden.grad, weight.grad


def assert_same(a, b) -> None:
    (out_a, gh_a, gw_a), (out_b, gh_b, gw_b) = a, b
    for name in ("loss", "kd", "ce"):
        close(getattr(out_a, name), getattr(out_b, name))
    assert out_a.num_tokens == out_b.num_tokens and out_a.agree == out_b.agree
    close(gh_a, gh_b)
    close(gw_a, gw_b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_equals_naive_loss_and_gradients(kind: str, chunk: int) -> None:
    hidden, weight, labels, teacher = batch()
    loss = DistillationLoss(kind=kind, temperature=2.0, alpha=0.7, chunk_size=chunk)
    assert_same(chunked(loss, hidden, weight, labels, teacher), naive(loss, hidden, weight, labels, teacher))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_chunked_equals_naive_at_the_alpha_ends(alpha: float) -> None:
    hidden, weight, labels, teacher = batch(1)
    loss = DistillationLoss(alpha=alpha, chunk_size=5)
    teacher = None if alpha == 0 else teacher
    assert_same(chunked(loss, hidden, weight, labels, teacher), naive(loss, hidden, weight, labels, teacher))


def test_chunked_grad_scales_with_the_upstream_gradient() -> None:
    hidden, weight, labels, teacher = batch(2)
    loss = DistillationLoss(chunk_size=4)
    h = hidden.clone().requires_grad_()
    (3.0 * loss.from_hidden(h, weight, labels, teacher).loss).backward()
    _, ref, _ = naive(loss, hidden, weight, labels, teacher)
    close(h.grad, 3.0 * ref)


def test_without_grad_the_values_are_the_same() -> None:
    hidden, weight, labels, teacher = batch(3)
    loss = DistillationLoss(kind="jsd", chunk_size=3)
    with torch.no_grad():
        out = loss.from_hidden(hidden, weight, labels, teacher)
    ref, _, _ = naive(loss, hidden, weight, labels, teacher)
    close(out.loss, ref.loss)
    assert out.agree == ref.agree


def test_no_supervised_tokens_gives_zero_loss_and_gradient() -> None:
    hidden, weight, _, teacher = batch()
    labels = torch.full((B, T), -100)
    out, gh, gw = chunked(DistillationLoss(chunk_size=4), hidden, weight, labels, teacher)
    assert out.loss.item() == 0.0 and out.num_tokens == 0
    assert not gh.any() and not gw.any()


def topk(teacher: HeadTargets, labels: torch.Tensor, k: int, temperature: float) -> TopKTargets:
    log_p = F.log_softmax((teacher.hidden @ teacher.weight.T)[labels != -100] / temperature, dim=-1)
    top = log_p.topk(k, dim=-1)
    rest = torch.logsumexp(log_p.scatter(-1, top.indices, float("-inf")), dim=-1)
    return TopKTargets(top.indices, top.values, rest, temperature)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_targets_of_the_whole_vocabulary_equal_the_dense_teacher(kind: str) -> None:
    hidden, weight, labels, teacher = batch(4)
    loss = DistillationLoss(kind=kind, temperature=2.0, alpha=0.6, chunk_size=4)
    dense = naive(loss, hidden, weight, labels, teacher)
    assert_same(chunked(loss, hidden, weight, labels, topk(teacher, labels, V, 2.0)), dense)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_targets_chunked_equal_naive(kind: str) -> None:
    hidden, weight, labels, teacher = batch(5)
    loss = DistillationLoss(kind=kind, temperature=2.0, alpha=0.6, chunk_size=4)
    targets = topk(teacher, labels, 8, 2.0)
    hidden_n, weight_n = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = loss(hidden_n @ weight_n.T, labels, targets)
    out.loss.backward()
    assert_same(chunked(loss, hidden, weight, labels, targets), (out, hidden_n.grad, weight_n.grad))
    assert out.kd > 0


def test_top_k_kd_is_a_lower_bound_of_the_dense_kl() -> None:
    """Collapsing both distributions onto k + 1 buckets can only lose information (data processing)."""
    hidden, weight, labels, teacher = batch(6)
    loss = DistillationLoss(temperature=1.0, chunk_size=4)
    dense = loss.from_hidden(hidden, weight, labels, teacher).kd
    for k in (1, 5, 20):
        assert loss.from_hidden(hidden, weight, labels, topk(teacher, labels, k, 1.0)).kd <= dense + 1e-6


def test_top_k_targets_at_another_temperature_or_for_other_data_name_the_fix() -> None:
    hidden, weight, labels, teacher = batch()
    targets = topk(teacher, labels, 4, 1.0)
    with pytest.raises(ValueError, match=r"temperature 1.0 but distill.loss.temperature=2.0.*teacher_cache"):
        DistillationLoss(temperature=2.0).from_hidden(hidden, weight, labels, targets)
    labels[1, :] = -100
    with pytest.raises(ValueError, match=r"cache has \d+ positions for this batch but it has \d+.*Rebuild"):
        DistillationLoss(temperature=1.0).from_hidden(hidden, weight, labels, targets)


@pytest.mark.parametrize("chunk_size", [0, -3, "big", 1.5])
def test_bad_chunk_size_names_the_key(chunk_size) -> None:
    with pytest.raises(ValueError, match="chunk_size must be a positive number of tokens"):
        DistillationLoss(chunk_size=chunk_size)


def test_auto_chunk_keeps_a_chunk_near_4m_logits() -> None:
    assert DistillationLoss().chunk_tokens(151_552) == 27
    assert DistillationLoss(chunk_size=64).chunk_tokens(151_552) == 64


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_the_training_step_gives_the_same_loss_and_gradients_chunked_or_from_full_logits(alpha: float) -> None:
    """Through DistillModule with a live teacher (run under inference_mode): chunk_size=auto vs null."""
    import functools

    from transformers import Glm4Config, Glm4ForCausalLM

    from autoglm_distill.module import DistillModule

    shape = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    teacher = Glm4ForCausalLM(Glm4Config(**shape)).eval().requires_grad_(False)
    student = Glm4ForCausalLM(Glm4Config(**shape))
    input_ids = torch.randint(2, V, (B, T))
    labels = input_ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    results = []
    for chunk_size in (None, "auto"):
        loss = DistillationLoss(alpha=alpha, chunk_size=chunk_size)
        module = DistillModule(student, loss, functools.partial(torch.optim.AdamW), None, teacher)
        student.zero_grad()
        out = module._forward(batch)[0]
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in student.parameters()]))
    (naive_out, naive_grads), (chunked_out, chunked_grads) = results
    close(chunked_out.loss, naive_out.loss)
    assert chunked_out.agree == naive_out.agree
    for got, expected in zip(chunked_grads, naive_grads, strict=True):
        close(got, expected)
