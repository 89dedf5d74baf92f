"""Fixed-shape prefill / decode graphs around a HF ``Glm4ForCausalLM``, with the KV cache as plain tensors.

The wrappers reuse the HF model's own weights and modules (embedding, norms, projections, MLP, ``lm_head``) but do
the attention themselves: rotary embedding from a precomputed cos/sin table indexed by position, an explicit additive
causal mask built from positions, GQA by repeating the kv heads, and cache writes as a one-hot ``where``. There are no
data-dependent shapes, so the same graphs serve ONNX, TFLite and Core ML converters.

Shapes (``L`` layers, ``KV`` kv heads, ``C`` = ``max_context``, ``D`` head dim, ``V`` vocabulary):

* prefill: ``input_ids`` int32 ``[1, C]`` (right-padded), ``length`` int32 ``[1]`` ->
  ``logits`` float32 ``[1, V]`` (last real position), ``k_cache`` / ``v_cache`` float32 ``[L, KV, C, D]``.
* decode: ``token`` int32 ``[1, 1]``, ``position`` int32 ``[1]``, ``k_cache``, ``v_cache`` ->
  ``logits`` ``[1, V]`` and the caches with the new token's k/v written at ``position`` (exported as
  ``k_cache_out`` / ``v_cache_out``: ONNX names cannot repeat an input's name).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Additive mask for disallowed keys: finite (some converters reject -inf), representable in fp16 (Core ML runs fp16;
# -1e9 would round to -inf there) and far enough below any real score that its softmax weight is exactly 0.
MASK_VALUE = -1e4
STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")

PREFILL_INPUTS = ("input_ids", "length")
DECODE_INPUTS = ("token", "position", "k_cache", "v_cache")
PREFILL_OUTPUTS = ("logits", "k_cache", "v_cache")
# ONNX names are SSA: an output cannot reuse the input name, so the updated caches get an ``_out`` suffix.
DECODE_OUTPUTS = ("logits", "k_cache_out", "v_cache_out")


def _rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """GLM-4's rotate_half on interleaved pairs: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class _Glm4Graph(nn.Module):
    """Shared pieces: config facts, the cos/sin table and one decoder step over a fixed-size cache."""

    def __init__(self, model: nn.Module, max_context: int):
        super().__init__()
        cfg = model.config
        if getattr(cfg, "model_type", None) != "glm4":
            raise ValueError(
                f"export supports text-only GLM-4 students (model_type 'glm4'), this one is {cfg.model_type!r}: the "
                "image-text (Glm4v) vision graph is not built yet. Export a text-only student, or set export=none."
            )
        self.model = model
        self.max_context = int(max_context)
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        self.scaling = self.head_dim**-0.5

        rotary = model.model.rotary_emb
        if rotary.rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"rope_type {rotary.rope_type!r} changes with length; export needs a static one")
        # The same float ops as Glm4RotaryEmbedding + apply_rotary_pos_emb, done once for every position.
        inv_freq = rotary.inv_freq.detach().float().cpu()
        freqs = torch.arange(self.max_context, dtype=torch.float32)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * rotary.attention_scaling
        sin = emb.sin() * rotary.attention_scaling
        half = cos.shape[-1] // 2
        self.rotary_dim = 2 * half
        self.register_buffer("cos_table", cos[:, :half].repeat_interleave(2, dim=-1).contiguous(), persistent=False)
        self.register_buffer("sin_table", sin[:, :half].repeat_interleave(2, dim=-1).contiguous(), persistent=False)
        self.register_buffer("key_positions", torch.arange(self.max_context, dtype=torch.int64), persistent=False)

    def cache_shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_kv_heads, self.max_context, self.head_dim)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((rot * cos + _rotate_half_interleaved(rot) * sin, rest), dim=-1)

    def _layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        write: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run every layer on ``hidden`` [1, S, H] at ``positions`` [S]; ``write`` turns the new per-layer k/v
        [KV, S, D] into that layer's full cache [KV, C, D] (the keys attended to)."""
        seq = hidden.shape[1]
        cos = self.cos_table.index_select(0, positions)[None, None]  # [1, 1, S, R]
        sin = self.sin_table.index_select(0, positions)[None, None]
        groups = self.num_heads // self.num_kv_heads
        ks, vs = [], []
        for index, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(1, seq, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = self._rope(q, cos, sin)
            k = self._rope(k, cos, sin)
            k_all, v_all = write(k[0], v[0], index)  # [KV, C, D]
            ks.append(k_all)
            vs.append(v_all)
            k_rep = k_all.repeat_interleave(groups, dim=0)[None]  # [1, H, C, D]
            v_rep = v_all.repeat_interleave(groups, dim=0)[None]
            scores = torch.matmul(q, k_rep.transpose(2, 3)) * self.scaling + mask
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out = torch.matmul(probs, v_rep).transpose(1, 2).reshape(1, seq, self.num_heads * self.head_dim)
            hidden = residual + layer.post_self_attn_layernorm(attn.o_proj(out))
            residual = hidden
            x = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = residual + layer.post_mlp_layernorm(x)
        return hidden, torch.stack(ks), torch.stack(vs)

    def _mask(self, query_positions: torch.Tensor) -> torch.Tensor:
        """[1, 1, S, C] additive mask: key j is visible to a query at position p iff j <= p."""
        allowed = self.key_positions[None, :] <= query_positions[:, None]
        zero = torch.zeros((), dtype=torch.float32)
        return torch.where(allowed, zero, torch.full((), MASK_VALUE, dtype=torch.float32))[None, None]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden))[:, 0, :]


