"""Parity of exported graphs against the PyTorch student, run in the artifact's own runtime.

A ``Session`` drives one set of graphs (the PyTorch wrappers, or onnxruntime / LiteRT callables with the same
signatures) through a prompt: ``vision`` on the screenshot when there is one, ``prefill``, then ``decode`` one token at
a time. The PyTorch wrappers (exact against the HF model) give the reference: per golden prompt, their greedy tokens
and the logits of every step along that path. An artifact is then (1) teacher-forced along the same path, giving max
|delta logit|, cosine and top-1 agreement per position, and (2) left to generate greedily on its own, which must give
the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autoglm_distill.export.graphs import graph_modules

StepFn = Callable[..., Any]


@dataclass(frozen=True)
class Bars:
    """Pass bars. fp32 artifacts must match to float noise and reproduce greedy decoding; int8 ones must agree on the
    top-1 token at ``int8_min_top1_agreement`` of the positions; int4 ones at ``int4_min_top1_agreement``, with a
    mean KL(reference || artifact) over the positions of at most ``int4_max_mean_kl`` (nats)."""

    fp32_max_abs_diff: float = 1e-4
    int8_min_top1_agreement: float = 0.95
    int4_min_top1_agreement: float = 0.85
    int4_max_mean_kl: float = 0.1


@dataclass
class Golden:
    """One golden prompt: token ids (image placeholders expanded) and, for image-text students, the screenshot's
    patches (``pixel_values`` [N, 3*T*P*P])."""

    prompt: list[int]
    pixel_values: torch.Tensor | None = None
    grid_thw: tuple[int, int, int] | None = None  # the image processor's patch grid of the screenshot


@dataclass
class Reference:
    golden: Golden
    tokens: list[int]
    logits: list[torch.Tensor] = field(repr=False)  # one [V] row per step: prefill, then each decode


class ExportVerificationError(RuntimeError):
    """An artifact failed its parity check; ``report`` holds the figures. Nothing was moved into place."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _int32(*values: int) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int32)


class Session:
    """Prefill then decode through ``graphs`` (``{"prefill", "decode"}`` plus ``"vision"`` for image-text students).

    ``facts`` are the export's model facts: ``max_context``, ``pad_token_id`` and, for image-text students,
    ``image.token_id`` and ``image.rope_delta``.
    """

    def __init__(self, graphs: Mapping[str, StepFn], facts: Mapping[str, Any]):
        self.graphs = graphs
        self.context = int(facts["max_context"])
        self.pad = int(facts["pad_token_id"])
        self.image = facts.get("image")

    def prefill(self, golden: Golden) -> torch.Tensor:
        """Run the prompt (through the vision graph first when it has a screenshot); returns the logits [V] of its
        last token."""
        logits, self.k_cache, self.v_cache = self.graphs["prefill"](*self.prefill_args(golden))
        self.position = len(golden.prompt)
        return logits[0].float()

    def prefill_args(self, golden: Golden) -> list:
        """The prefill graph's inputs for ``golden`` (runs the vision graph on its screenshot)."""
        prompt = golden.prompt
        if not prompt or len(prompt) > self.context:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_context={self.context}")
        ids = torch.full((1, self.context), self.pad, dtype=torch.int32)
        ids[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.int32)
        args = [ids, _int32(len(prompt))]
        self.rope_delta = 0
        if self.image is not None:
            if golden.pixel_values is None:
                raise ValueError("an image-text export needs the screenshot's pixel_values for every prompt")
            (embeds,) = _as_tuple(self.graphs["vision"](golden.pixel_values))
            start = prompt.index(self.image["token_id"])
            args += [embeds, _int32(start)]
            self.rope_delta = int(self.image["rope_delta"])
        return args

    def decode(self, token: int) -> torch.Tensor:
        """Feed ``token`` at the next position; returns the logits [V] that follow it."""
        if self.position >= self.context:
            raise ValueError(f"max_context={self.context} reached")
        args = [torch.tensor([[token]], dtype=torch.int32), _int32(self.position)]
        if self.image is not None:
            args.append(_int32(self.position + self.rope_delta))
        logits, self.k_cache, self.v_cache = self.graphs["decode"](*args, self.k_cache, self.v_cache)
        self.position += 1
        return logits[0].float()

    @torch.no_grad()
    def generate(self, golden: Golden, max_new_tokens: int, eos_ids: Sequence[int] = ()) -> list[int]:
        """Greedy tokens (an EOS included when reached)."""
        if len(golden.prompt) + max(max_new_tokens - 1, 0) > self.context:
            raise ValueError(
                f"prompt ({len(golden.prompt)}) + {max_new_tokens} new tokens do not fit max_context={self.context}"
            )
        logits, out = self.prefill(golden), []
        while True:
            out.append(int(torch.argmax(logits)))
            if out[-1] in eos_ids or len(out) == max_new_tokens:
                return out
            logits = self.decode(out[-1])

    @torch.no_grad()
    def trajectory(self, golden: Golden, tokens: Sequence[int]) -> list[torch.Tensor]:
        """Logits of prefill, then of decode fed ``tokens`` (teacher forcing): one [V] row per step."""
        rows = [self.prefill(golden)]
        rows += [self.decode(token) for token in tokens[:-1]]
        return rows


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


