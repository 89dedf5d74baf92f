"""Parity of exported graphs against the PyTorch student, run in the artifact's own runtime.

The PyTorch wrappers (``PrefillGraph`` / ``DecodeGraph``, exact against the HF model) produce a reference per golden
prompt: their greedy tokens and the logits of every step along that path. A runtime (onnxruntime session, LiteRT
signature runner) is then (1) teacher-forced along the same path, giving max |delta logit|, cosine and top-1
agreement per position, and (2) left to generate greedily on its own, which must give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from autoglm_distill.export.graphs import DecodeGraph, PrefillGraph, greedy_generate

StepFn = Callable[..., tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Bars:
    """Pass bars. fp32 artifacts must match to float noise and reproduce greedy decoding; quantized ones must agree
    on the top-1 token at ``int8_min_top1_agreement`` of the positions."""

    fp32_max_abs_diff: float = 1e-4
    int8_min_top1_agreement: float = 0.95


@dataclass
class Reference:
    prompt: list[int]
    tokens: list[int]
    logits: list[torch.Tensor] = field(repr=False)  # one [V] row per step: prefill, then each decode


class ExportVerificationError(RuntimeError):
    """An artifact failed its parity check; ``report`` holds the figures. Nothing was moved into place."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@torch.no_grad()
def trajectory(
    prefill: StepFn, decode: StepFn, prompt: Sequence[int], tokens: Sequence[int], max_context: int, pad_id: int
) -> list[torch.Tensor]:
    """Logits of prefill, then of decode fed ``tokens`` (teacher forcing): one [V] row per step."""
    ids = torch.full((1, max_context), pad_id, dtype=torch.int32)
    ids[0, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.int32)
    logits, k_cache, v_cache = prefill(ids, torch.tensor([len(prompt)], dtype=torch.int32))
    rows = [logits[0].float()]
    for step, token in enumerate(tokens[:-1]):
        position = torch.tensor([len(prompt) + step], dtype=torch.int32)
        logits, k_cache, v_cache = decode(torch.tensor([[token]], dtype=torch.int32), position, k_cache, v_cache)
        rows.append(logits[0].float())
    return rows


@torch.no_grad()
def references(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_context: int, max_new_tokens: int, pad_id: int
) -> list[Reference]:
    """PyTorch greedy path (EOS does not stop it, so every step is compared) and its logits, per prompt."""
    if not prompts:
        raise ValueError("parity needs at least one golden prompt")
    was_training = model.training
    prefill, decode = PrefillGraph(model, max_context).eval(), DecodeGraph(model, max_context).eval()
    try:
        out = []
        for prompt in prompts:
            tokens = greedy_generate(prefill, decode, prompt, max_new_tokens, (), max_context, pad_id)
            out.append(
                Reference(list(prompt), tokens, trajectory(prefill, decode, prompt, tokens, max_context, pad_id))
            )
        return out
    finally:
        model.train(was_training)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@torch.no_grad()
def compare(prefill: StepFn, decode: StepFn, refs: Sequence[Reference], max_context: int, pad_id: int) -> dict:
    """Figures of one runtime against the references (see the module docstring)."""
    prefill_diff, decode_diff, min_cos, agree, steps, greedy_match = 0.0, 0.0, 1.0, 0, 0, True
    for ref in refs:
        rows = trajectory(prefill, decode, ref.prompt, ref.tokens, max_context, pad_id)
        prefill_diff = max(prefill_diff, float((rows[0] - ref.logits[0]).abs().max()))
        for ours, theirs in zip(rows[1:], ref.logits[1:], strict=True):
            decode_diff = max(decode_diff, float((ours - theirs).abs().max()))
        min_cos = min(min_cos, *(_cosine(o, r) for o, r in zip(rows, ref.logits, strict=True)))
        agree += sum(int(torch.argmax(o)) == int(torch.argmax(r)) for o, r in zip(rows, ref.logits, strict=True))
        steps += len(rows)
        generated = greedy_generate(prefill, decode, ref.prompt, len(ref.tokens), (), max_context, pad_id)
        greedy_match = greedy_match and generated == ref.tokens
    return {
        "prompts": len(refs),
        "positions": steps,
        "prefill_max_abs_diff": prefill_diff,
        "decode_max_abs_diff": decode_diff,
        "min_cosine": min_cos,
        "top1_agreement": agree / steps,
        "greedy_match": greedy_match,
    }


def judge(figures: dict, precision: str, bars: Bars) -> dict:
    """Add ``bar`` and ``passed`` to a runtime's figures."""
    if precision == "fp32":
        worst = max(figures["prefill_max_abs_diff"], figures["decode_max_abs_diff"])
        passed = worst <= bars.fp32_max_abs_diff and figures["greedy_match"]
        bar = f"max |delta logit| <= {bars.fp32_max_abs_diff:g} and identical greedy tokens"
    else:
        passed = figures["top1_agreement"] >= bars.int8_min_top1_agreement
        bar = f"top-1 agreement >= {bars.int8_min_top1_agreement:g}"
    return {**figures, "bar": bar, "passed": bool(passed)}
