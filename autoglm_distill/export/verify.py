"""Parity of exported graphs against the PyTorch student, run in the artifact's own runtime.

A ``Session`` drives one set of graphs (the PyTorch wrappers, or onnxruntime / LiteRT callables with the same
signatures) through a prompt: ``vision`` on the screenshot when there is one, ``prefill_<S>`` chunks, then ``decode``
one token at a time. The PyTorch wrappers (exact against the HF model) give the reference: per golden prompt, their
greedy tokens and the logits of every step along that path. An artifact is then (1) teacher-forced along the same
path, giving max |delta logit|, cosine, top-1 agreement and KL per position, and (2) left to generate greedily on its
own, which must give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autoglm_distill.export.graphs import graph_modules
from autoglm_distill.export.runner import decode_graph, prefill_plan

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
    # per bucket S: the logits after the prompt's first S tokens, prefilled through prefill_<S> and decoded through
    # decode_<S> (or decode for S = max_context)
    buckets: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)


def cut(golden: Golden, size: int, image: Mapping[str, Any] | None) -> Golden | None:
    """The golden's first ``size`` tokens (with its screenshot); None when that cuts off the image's first token."""
    prompt = golden.prompt[:size]
    if image is not None and image["token_id"] not in prompt:
        return None
    return Golden(prompt, golden.pixel_values, golden.grid_thw)


class ExportVerificationError(RuntimeError):
    """An artifact failed its parity check; ``report`` holds the figures. Nothing was moved into place."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _int32(*values: int) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int32)


class Session:
    """A prompt through ``graphs`` (``prefill_<S>`` per bucket and ``decode``, plus ``"vision"`` for image-text
    students) the way LiteRT-LM runs it: every prompt token but the last through prefill, in chunks of the bucket
    sizes, then the last through decode, whose logits pick the first new token.

    ``facts`` are the export's model facts: ``max_context``, ``pad_token_id``, ``num_layers``, ``num_kv_heads``,
    ``head_dim``, ``prefill_buckets`` and, for image-text students, ``image.token_id``.
    """

    def __init__(self, graphs: Mapping[str, StepFn], facts: Mapping[str, Any]):
        self.graphs = graphs
        self.context = int(facts["max_context"])
        self.pad = int(facts["pad_token_id"])
        self.image = facts.get("image")
        self.buckets = sorted(int(n) for n in facts.get("prefill_buckets") or [self.context])
        self.cache_shape = (1, int(facts["num_kv_heads"]), self.context, int(facts["head_dim"]))
        self.num_caches = 2 * int(facts["num_layers"])

    def plan(self, tokens: int, bucket: int | None = None) -> list[int]:
        """The prefill chunks for ``tokens`` prompt tokens (``runner.prefill_plan``); ``bucket`` forces one size."""
        return prefill_plan(tokens, [bucket] if bucket is not None else self.buckets, self.context)

    def prefill(self, golden: Golden, bucket: int | None = None) -> torch.Tensor:
        """Run the prompt (the vision graph first when it has a screenshot); returns the logits [V] after its last
        token. ``bucket`` runs every chunk through ``prefill_<bucket>``."""
        prompt = golden.prompt
        if not prompt or len(prompt) > self.context:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_context={self.context}")
        self.caches = [torch.zeros(self.cache_shape) for _ in range(self.num_caches)]
        self.extras = self.image_inputs(golden)
        self.position = 0
        body = prompt[:-1]
        for size in self.plan(len(body), bucket):
            chunk = body[self.position : self.position + size]
            tokens = torch.full((1, size), self.pad, dtype=torch.int32)
            tokens[0, : len(chunk)] = torch.tensor(chunk, dtype=torch.int32)
            input_pos = torch.arange(self.position, self.position + size, dtype=torch.int32)
            self.caches = list(_as_tuple(self.graphs[f"prefill_{size}"](tokens, input_pos, *self.extras, *self.caches)))
            self.position += len(chunk)
        for token in body[self.position :]:
            self.decode(token)
        return self.decode(prompt[-1])

    def image_inputs(self, golden: Golden) -> list:
        """``[image_embeds, image_start]`` for an image-text prompt (runs the vision graph), ``[]`` otherwise."""
        if self.image is None:
            return []
        if golden.pixel_values is None:
            raise ValueError("an image-text export needs the screenshot's pixel_values for every prompt")
        (embeds,) = _as_tuple(self.graphs["vision"](golden.pixel_values))
        return [embeds, _int32(golden.prompt.index(self.image["token_id"]))]

    def decode(self, token: int) -> torch.Tensor:
        """Feed ``token`` at the next position (through the smallest ``decode_<W>`` window that holds it, else
        ``decode``); returns the logits [V] that follow it."""
        if self.position >= self.context:
            raise ValueError(f"max_context={self.context} reached")
        out = self.graphs[decode_graph(self.position, self.graphs)](
            torch.tensor([[token]], dtype=torch.int32), _int32(self.position), *self.caches
        )
        logits, *self.caches = out
        self.position += 1
        return logits.reshape(-1).float()

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
        """Logits after the prompt, then of decode fed ``tokens`` (teacher forcing): one [V] row per step."""
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
            ref = Reference(golden, tokens, session.trajectory(golden, tokens))
            for bucket in session.buckets:
                short = cut(golden, bucket, session.image)
                if short is not None:
                    ref.buckets[bucket] = session.prefill(short, bucket)
            out.append(ref)
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
    """Figures of one runtime against the references (see the module docstring), plus, per bucket S (``buckets``),
    the logits after each prompt's first S tokens, prefilled through ``prefill_<S>`` and decoded through its decode
    window; their max |delta| counts in ``prefill_max_abs_diff``, the agreement and KL figures are over the greedy
    path only."""
    session = Session(graphs, facts)
    prefill_diff, decode_diff, greedy_match, pairs = 0.0, 0.0, True, []
    for ref in refs:
        rows = session.trajectory(ref.golden, ref.tokens)
        prefill_diff = max(prefill_diff, float((rows[0] - ref.logits[0]).abs().max()))
        for ours, theirs in zip(rows[1:], ref.logits[1:], strict=True):
            decode_diff = max(decode_diff, float((ours - theirs).abs().max()))
        pairs += zip(rows, ref.logits, strict=True)
        greedy_match = greedy_match and session.generate(ref.golden, len(ref.tokens)) == ref.tokens
    buckets = {}
    for bucket in session.buckets:  # the prompts cut to each bucket, through that bucket and its decode window
        rows = [
            (session.prefill(cut(ref.golden, bucket, session.image), bucket), ref.buckets[bucket])
            for ref in refs
            if bucket in ref.buckets
        ]
        if not rows:
            continue
        diff = max(float((o - r).abs().max()) for o, r in rows)
        prefill_diff = max(prefill_diff, diff)
        buckets[str(bucket)] = {
            "max_abs_diff": diff,
            "top1_agreement": sum(_same_top1(o, r) for o, r in rows) / len(rows),
            "prompts": len(rows),
        }
    return {
        "prompts": len(refs),
        "positions": len(pairs),
        "prefill_max_abs_diff": prefill_diff,
        "decode_max_abs_diff": decode_diff,
        "min_cosine": min(_cosine(o, r) for o, r in pairs),
        "top1_agreement": sum(_same_top1(o, r) for o, r in pairs) / len(pairs),
        "mean_kl": sum(_kl(r, o) for o, r in pairs) / len(pairs),
        "greedy_match": greedy_match,
        "buckets": buckets,
    }


def _same_top1(a: torch.Tensor, b: torch.Tensor) -> bool:
    return int(torch.argmax(a)) == int(torch.argmax(b))


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
