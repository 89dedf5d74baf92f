"""Fixed-shape graphs around a HF GLM-4 (``Glm4ForCausalLM``) or GLM-4.1V (``Glm4vForConditionalGeneration``)
student, with a fixed-size KV cache per layer that each graph updates at the positions it is given.

The wrappers reuse the HF model's own weights and modules (embedding, norms, projections, MLP, ``lm_head``) but do
the attention themselves: rotary embedding from a precomputed cos/sin table indexed by position, an additive causal
mask built from the positions, GQA by repeating the kv heads. There are no data-dependent shapes, so the same graphs
serve the ONNX, TFLite and Core ML converters; only the cache write differs per backend (``CACHE_UPDATES``).

Shapes (``L`` layers, ``KV`` kv heads, ``C`` = ``max_context``, ``D`` head dim, ``V`` vocabulary, ``S`` a prefill
bucket), LiteRT-LM's names and order:

* ``prefill_<S>``: ``tokens`` int32 [1, S], ``input_pos`` int32 [S] (consecutive), ``kv_cache_k_0``,
  ``kv_cache_v_0``, ... ``kv_cache_v_{L-1}`` float32 [1, KV, C, D] -> the caches with the S tokens' k/v written at
  ``input_pos``. A prompt shorter than S is right-padded; a longer one runs in chunks (``input_pos`` continues).
* ``decode``: ``tokens`` [1, 1], ``input_pos`` [1], the caches -> ``logits`` float32 [1, 1, V] and the caches.
* ``decode_<W>`` per bucket W below C: the same, attending to the first W cache positions only (``input_pos < W``),
  so a step costs what the context needs rather than what C allows.

A prompt is run as LiteRT-LM runs it: all tokens but the last through prefill, the last through decode, whose logits
pick the first new token. GLM-4.1V students add a ``vision`` graph (``pixel_values`` [N, 3*T*P*P] of one screenshot
of a fixed size -> ``image_embeds`` [M, H]); their prefill also takes ``image_embeds`` and ``image_start`` int32 [1]
(the index of the first of the M image tokens in the prompt; see ``Glm4vPrefillGraph``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoglm_distill.models import decoder_parts

# Additive mask for disallowed keys: finite (some converters reject -inf), representable in fp16 (Core ML runs fp16;
# -1e9 would round to -inf there) and far enough below any real score that its softmax weight is exactly 0.
MASK_VALUE = -1e4
STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")
# How a graph writes the new k/v into a cache: index_put (ONNX ScatterND), LiteRT's dynamic_update_slice (done in
# place by LiteRT), or one_hot (a matmul with the one-hot positions: Core ML converts no scatter of several rows).
CACHE_UPDATES = ("index_put", "dynamic_update_slice", "one_hot")

VISION_OUTPUTS = ("image_embeds",)


def _rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """GLM-4's rotate_half on interleaved pairs: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class _Glm4Graph(nn.Module):
    """Shared pieces: config facts, the cos/sin tables and one decoder step over a fixed-size cache.

    Positions come as ``[P, S]``: ``P = 1`` for GLM-4's 1-D rotary, ``P = 3`` (temporal, height, width) for
    GLM-4.1V's multimodal rotary, where each section of the rotary frequencies takes its angle from one row.
    """

    def __init__(self, model: nn.Module, max_context: int, update: str = "index_put", window: int | None = None):
        super().__init__()
        if update not in CACHE_UPDATES:
            raise ValueError(f"cache update {update!r}: choose from {CACHE_UPDATES}")
        text, lm_head, cfg = decoder_parts(model)
        self.update = update
        self.window = int(window or max_context)
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
        """One layer's k (or v) cache."""
        return (1, self.num_kv_heads, self.max_context, self.head_dim)

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

    def _write(self, cache: torch.Tensor, new: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """``cache`` [1, KV, C, D] with ``new`` [1, KV, S, D] written at positions ``input_pos`` [S] (consecutive)."""
        if self.update == "dynamic_update_slice":  # LiteRT's in-place cache write (a tfl.dynamic_update_slice)
            from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

            zero = torch.zeros((), dtype=torch.int32)
            return dynamic_update_slice(cache, new, [zero, zero, input_pos[0].reshape(()).int(), zero])
        if self.update == "one_hot":
            # a matmul with the one-hot [S, C] of the positions (Core ML: no scatter of S rows at a run-time position)
            hit = (self.key_positions[None, :] == input_pos.long()[:, None]).to(new.dtype)  # [S, C]
            keep = 1.0 - hit.sum(0)[:, None]  # [C, 1]
            return cache * keep + torch.matmul(hit.transpose(0, 1), new)
        return torch.ops.aten.index_put(cache, [None, None, input_pos.long()], new)

    def _layers(
        self, hidden: torch.Tensor, input_pos: torch.Tensor, rotary: torch.Tensor, caches: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run every layer on ``hidden`` [1, S, H] at cache positions ``input_pos`` [S] and rotary positions
        ``rotary`` [P, S]: each layer writes its new k/v into its caches (``caches`` = k_0, v_0, k_1, ... each
        [1, KV, C, D]) and attends to the first ``window`` cache positions, key j visible to the query at position p
        iff j <= p. Returns the hidden states and the updated caches."""
        seq = hidden.shape[1]
        cos, sin = self._angles(self.cos_table, rotary), self._angles(self.sin_table, rotary)
        groups = self.num_heads // self.num_kv_heads
        # Grouped-query attention without repeating the caches: the G query heads of a kv head are stacked as G * S
        # rows against that head's W keys (head h = kv * G + g, as HF's repeat_kv pairs them). Repeating k/v to every
        # head instead costs a copy of the cache per step: 6.8 ms vs 0.13 ms per layer in LiteRT at C = 2048.
        mask = self._mask(input_pos.long())[:, :, None]  # [1, 1, 1, S, W], broadcast over kv heads and groups
        updated = []
        for index, layer in enumerate(self.text.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(1, seq, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = self._rope(q, cos, sin).reshape(1, self.num_kv_heads, groups * seq, self.head_dim)
            k = self._rope(k, cos, sin)
            k_cache = self._write(caches[2 * index], k, input_pos)
            v_cache = self._write(caches[2 * index + 1], v, input_pos)
            updated += [k_cache, v_cache]
            k_all, v_all = self._window(k_cache), self._window(v_cache)  # [1, KV, W, D]
            scores = torch.matmul(q, k_all.transpose(2, 3)) * self.scaling  # [1, KV, G * S, W]
            scores = scores.view(1, self.num_kv_heads, groups, seq, -1) + mask
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(1, self.num_kv_heads, groups * seq, -1)
            out = torch.matmul(probs, v_all).reshape(1, self.num_heads, seq, self.head_dim)
            out = out.transpose(1, 2).reshape(1, seq, self.num_heads * self.head_dim)
            hidden = residual + layer.post_self_attn_layernorm(attn.o_proj(out))
            residual = hidden
            x = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = residual + layer.post_mlp_layernorm(x)
        return hidden, updated

    def _window(self, cache: torch.Tensor) -> torch.Tensor:
        # a full-width slice exports as aten.alias, which Core ML rejects
        return cache if self.window == self.max_context else cache[:, :, : self.window]

    def _mask(self, query_positions: torch.Tensor) -> torch.Tensor:
        """[1, 1, S, W] additive mask: key j is visible to a query at position p iff j <= p."""
        hidden = self.key_positions[None, : self.window] > query_positions[:, None]
        # Arithmetic rather than where(allowed, 0, MASK_VALUE): Core ML broadcasts where's scalars to two S x W
        # constants and stores them.
        return (hidden.to(torch.float32) * MASK_VALUE)[None, None]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.text.norm(hidden))  # [1, S, V]

    def _rotary(self, input_pos: torch.Tensor) -> torch.Tensor:
        return input_pos.long()[None].expand(3 if self.multimodal_rope else 1, -1)


class PrefillGraph(_Glm4Graph):
    """``(tokens [1, S], input_pos [S], k_0, v_0, ..., k_{L-1}, v_{L-1}) -> (k_0, v_0, ...)``: ``S`` prompt tokens
    written into the caches at ``input_pos`` (``input_pos[0] + S <= C``; padding tokens past the prompt write slots
    that decode overwrites before any query sees them). No logits: the last prompt token goes through decode."""

    def __init__(self, model: nn.Module, max_context: int, tokens: int, update: str = "index_put"):
        super().__init__(model, max_context, update)
        self.tokens = int(tokens)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, *caches: torch.Tensor):
        hidden = self.text.embed_tokens(tokens.long())
        return tuple(self._layers(hidden, input_pos, self._rotary(input_pos), caches)[1])


class DecodeGraph(_Glm4Graph):
    """``(tokens [1, 1], input_pos [1], k_0, v_0, ...) -> (logits [1, 1, V], k_0, v_0, ...)``: one token at
    ``input_pos``, attending to the first ``window`` cache positions (``input_pos < window``; the default window is
    the whole cache)."""

    def __init__(self, model, max_context, update: str = "index_put", window: int | None = None):
        super().__init__(model, max_context, update, window)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, *caches: torch.Tensor):
        return self._step(tokens, input_pos, self._rotary(input_pos), caches)

    def _step(self, tokens, input_pos, rotary, caches):
        hidden, updated = self._layers(self.text.embed_tokens(tokens.long()), input_pos, rotary, caches)
        return (self._logits(hidden), *updated)


class Glm4vPrefillGraph(PrefillGraph):
    """GLM-4.1V prefill over a prompt with one screenshot:
    ``(tokens [1, S], input_pos [S], image_embeds [M, H], image_start [1], k_0, v_0, ...) -> (k_0, v_0, ...)``.

    The prompt holds ``M`` image placeholder tokens from ``image_start`` on; their embeddings are replaced by
    ``image_embeds`` (the vision graph's output). Rotary positions follow GLM-4.1V's multimodal rope: text before the
    image counts 0, 1, ...; image token ``j`` (row ``j // gw``, column ``j % gw`` of the merged ``gh x gw`` grid) sits
    at (start, start + row, start + col); text after it resumes at ``start + max(gh, gw)``: position + ``rope_delta``
    with ``rope_delta = max(gh, gw) - M``, which decode adds to every position (it always follows the image).
    """

    def __init__(self, model, max_context, tokens, merged_grid: tuple[int, int], update: str = "index_put"):
        super().__init__(model, max_context, tokens, update)
        self.grid_h, self.grid_w = (int(n) for n in merged_grid)
        self.image_tokens = self.grid_h * self.grid_w
        self.rope_delta = max(self.grid_h, self.grid_w) - self.image_tokens
        # Row and column of each image token as lookup tables (integer // and % convert to float ops in Core ML).
        token = torch.arange(self.image_tokens, dtype=torch.int64)
        self.register_buffer("image_row", token // self.grid_w, persistent=False)
        self.register_buffer("image_col", token % self.grid_w, persistent=False)

    def forward(self, tokens, input_pos, image_embeds, image_start, *caches):
        index = input_pos.long()
        relative = index - image_start.long()
        in_image = torch.logical_and(relative >= 0, relative < self.image_tokens)
        j = relative.clamp(0, self.image_tokens - 1)
        text = torch.where(relative >= self.image_tokens, index + self.rope_delta, index)
        start = image_start.long().expand(self.tokens)
        rotary = torch.stack(
            (
                torch.where(in_image, start, text),
                torch.where(in_image, start + self.image_row.index_select(0, j), text),
                torch.where(in_image, start + self.image_col.index_select(0, j), text),
            )
        )
        embeds = self.text.embed_tokens(tokens.long())[0]
        hidden = torch.where(in_image[:, None], image_embeds.index_select(0, j).to(embeds.dtype), embeds)[None]
        return tuple(self._layers(hidden, input_pos, rotary, caches)[1])


class Glm4vDecodeGraph(DecodeGraph):
    """GLM-4.1V decode after a prompt with one screenshot: as ``DecodeGraph``, at rotary position
    ``input_pos + rope_delta`` (see ``Glm4vPrefillGraph``)."""

    def __init__(self, model, max_context, merged_grid, update: str = "index_put", window: int | None = None):
        super().__init__(model, max_context, update, window)
        grid_h, grid_w = (int(n) for n in merged_grid)
        self.rope_delta = max(grid_h, grid_w) - grid_h * grid_w

    def forward(self, tokens, input_pos, *caches):
        return self._step(tokens, input_pos, self._rotary(input_pos + self.rope_delta), caches)


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


def cache_names(num_layers: int) -> tuple[str, ...]:
    """The caches' names, as LiteRT-LM names them: kv_cache_k_0, kv_cache_v_0, kv_cache_k_1, ... (inputs, and the
    updated caches as outputs; ONNX and Core ML rename them, see ``io_names`` in those backends)."""
    return tuple(f"kv_cache_{kv}_{i}" for i in range(num_layers) for kv in "kv")


def buckets(prefill_buckets: Sequence[int], max_context: int) -> list[int]:
    """The prefill lengths to build: the configured ones below ``max_context``, and ``max_context`` itself."""
    if any(int(b) < 1 for b in prefill_buckets):
        raise ValueError(f"export.prefill_buckets={list(prefill_buckets)}: every bucket must be >= 1 token")
    return sorted({int(b) for b in prefill_buckets if int(b) < max_context} | {int(max_context)})


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


def graph_modules(model: nn.Module, facts: Mapping[str, Any], update: str = "index_put") -> dict[str, nn.Module]:
    """The eval-mode graph wrappers of ``model``: ``prefill_<S>`` per prefill bucket (``facts["prefill_buckets"]``,
    default: one of ``max_context``), ``decode`` and ``decode_<W>`` (attending to the first W cache positions) per
    bucket below ``max_context``, plus ``vision`` for an image-text student (``facts["image"]`` gives its grid)."""
    context = int(facts["max_context"])
    lengths = facts.get("prefill_buckets") or [context]
    windows = [n for n in lengths if n < context]
    image = facts.get("image")
    if image is None:
        modules = {
            **{f"prefill_{n}": PrefillGraph(model, context, n, update) for n in lengths},
            "decode": DecodeGraph(model, context, update),
            **{f"decode_{n}": DecodeGraph(model, context, update, window=n) for n in windows},
        }
    else:
        grid = tuple(image["merged_grid"])
        modules = {
            "vision": VisionGraph(model, tuple(image["grid_thw"])),
            **{f"prefill_{n}": Glm4vPrefillGraph(model, context, n, grid, update) for n in lengths},
            "decode": Glm4vDecodeGraph(model, context, grid, update),
            **{f"decode_{n}": Glm4vDecodeGraph(model, context, grid, update, window=n) for n in windows},
        }
    return {name: module.eval() for name, module in modules.items()}


def graph_specs(model: nn.Module, facts: Mapping[str, Any], update: str = "index_put") -> dict[str, GraphSpec]:
    """``graph_modules`` with fixed-shape example inputs and the documented input/output names."""
    modules = graph_modules(model, facts, update)
    decode = modules["decode"]
    caches = cache_names(decode.num_layers)
    # Distinct cache tensors: torch.export treats one tensor passed twice as an alias.
    cache_example = {name: torch.zeros(decode.cache_shape(), dtype=torch.float32) for name in caches}
    specs = {}
    image = facts.get("image")
    for name, module in modules.items():
        if name == "vision":
            example = {"pixel_values": torch.zeros((module.num_patches, image["patch_dim"]))}
            specs[name] = GraphSpec(name, module, example, VISION_OUTPUTS)
            continue
        n = getattr(module, "tokens", 1)
        example = {
            "tokens": torch.zeros((1, n), dtype=torch.int32),
            "input_pos": torch.arange(n, dtype=torch.int32) + (module.window // 2 if n == 1 else 0),
        }
        if image is not None and name.startswith("prefill_"):
            example["image_embeds"] = torch.zeros((module.image_tokens, module.text.embed_tokens.embedding_dim))
            example["image_start"] = torch.tensor([1], dtype=torch.int32)
        outputs = caches if name.startswith("prefill_") else ("logits", *caches)
        specs[name] = GraphSpec(name, module, {**example, **cache_example}, outputs)
    return specs
