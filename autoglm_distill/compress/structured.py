"""Structured pruning that shrinks tensors: score, plan, slice, rebuild (the Minitron recipe, width and depth).

1. ``importance``: activations on calibration batches give each text-decoder part a score: attention heads (L2 norm of
   what the head adds to the residual stream, its slice of ``o_proj`` applied), MLP channels (|activation| at the
   input of ``down_proj`` times the norm of the column it feeds), hidden channels (|activation| after the RMSNorms),
   whole layers (block influence, 1 - cos(layer input, output)).
2. ``plan``: keep the highest-scoring parts down to a target ``Shape``; kept indices stay in their original order,
   so pruning to the same shape is the identity.
3. ``prune``: slice every tensor with the plan and load it into a fresh model built from the smaller config, so
   ``config.json`` and the weights really shrink and the result loads with ``from_pretrained``.

GLM-4 (``Glm4ForCausalLM``) and GLM-4.1V (``Glm4vForConditionalGeneration``: its language model; the vision tower
keeps its size, only its output projection follows a pruned hidden size) are supported. ``head_dim`` is not pruned
(RoPE is applied to part of it). The vocabulary is not pruned: KD compares the teacher's and student's logits token
by token, so the student keeps the teacher's vocabulary.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from autoglm_distill.data.phone import model_inputs
from autoglm_distill.models import decoder_parts, head_dim_of, text_config

log = logging.getLogger(__name__)

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


class PruningError(ValueError):
    """A pruning target that cannot be reached from this model; the message says which value to change."""


@dataclass(frozen=True)
class Shape:
    """The prunable dimensions of a GLM text decoder (``head_dim`` stays)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int

    @classmethod
    def of(cls, model_or_config) -> Shape:
        cfg = text_config(model_or_config)
        return cls(**{k: int(getattr(cfg, k)) for k in SHAPE_KEYS})

    def scaled(self, targets: Mapping[str, float | int]) -> Shape:
        """This shape with each named dimension set to an absolute int or a fraction (float) of its current size."""
        unknown = sorted(set(targets) - set(SHAPE_KEYS))
        if unknown:
            raise PruningError(f"Unknown pruning target(s) {unknown}: use {', '.join(SHAPE_KEYS)}.")
        values = asdict(self)
        for key, value in targets.items():
            values[key] = max(1, round(values[key] * value)) if isinstance(value, float) else int(value)
        if values["num_attention_heads"] % values["num_key_value_heads"]:
            # keep whole GQA groups: round the query heads down to a multiple of the key/value heads
            values["num_attention_heads"] -= values["num_attention_heads"] % values["num_key_value_heads"]
        return Shape(**values)


def decoder_prefix(model: PreTrainedModel) -> str:
    """The state-dict prefix of the text decoder that ``decoder_parts`` returns."""
    return "model.language_model." if model.config.model_type == "glm4v" else "model."