@torch.no_grad()
def references(model: nn.Module, goldens: Sequence[Golden], facts: Mapping[str, Any], max_new_tokens: int):
    """PyTorch greedy path (EOS does not stop it, so every step is compared) and its logits, per golden prompt."""
    if not goldens:
        raise ValueError("parity needs at least one golden prompt")
    was_training = model.training
    session = Session(graph_modules(model, facts), facts)
    try:
        out = []
        for golden in goldens:
            tokens = session.generate(golden, max_new_tokens)
            out.append(Reference(golden, tokens, session.trajectory(golden, tokens)))
        return out
    finally:
        model.train(was_training)


def _kl(reference: torch.Tensor, ours: torch.Tensor) -> float:
    """KL(softmax(reference) || softmax(ours)) in nats, in float64."""
    p, q = reference.double().log_softmax(-1), ours.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@torch.no_grad()
def compare(graphs: Mapping[str, StepFn], refs: Sequence[Reference], facts: Mapping[str, Any]) -> dict:
    """Figures of one runtime against the references (see the module docstring)."""
    session = Session(graphs, facts)
    prefill_diff, decode_diff, min_cos, agree, steps, greedy_match, kl = 0.0, 0.0, 1.0, 0, 0, True, 0.0
    for ref in refs:
        rows = session.trajectory(ref.golden, ref.tokens)
        prefill_diff = max(prefill_diff, float((rows[0] - ref.logits[0]).abs().max()))
        for ours, theirs in zip(rows[1:], ref.logits[1:], strict=True):
            decode_diff = max(decode_diff, float((ours - theirs).abs().max()))
        min_cos = min(min_cos, *(_cosine(o, r) for o, r in zip(rows, ref.logits, strict=True)))
        agree += sum(int(torch.argmax(o)) == int(torch.argmax(r)) for o, r in zip(rows, ref.logits, strict=True))
        kl += sum(_kl(r, o) for o, r in zip(rows, ref.logits, strict=True))
        steps += len(rows)
        greedy_match = greedy_match and session.generate(ref.golden, len(ref.tokens)) == ref.tokens
    return {
        "prompts": len(refs),
        "positions": steps,
        "prefill_max_abs_diff": prefill_diff,
        "decode_max_abs_diff": decode_diff,
        "min_cosine": min_cos,
        "top1_agreement": agree / steps,
        "mean_kl": kl / steps,
        "greedy_match": greedy_match,
    }


def judge(figures: dict, precision: str, bars: Bars) -> dict:
    """Add ``bar`` and ``passed`` to a runtime's figures."""
    if precision == "fp32":
        worst = max(figures["prefill_max_abs_diff"], figures["decode_max_abs_diff"])
        passed = worst <= bars.fp32_max_abs_diff and figures["greedy_match"]
        bar = f"max |delta logit| <= {bars.fp32_max_abs_diff:g} and identical greedy tokens"
    elif precision == "int4":
        passed = (
            figures["top1_agreement"] >= bars.int4_min_top1_agreement and figures["mean_kl"] <= bars.int4_max_mean_kl
        )
        bar = f"top-1 agreement >= {bars.int4_min_top1_agreement:g} and mean KL <= {bars.int4_max_mean_kl:g}"
    else:
        passed = figures["top1_agreement"] >= bars.int8_min_top1_agreement
        bar = f"top-1 agreement >= {bars.int8_min_top1_agreement:g}"
    return {**figures, "bar": bar, "passed": bool(passed)}
