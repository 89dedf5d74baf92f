"""Fixed-shape graphs around a HF GLM-4 (``Glm4ForCausalLM``) or GLM-4.1V (``Glm4vForConditionalGeneration``)
student, with the KV cache as plain tensors.

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

GLM-4.1V students add a ``vision`` graph (``pixel_values`` [N, 3*T*P*P] of one screenshot of a fixed size ->
``image_embeds`` [M, H]); their prefill also takes ``image_embeds`` and ``image_start`` [1] (the index of the first
of the M image tokens in the prompt), their decode also ``rope_position`` [1] (see ``Glm4vPrefillGraph``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoglm_distill.models import decoder_parts

# Additive mask for disallowed keys: finite (some converters reject -inf), representable in fp16 (Core ML runs fp16;
# -1e9 would round to -inf there) and far enough below any real score that its softmax weight is exactly 0.
MASK_VALUE = -1e4
STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")

VISION_OUTPUTS = ("image_embeds",)
PREFILL_OUTPUTS = ("logits", "k_cache", "v_cache")
# ONNX names are SSA: an output cannot reuse the input name, so the updated caches get an ``_out`` suffix.
DECODE_OUTPUTS = ("logits", "k_cache_out", "v_cache_out")


def _rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """GLM-4's rotate_half on interleaved pairs: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class _Glm4Graph(nn.Module):
    """Shared pieces: config facts, the cos/sin tables and one decoder step over a fixed-size cache.

    Positions come as ``[P, S]``: ``P = 1`` for GLM-4's 1-D rotary, ``P = 3`` (temporal, height, width) for
    GLM-4.1V's multimodal rotary, where each section of the rotary frequencies takes its angle from one row.
    """

    def __init__(self, model: nn.Module, max_context: int):
        super().__init__()
        text, lm_head, cfg = decoder_parts(model)
        self.model = model
        self.text = text
        self.lm_head = lm_head
        self.max_context = int(max_context)
        attn = text.layers[0].self_attn
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.vocab_size = cfg.vocab_size
        self.scaling = self.head_dim**-0.5

        rotary = text.rotary_emb
        if rotary.rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"rope_type {rotary.rope_type!r} changes with length; export needs a static one")
        # The float ops of the HF rotary embedding, done once for every position 0..C-1 and every frequency.
        inv_freq = rotary.inv_freq.detach().float().cpu()
        freqs = torch.arange(self.max_context, dtype=torch.float32)[:, None] * inv_freq  # [C, R/2]
        self.rotary_dim = 2 * inv_freq.numel()
        self.register_buffer("cos_table", freqs.cos() * rotary.attention_scaling, persistent=False)
        self.register_buffer("sin_table", freqs.sin() * rotary.attention_scaling, persistent=False)
        sections = getattr(rotary, "mrope_section", None)
        self.multimodal_rope = sections is not None
        if sections is not None:  # frequency i takes its angle from position row (section index % 3)
            row = torch.cat([torch.full((n,), i % 3, dtype=torch.int64) for i, n in enumerate(sections)])
            self.register_buffer("section_row", row, persistent=False)
        self.register_buffer("key_positions", torch.arange(self.max_context, dtype=torch.int64), persistent=False)

    def cache_shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_kv_heads, self.max_context, self.head_dim)

    def _angles(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[1, 1, S, R] cos or sin for positions [P, S], each frequency repeated for its interleaved pair."""
        rows = table.index_select(0, positions.reshape(-1)).view(positions.shape[0], positions.shape[1], -1)
        if self.multimodal_rope:
            row = self.section_row
            picked = torch.where(row == 0, rows[0], torch.where(row == 1, rows[1], rows[2]))
        else:
            picked = rows[0]
        return picked.repeat_interleave(2, dim=-1)[None, None]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:  # a full-width slice exports as aten.alias, which Core ML rejects
            return x * cos + _rotate_half_interleaved(x) * sin
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((rot * cos + _rotate_half_interleaved(rot) * sin, rest), dim=-1)

    def _layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        write: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run every layer on ``hidden`` [1, S, H] at rotary ``positions`` [P, S] under ``mask``; ``write`` turns
        the new per-layer k/v [KV, S, D] into that layer's full cache [KV, C, D] (the keys attended to)."""
        seq = hidden.shape[1]
        cos, sin = self._angles(self.cos_table, positions), self._angles(self.sin_table, positions)
        groups = self.num_heads // self.num_kv_heads
        ks, vs = [], []
        for index, layer in enumerate(self.text.layers):
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

    def _prompt_mask(self, length: torch.Tensor) -> torch.Tensor:
        """The causal [1, 1, C, C] mask of a prompt. The query positions are shifted by min(length, 0), which is 0
        for any real prompt but unknown to the converters: with constant positions they fold the mask into a C x C
        constant stored in the file (1 MB at C = 512 in fp32), which dominates a small student's int8 artifact."""
        return self._mask(self.key_positions + torch.clamp(length.long(), max=0))

    def _mask(self, query_positions: torch.Tensor) -> torch.Tensor:
        """[1, 1, S, C] additive mask: key j is visible to a query at position p iff j <= p."""
        hidden = self.key_positions[None, :] > query_positions[:, None]
        # Arithmetic rather than where(allowed, 0, MASK_VALUE): Core ML broadcasts where's scalars to two S x C
        # constants and stores them.
        return (hidden.to(torch.float32) * MASK_VALUE)[None, None]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.text.norm(hidden))[:, 0, :]