class PrefillGraph(_Glm4Graph):
    """``(input_ids [1, C] int32, length [1] int32) -> (logits [1, V], k_cache, v_cache [L, KV, C, D])``."""

    def forward(self, input_ids: torch.Tensor, length: torch.Tensor):
        positions = self.key_positions
        hidden = self.model.model.embed_tokens(input_ids.long())

        def write(k: torch.Tensor, v: torch.Tensor, index: int):
            return k, v  # the prompt fills the whole cache; positions >= length are don't-care

        hidden, k_cache, v_cache = self._layers(hidden, positions, self._mask(positions), write)
        last = hidden.index_select(1, length.long() - 1)  # [1, 1, H]
        return self._logits(last), k_cache, v_cache


class DecodeGraph(_Glm4Graph):
    """``(token [1, 1], position [1], k_cache, v_cache) -> (logits [1, V], k_cache, v_cache)`` (new k/v at
    ``position``)."""

    def forward(self, token: torch.Tensor, position: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        positions = position.long()
        hidden = self.model.model.embed_tokens(token.long())
        at = (self.key_positions == positions)[None, :, None]  # [1, C, 1]

        def write(k: torch.Tensor, v: torch.Tensor, index: int):
            return torch.where(at, k, k_cache[index]), torch.where(at, v, v_cache[index])

        hidden, k_cache, v_cache = self._layers(hidden, positions, self._mask(positions), write)
        return self._logits(hidden), k_cache, v_cache


@dataclass
class GraphSpec:
    """One graph to convert: the module, example inputs (by name, in order) and output names."""

    name: str
    module: nn.Module
    example: dict[str, torch.Tensor]
    outputs: tuple[str, ...]

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(self.example)


def graph_specs(model: nn.Module, max_context: int) -> dict[str, GraphSpec]:
    """The prefill and decode graphs of ``model`` (fp32, eval) with fixed-shape example inputs."""
    prefill, decode = PrefillGraph(model, max_context).eval(), DecodeGraph(model, max_context).eval()
    c = max_context
    prefill_example = {
        "input_ids": torch.zeros((1, c), dtype=torch.int32),
        "length": torch.tensor([max(c // 2, 1)], dtype=torch.int32),
    }
    # Two distinct cache tensors: torch.export treats one tensor passed twice as an alias.
    decode_example = {
        "token": torch.zeros((1, 1), dtype=torch.int32),
        "position": torch.tensor([c // 2], dtype=torch.int32),
        "k_cache": torch.zeros(prefill.cache_shape(), dtype=torch.float32),
        "v_cache": torch.zeros(prefill.cache_shape(), dtype=torch.float32),
    }
    return {
        "prefill": GraphSpec("prefill", prefill, prefill_example, PREFILL_OUTPUTS),
        "decode": GraphSpec("decode", decode, decode_example, DECODE_OUTPUTS),
    }


StepFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@torch.no_grad()
def greedy_generate(
    prefill: StepFn,
    decode: StepFn,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: Sequence[int] | int | None,
    max_context: int,
    pad_id: int = 0,
) -> list[int]:
    """Greedy decoding driven through a prefill and a decode graph; returns the new tokens (an EOS included).

    ``prefill`` / ``decode`` are any callables with the graphs' signatures on torch tensors (the wrappers
    themselves, or onnxruntime sessions wrapped to take and return tensors).
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("empty prompt")
    if len(prompt) + max(max_new_tokens - 1, 0) > max_context:
        raise ValueError(f"prompt ({len(prompt)}) + {max_new_tokens} new tokens do not fit max_context={max_context}")
    stops = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or ())
    ids = torch.full((1, max_context), pad_id, dtype=torch.int32)
    ids[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.int32)
    logits, k_cache, v_cache = prefill(ids, torch.tensor([len(prompt)], dtype=torch.int32))
    out: list[int] = []
    position = len(prompt)
    while len(out) < max_new_tokens:
        token = int(torch.argmax(logits[0]))
        out.append(token)
        if token in stops or len(out) == max_new_tokens:
            break
        logits, k_cache, v_cache = decode(
            torch.tensor([[token]], dtype=torch.int32), torch.tensor([position], dtype=torch.int32), k_cache, v_cache
        )
        position += 1
    return out