@dataclass
class Importance:
    """Scores from calibration activations (higher = more important); per-layer lists are indexed by layer."""

    hidden: torch.Tensor  # [hidden_size]
    heads: list[torch.Tensor]  # [num_attention_heads] per layer
    mlp: list[torch.Tensor]  # [intermediate_size] per layer
    layers: torch.Tensor  # [num_hidden_layers] block influence
    tokens: int
    # GLM-4.1V: the vision blocks' MLP width is tied to the text hidden size, so it is pruned with it.
    vision_mlp: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def importance(model: PreTrainedModel, batches: Iterable[Mapping[str, torch.Tensor]]) -> Importance:
    """Score heads, MLP channels, hidden channels and layers from activations on ``batches`` (padding excluded).

    Args:
        model: a GLM-4 or GLM-4.1V model; its forward takes the batch's model inputs.
        batches: dicts with ``input_ids`` and ``attention_mask`` (and pixel inputs for GLM-4.1V).
    """
    decoder, _, _ = decoder_parts(model)
    cfg = text_config(model)
    n_layers, n_heads, head_dim = cfg.num_hidden_layers, cfg.num_attention_heads, head_dim_of(cfg)
    device = next(model.parameters()).device
    sums = {
        "hidden": torch.zeros(cfg.hidden_size, device=device),
        "heads": torch.zeros(n_layers, n_heads, device=device),
        "mlp": torch.zeros(n_layers, cfg.intermediate_size, device=device),
        "layers": torch.zeros(n_layers, device=device),
    }
    state = {"mask": None}
    visual = getattr(model.model, "visual", None)
    vision_sums = (
        [torch.zeros(block.mlp.down_proj.in_features, device=device) for block in visual.blocks] if visual else []
    )

    def masked(x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [tokens, C] without padding
        return x.float().flatten(0, 1)[state["mask"]]

    def on_norm(module, args, output):
        sums["hidden"] += masked(output).abs().sum(0)

    def on_heads(i):
        def hook(module, args):  # each head's contribution to the residual stream: its slice of o_proj applied
            x = masked(args[0]).view(-1, n_heads, head_dim)
            w = module.weight.float().view(-1, n_heads, head_dim)
            for h in range(n_heads):
                sums["heads"][i, h] += (x[:, h] @ w[:, h].T).norm(dim=-1).sum()

        return hook

    def on_mlp(i):
        def hook(module, args):  # |activation| times the norm of the down_proj column it feeds
            sums["mlp"][i] += masked(args[0]).abs().sum(0) * module.weight.float().norm(dim=0)

        return hook

    def on_layer(i):
        def hook(module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(masked(before), masked(after), dim=-1)
            sums["layers"][i] += (1 - cos).sum()

        return hook

    def on_vision_mlp(i):
        def hook(module, args):  # patches are not padded: every row counts
            x = args[0].float().reshape(-1, args[0].shape[-1])
            vision_sums[i].add_(x.abs().sum(0) * module.weight.float().norm(dim=0))

        return hook

    handles = (
        [block.mlp.down_proj.register_forward_pre_hook(on_vision_mlp(i)) for i, block in enumerate(visual.blocks)]
        if visual
        else []
    )
    for i, layer in enumerate(decoder.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_heads(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_mlp(i)))
        handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            handles.append(norm.register_forward_hook(on_norm))
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            state["mask"] = batch["attention_mask"].bool().flatten()
            tokens += int(state["mask"].sum())
            model(**model_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise PruningError("No calibration tokens: the calibration batches are empty; check the data split.")
    return Importance(
        hidden=sums["hidden"].cpu(),
        heads=list(sums["heads"].cpu()),
        mlp=list(sums["mlp"].cpu()),
        layers=sums["layers"].cpu(),
        tokens=tokens,
        vision_mlp=[v.cpu() for v in vision_sums],
    )


@dataclass
class Plan:
    """Indices to keep, in their original order."""

    source: Shape
    target: Shape
    layers: list[int]
    hidden: torch.Tensor
    heads: dict[int, torch.Tensor]  # kept query heads per kept (old) layer, grouped by kept kv head
    kv_heads: dict[int, torch.Tensor]
    mlp: dict[int, torch.Tensor]
    vision_mlp: list[torch.Tensor] = field(default_factory=list)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


def plan(scores: Importance, source: Shape, target: Shape) -> Plan:
    """Which layers, heads and channels to keep to reach ``target`` (each no larger than ``source``)."""
    problems = [
        f"{k}={getattr(target, k)} is larger than the model's {getattr(source, k)}"
        for k in SHAPE_KEYS
        if not 0 < getattr(target, k) <= getattr(source, k)
    ]
    if target.num_attention_heads % target.num_key_value_heads:
        problems.append(
            f"num_attention_heads={target.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={target.num_key_value_heads}"
        )
    per_group = source.num_attention_heads // source.num_key_value_heads
    if target.num_attention_heads // max(target.num_key_value_heads, 1) > per_group:
        problems.append(
            f"{target.num_attention_heads} query heads over {target.num_key_value_heads} key/value heads needs more "
            f"than the model's {per_group} query heads per key/value head: keep more key/value heads"
        )
    if problems:
        raise PruningError("Cannot prune " + str(asdict(source)) + " to the target: " + "; ".join(problems) + ".")

    layers = _top(scores.layers, target.num_hidden_layers).tolist()
    keep_per_group = target.num_attention_heads // target.num_key_value_heads
    heads, kv_heads, mlp = {}, {}, {}
    for i in layers:
        grouped = scores.heads[i].view(source.num_key_value_heads, per_group)
        kv = _top(grouped.sum(1), target.num_key_value_heads)
        kv_heads[i] = kv
        heads[i] = torch.cat([g * per_group + _top(grouped[g], keep_per_group) for g in kv.tolist()])
        mlp[i] = _top(scores.mlp[i], target.intermediate_size)
    hidden = _top(scores.hidden, target.hidden_size)
    vision_mlp = [_top(v, target.hidden_size) for v in scores.vision_mlp]
    return Plan(source, target, layers, hidden, heads, kv_heads, mlp, vision_mlp)


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows of a q/k/v projection (or columns of o_proj) that belong to ``heads``."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def slice_tensor(key: str, t: torch.Tensor, p: Plan, prefix: str, head_dim: int) -> tuple[str, torch.Tensor] | None:
    """One tensor of the unpruned model -> (its key, its values) in the pruned one; None when its layer is dropped.
    The same rule slices parameters and their optimizer state."""
    hid, inter = p.hidden, p.source.intermediate_size
    if key.startswith(prefix + "layers."):
        old, rest = key[len(prefix + "layers.") :].split(".", 1)
        i = int(old)
        if i not in p.layers:
            return None
        key = f"{prefix}layers.{p.layers.index(i)}.{rest}"
        q, kv = _rows(p.heads[i], head_dim), _rows(p.kv_heads[i], head_dim)
        if rest.startswith("self_attn.q_proj."):
            t = t[q][:, hid] if t.ndim == 2 else t[q]
        elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            t = t[kv][:, hid] if t.ndim == 2 else t[kv]
        elif rest == "self_attn.o_proj.weight":
            t = t[hid][:, q]
        elif rest == "mlp.gate_up_proj.weight":  # [gate; up] stacked along the rows
            t = t[torch.cat([p.mlp[i], p.mlp[i] + inter])][:, hid]
        elif rest == "mlp.down_proj.weight":
            t = t[hid][:, p.mlp[i]]
        elif rest.endswith("layernorm.weight"):
            t = t[hid]
        else:
            raise PruningError(f"Do not know how to prune {key}: this GLM layer layout is not supported.")
    elif key in (prefix + "embed_tokens.weight", "lm_head.weight"):
        t = t[:, hid]
    elif key == prefix + "norm.weight":
        t = t[hid]
    elif key.startswith(("model.visual.downsample.", "model.visual.merger.post_projection_norm.")):
        t = t[hid]  # the vision tower's output follows the text hidden size
    elif key == "model.visual.merger.proj.weight":
        t = t[hid][:, hid]
    elif key in ("model.visual.merger.gate_proj.weight", "model.visual.merger.up_proj.weight"):
        t = t[:, hid]
    elif key == "model.visual.merger.down_proj.weight":
        t = t[hid]
    elif key.startswith("model.visual.blocks.") and ".mlp." in key:
        keep = p.vision_mlp[int(key.split(".")[3])]
        t = t[:, keep] if key.endswith("down_proj.weight") else t[keep]
    return key, t.contiguous()


def pruned_config(config, target: Shape, layers: list[int]):
    """A copy of ``config`` with the text decoder's dimensions set to ``target``."""
    config = copy.deepcopy(config)
    cfg = text_config(config)
    for key, value in asdict(target).items():
        setattr(cfg, key, value)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    if getattr(config, "vision_config", None) is not None:
        config.vision_config.out_hidden_size = target.hidden_size
    return config


def check_target(model: PreTrainedModel, target: Shape) -> None:
    """GLM-4.1V's text attention derives head_dim from hidden_size / num_attention_heads, so the two shrink together."""
    cfg = text_config(model)
    if cfg.model_type == "glm4v_text" and target.hidden_size != target.num_attention_heads * head_dim_of(cfg):
        raise PruningError(
            f"GLM-4.1V computes head_dim as hidden_size / num_attention_heads, so pruning to hidden_size="
            f"{target.hidden_size} with num_attention_heads={target.num_attention_heads} would change head_dim "
            f"{head_dim_of(cfg)}: choose hidden_size = num_attention_heads x {head_dim_of(cfg)}."
        )


@torch.no_grad()
def prune(model: PreTrainedModel, p: Plan) -> PreTrainedModel:
    """A new, smaller model of the same class holding ``model``'s kept weights (``model`` is left as it was)."""
    check_target(model, p.target)
    prefix = decoder_prefix(model)
    head_dim = head_dim_of(text_config(model))
    state = dict(filter(None, (slice_tensor(k, t, p, prefix, head_dim) for k, t in model.state_dict().items())))
    config = pruned_config(model.config, p.target, p.layers)
    param = next(model.parameters())
    smaller = type(model)(config).to(device=param.device, dtype=param.dtype)
    smaller.load_state_dict(state, strict=True)
    smaller.generation_config = copy.deepcopy(model.generation_config)
    smaller.train(model.training)
    return smaller


def prune_to(model: PreTrainedModel, target: Shape, batches: Iterable[Mapping[str, torch.Tensor]]) -> PreTrainedModel:
    """Score ``model`` on ``batches`` and prune it to ``target``; logs what was kept."""
    source = Shape.of(model)
    check_target(model, target)
    scores = importance(model, batches)
    p = plan(scores, source, target)
    log.info(
        "Structured pruning %s -> %s on %d calibration tokens; kept layers %s",
        asdict(source),
        asdict(target),
        scores.tokens,
        p.layers,
    )
    return prune(model, p)