class PrefillGraph(_Glm4Graph):
    """``(input_ids [1, C] int32, length [1] int32) -> (logits [1, V], k_cache, v_cache [L, KV, C, D])``."""

    def forward(self, input_ids: torch.Tensor, length: torch.Tensor):
        positions = self.key_positions
        hidden = self.text.embed_tokens(input_ids.long())
        rotary = positions[None].expand(3 if self.multimodal_rope else 1, -1)
        hidden, k_cache, v_cache = self._layers(hidden, rotary, self._prompt_mask(length), _whole_prompt)
        return self._last_logits(hidden, length), k_cache, v_cache

    def _last_logits(self, hidden: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return self._logits(hidden.index_select(1, length.long() - 1))  # [1, 1, H] -> [1, V]


def _whole_prompt(k: torch.Tensor, v: torch.Tensor, index: int):
    return k, v  # the prompt fills the whole cache; positions >= length are don't-care


class DecodeGraph(_Glm4Graph):
    """``(token [1, 1], position [1], k_cache, v_cache) -> (logits [1, V], k_cache, v_cache)`` (new k/v at
    ``position``)."""

    def forward(self, token: torch.Tensor, position: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        return self._step(token, position, position, k_cache, v_cache)

    def _step(self, token, position, rope_position, k_cache, v_cache):
        slot = position.long()
        hidden = self.text.embed_tokens(token.long())
        at = (self.key_positions == slot)[None, :, None]  # [1, C, 1]

        def write(k: torch.Tensor, v: torch.Tensor, index: int):
            return torch.where(at, k, k_cache[index]), torch.where(at, v, v_cache[index])

        rotary = rope_position.long()[None].expand(3 if self.multimodal_rope else 1, -1)
        hidden, k_cache, v_cache = self._layers(hidden, rotary, self._mask(slot), write)
        return self._logits(hidden), k_cache, v_cache


class Glm4vPrefillGraph(PrefillGraph):
    """GLM-4.1V prefill over a prompt with one screenshot:
    ``(input_ids [1, C], length [1], image_embeds [M, H], image_start [1]) -> (logits, k_cache, v_cache)``.

    The prompt holds ``M`` image placeholder tokens from ``image_start`` on; their embeddings are replaced by
    ``image_embeds`` (the vision graph's output). Rotary positions follow GLM-4.1V's multimodal rope: text before the
    image counts 0, 1, ...; image token ``j`` (row ``j // gw``, column ``j % gw`` of the merged ``gh x gw`` grid) sits
    at (start, start + row, start + col); text after it resumes at ``start + max(gh, gw)``. Decoding after the image
    therefore uses ``rope_position = position + rope_delta`` with ``rope_delta = max(gh, gw) - M``.
    """

    def __init__(self, model: nn.Module, max_context: int, merged_grid: tuple[int, int]):
        super().__init__(model, max_context)
        self.grid_h, self.grid_w = (int(n) for n in merged_grid)
        self.image_tokens = self.grid_h * self.grid_w
        self.rope_delta = max(self.grid_h, self.grid_w) - self.image_tokens
        # Row and column of each image token as lookup tables (integer // and % convert to float ops in Core ML).
        token = torch.arange(self.image_tokens, dtype=torch.int64)
        self.register_buffer("image_row", token // self.grid_w, persistent=False)
        self.register_buffer("image_col", token % self.grid_w, persistent=False)

    def forward(self, input_ids, length, image_embeds, image_start):
        index = self.key_positions
        relative = index - image_start.long()
        in_image = torch.logical_and(relative >= 0, relative < self.image_tokens)
        j = relative.clamp(0, self.image_tokens - 1)
        text = torch.where(relative >= self.image_tokens, index + self.rope_delta, index)
        start = image_start.long().expand(self.max_context)
        rotary = torch.stack(
            (
                torch.where(in_image, start, text),
                torch.where(in_image, start + self.image_row.index_select(0, j), text),
                torch.where(in_image, start + self.image_col.index_select(0, j), text),
            )
        )
        embeds = self.text.embed_tokens(input_ids.long())[0]
        hidden = torch.where(in_image[:, None], image_embeds.index_select(0, j).to(embeds.dtype), embeds)[None]
        hidden, k_cache, v_cache = self._layers(hidden, rotary, self._prompt_mask(length), _whole_prompt)
        return self._last_logits(hidden, length), k_cache, v_cache


class Glm4vDecodeGraph(DecodeGraph):
    """``(token, position, rope_position [1], k_cache, v_cache) -> (logits, k_cache, v_cache)``: the cache slot and
    the rotary position differ after an image (see ``Glm4vPrefillGraph``)."""

    def forward(self, token, position, rope_position, k_cache, v_cache):
        return self._step(token, position, rope_position, k_cache, v_cache)


class VisionGraph(nn.Module):
    """GLM-4.1V vision encoder for one screenshot of a fixed size: ``pixel_values [N, 3*T*P*P] -> image_embeds [M, H]``.

    ``pixel_values`` are the image processor's flattened patches (``N = grid_h * grid_w`` patches, ``M = N / merge^2``
    tokens). With the grid fixed, what HF computes from it at run time is computed here once: the rotary angles of
    the patches and the bicubic-interpolated position embedding (a function of the learned table only). The
    patch and merge convolutions (kernel = stride) are the equivalent matmuls, and attention is over the whole image.
    The graph is a snapshot: it copies the convolution kernels, so build it from the final weights.
    """

    def __init__(self, model: nn.Module, grid_thw: tuple[int, int, int]):
        super().__init__()
        from transformers.vision_utils import get_vision_position_ids

        self.model = model
        visual = model.model.visual
        t, h, w = (int(n) for n in grid_thw)
        if t != 1:
            raise ValueError(f"the vision graph takes one still image (grid t=1), got grid {grid_thw}")
        self.merge = visual.spatial_merge_size
        self.num_patches = h * w
        self.num_heads = visual.blocks[0].attn.num_heads
        self.head_dim = visual.blocks[0].attn.head_dim
        self.scaling = visual.blocks[0].attn.scaling
        grid = torch.tensor([[t, h, w]])
        with torch.no_grad():
            ids = get_vision_position_ids(grid, self.merge)
            device = visual.embeddings.position_embedding.weight.device
            zeros = torch.zeros(self.num_patches, visual.config.hidden_size, device=device)
            cos, sin = visual.rotary_pos_emb(zeros, ids.to(device))
            position = visual.embeddings(zeros, torch.tensor([self.num_patches]), grid, ids[:, 0], ids[:, 1])
        self.register_buffer("cos", cos.float()[:, None, :], persistent=False)  # [N, 1, head_dim]
        self.register_buffer("sin", sin.float()[:, None, :], persistent=False)
        self.register_buffer("position_embedding", position.float(), persistent=False)
        # The patch and merge convolutions have kernel = stride: they are matmuls with the flattened kernels, kept
        # as (frozen) parameters of their own so that converters store and name them as weights.
        self.patch_weight = nn.Parameter(visual.patch_embed.proj.weight.detach().flatten(1), requires_grad=False)
        self.merge_weight = nn.Parameter(visual.downsample.weight.detach().flatten(1), requires_grad=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        visual = self.model.model.visual
        x = nn.functional.linear(pixel_values, self.patch_weight, visual.patch_embed.proj.bias)
        x = visual.post_conv_layernorm(x) + self.position_embedding
        n = self.num_patches
        for block in visual.blocks:
            qkv = block.attn.qkv(block.norm1(x)).reshape(n, 3, self.num_heads, self.head_dim).permute(1, 0, 2, 3)
            q, k, v = qkv[0], qkv[1], qkv[2]  # [N, heads, head_dim]
            q = q * self.cos + self._rotate_half(q) * self.sin
            k = k * self.cos + self._rotate_half(k) * self.sin
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, N, head_dim]
            probs = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.scaling, dim=-1)
            out = torch.matmul(probs, v).transpose(0, 1).reshape(n, -1)
            x = x + block.attn.proj(out)
            x = x + block.mlp(block.norm2(x))
        x = visual.post_layernorm(x)
        m = self.merge
        x = x.view(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2).flatten(1)  # [M, hidden * m * m], conv order
        x = nn.functional.linear(x, self.merge_weight, visual.downsample.bias)
        return visual.merger(x)


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


def graph_modules(model: nn.Module, facts: Mapping[str, Any]) -> dict[str, nn.Module]:
    """The eval-mode graph wrappers of ``model``: prefill and decode, plus vision for an image-text student
    (``facts["image"]`` gives its fixed grid)."""
    context = int(facts["max_context"])
    image = facts.get("image")
    if image is None:
        return {"prefill": PrefillGraph(model, context).eval(), "decode": DecodeGraph(model, context).eval()}
    return {
        "vision": VisionGraph(model, tuple(image["grid_thw"])).eval(),
        "prefill": Glm4vPrefillGraph(model, context, tuple(image["merged_grid"])).eval(),
        "decode": Glm4vDecodeGraph(model, context).eval(),
    }


def graph_specs(model: nn.Module, facts: Mapping[str, Any]) -> dict[str, GraphSpec]:
    """``graph_modules`` with fixed-shape example inputs and the documented input/output names."""
    modules = graph_modules(model, facts)
    c = int(facts["max_context"])
    prefill = modules["prefill"]
    prefill_example = {
        "input_ids": torch.zeros((1, c), dtype=torch.int32),
        "length": torch.tensor([max(c // 2, 1)], dtype=torch.int32),
    }
    decode_example = {
        "token": torch.zeros((1, 1), dtype=torch.int32),
        "position": torch.tensor([c // 2], dtype=torch.int32),
    }
    specs = {}
    image = facts.get("image")
    if image is not None:
        vision = modules["vision"]
        hidden = prefill.text.embed_tokens.embedding_dim
        specs["vision"] = GraphSpec(
            "vision", vision, {"pixel_values": torch.zeros((vision.num_patches, image["patch_dim"]))}, VISION_OUTPUTS
        )
        prefill_example["image_embeds"] = torch.zeros((prefill.image_tokens, hidden))
        prefill_example["image_start"] = torch.tensor([1], dtype=torch.int32)
        decode_example["rope_position"] = torch.tensor([c // 2], dtype=torch.int32)
    # Two distinct cache tensors: torch.export treats one tensor passed twice as an alias.
    decode_example["k_cache"] = torch.zeros(prefill.cache_shape(), dtype=torch.float32)
    decode_example["v_cache"] = torch.zeros(prefill.cache_shape(), dtype=torch.float32)
    specs["prefill"] = GraphSpec("prefill", prefill, prefill_example, PREFILL_OUTPUTS)
    specs["decode"] = GraphSpec("decode", modules["decode"], decode_example, DECODE_OUTPUTS)
    return specs
