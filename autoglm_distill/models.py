"""Teacher and student builders (``from_pretrained`` on a hub id or folder, or a fresh model from a preset) and the
facts other modules read off a model (text config, head_dim, lm_head, QAT record, weight sparsity).

Two families are supported: ``glm4v`` (GLM-4.1V, ``Glm4vForConditionalGeneration``: the AutoGLM phone
agent's architecture, image + text) and ``glm4`` (the GLM-4 text decoder, ``Glm4ForCausalLM``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Glm4Config,
    Glm4ForCausalLM,
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from autoglm_distill.tokenizer import STOP_TOKENS

log = logging.getLogger(__name__)

AUTO_CLASSES = {"image_text": AutoModelForImageTextToText, "causal_lm": AutoModelForCausalLM}
LOAD_KINDS = tuple(AUTO_CLASSES)  # teacher.kind: which Auto class loads it (or auto: read config.json)
ARCHS = ("glm4v", "glm4")  # what build_model makes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The key under which a QAT-converted student's config.json records its scheme (see compress/qat.py).
QAT_CONFIG_KEY = "autoglm_distill_qat"
# Below this fraction of zeros a model counts as dense. A sparse weight costs 1 mask bit per value plus its
# non-zero values, which pays off from about 1/16 zeros in fp16.
MIN_ZERO_FRACTION = 0.1
NM_GROUPS = (4, 8)  # the M of the N:M patterns that are recognised


class ModelLoadError(RuntimeError):
    """A model could not be loaded or does not fit the run; the message says how to fix it."""


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` is bf16 on a GPU and fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"dtype={name!r} is not supported: use auto, {', '.join(DTYPES)}.")
    return DTYPES[name]


def _token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": [ids(t) for t in STOP_TOKENS],
    }


def build_model(arch: str, config: dict, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised ``glm4`` or ``glm4v`` model whose vocabulary matches ``tokenizer``.

    Args:
        arch: ``glm4v`` or ``glm4``.
        config: architecture values (for glm4v: ``text_config`` / ``vision_config`` dicts).
        tokenizer: the shared tokenizer; gives the vocabulary size and the special-token ids.
    """
    config = dict(config)
    tokens = _token_ids(tokenizer)
    if arch == "glm4":
        cfg = Glm4Config(vocab_size=len(tokenizer), **tokens, **config)
        return Glm4ForCausalLM(cfg)
    if arch == "glm4v":
        ids = tokenizer.convert_tokens_to_ids
        text_config = dict(config.pop("text_config", {}), vocab_size=len(tokenizer), **tokens)
        vision_config = dict(config.pop("vision_config", {}))
        vision_config["out_hidden_size"] = text_config["hidden_size"]
        cfg = Glm4vConfig(
            text_config=text_config,
            vision_config=vision_config,
            image_token_id=ids("<|image|>"),
            image_start_token_id=ids("<|begin_of_image|>"),
            image_end_token_id=ids("<|end_of_image|>"),
            video_token_id=ids("<|video|>"),
            video_start_token_id=ids("<|begin_of_video|>"),
            video_end_token_id=ids("<|end_of_video|>"),
            **config,
        )
        model = Glm4vForConditionalGeneration(cfg)
        model.generation_config.eos_token_id = tokens["eos_token_id"]
        model.generation_config.pad_token_id = tokens["pad_token_id"]
        return model
    raise ModelLoadError(f"Unknown student/teacher arch {arch!r}: use {' or '.join(ARCHS)}.")


def load_pretrained(
    path: str, kind: str, dtype: str = "auto", trust_remote_code: bool = False, role: str = "teacher"
) -> PreTrainedModel:
    """``from_pretrained`` on a hub id or local folder, with an error that says how to fix a miss.

    Args:
        path: hub id (``zai-org/AutoGLM-Phone-9B``) or a local folder.
        kind: ``image_text`` or ``causal_lm``: which Auto class loads it; ``auto`` reads config.json.
        dtype: ``auto`` | ``float32`` | ``bfloat16`` | ``float16``.
        trust_remote_code: passed through; off unless the user turns it on (logged as a warning when on).
    Weights load from safetensors only.
        role: ``teacher`` or ``student``, for messages.
    """
    if trust_remote_code:
        log.warning("%s: trust_remote_code=True, code shipped with %s will run", role, path)
    local = Path(path).expanduser()
    looks_local = local.is_absolute() or path.startswith((".", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        raise ModelLoadError(
            f"{role}.path={path!r} is not a Hugging Face model folder (no config.json there). "
            f"Point {role}.path at a folder made by save_pretrained, e.g. a downloaded copy of the hub model."
        )
    source = str(local) if looks_local else path
    try:
        if kind == "auto":  # image-text when the config has a vision tower
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            kind = "image_text" if getattr(config, "vision_config", None) is not None else "causal_lm"
        return AUTO_CLASSES[kind].from_pretrained(
            source,
            dtype=resolve_dtype(dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # never unpickle weights (pytorch_model.bin can run code)
        )
    except (OSError, ValueError) as err:
        hint = (
            f"If this machine has no network or no cached weights, download the model where the hub is "
            f"reachable (`hf download {path} --local-dir /models/{Path(path).name}`) and run with "
            f"{role}.path=/models/{Path(path).name}."
            if not looks_local
            else f"Check that {path} holds the weights of a {kind} model ({role}.kind={kind}) as safetensors "
            "(model.safetensors): weights only in pytorch_model.bin are not loaded, since unpickling them can run "
            "code; convert them once where you trust the file (from_pretrained(...).save_pretrained(folder))."
        )
        raise ModelLoadError(f"Could not load the {role} from {path!r}: {err}\n{hint}") from err


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Teacher mode: eval, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(teacher_cfg, path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Any]:
    """The frozen teacher in ``path`` (``teacher.kind``, ``dtype``, ``trust_remote_code`` from ``teacher_cfg``), its
    tokenizer, and its image processor (None for a text-only teacher)."""
    t = teacher_cfg
    teacher = freeze(load_pretrained(str(path), t.kind, t.dtype, t.trust_remote_code, role="teacher"))
    return teacher, *load_processors(path, is_image_text(teacher))


def load_processors(path: str | Path, images: bool) -> tuple[PreTrainedTokenizerBase, Any]:
    """The tokenizer saved in ``path``, and its image processor when ``images`` (else None)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return tokenizer, AutoImageProcessor.from_pretrained(str(path)) if images else None


def is_image_text(model: PreTrainedModel) -> bool:
    return getattr(model.config, "vision_config", None) is not None


def vocab_size(model: PreTrainedModel) -> int:
    """Rows of the output projection: the size of the logits the KD loss compares."""
    return model.get_output_embeddings().weight.shape[0]


def check_compatible(teacher: PreTrainedModel, student: PreTrainedModel, tokenizer_size: int) -> None:
    """Fail before training when the teacher's and student's logits cannot be compared."""
    t, s = vocab_size(teacher), vocab_size(student)
    if t != s:
        raise ModelLoadError(
            f"Teacher and student vocabularies differ: teacher has {t} logits, student has {s}. "
            "KD compares them token by token, so the student must use the teacher's tokenizer: build it "
            "from a preset (student.path=null) or load one made for this teacher."
        )
    if tokenizer_size > t:
        raise ModelLoadError(
            f"The tokenizer has {tokenizer_size} tokens but the models only {t} logits: "
            "the tokenizer does not belong to this teacher."
        )


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(text decoder with embed_tokens/layers/norm/rotary_emb, lm_head, text config) of a GLM-4 or GLM-4.1V model:
    what the export graphs and structured pruning work on."""
    model_type = getattr(model.config, "model_type", None)
    if model_type == "glm4":
        return model.model, model.lm_head, model.config
    if model_type == "glm4v":
        return model.model.language_model, model.lm_head, model.config.text_config
    raise ValueError(
        f"export and structured pruning support GLM-4 (glm4) and GLM-4.1V (glm4v) models, this one is "
        f"{model_type!r}: export=none skips the export"
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- facts about a model ---------------------------------------------------------------------------


def text_config(model_or_config):
    """The text decoder's config of a model or config (GLM-4.1V nests it as ``text_config``)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "text_config", None) or cfg


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def plain_head(model: PreTrainedModel) -> nn.Linear | None:
    """The model's lm_head when it is a plain bias-free Linear (what the chunked loss multiplies by); None when a
    callback has wrapped it (QAT fake-quantization, pruning masks), which needs the module's own forward."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.bias is None and not hasattr(head, "weight_orig"):
        return head
    return None


def qat_record(model: nn.Module) -> dict | None:
    """The QAT record a converted student carries in its config (None for a student trained without QAT)."""
    return getattr(getattr(model, "config", None), QAT_CONFIG_KEY, None)


def linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's ``nn.Linear`` modules by name, except an output head whose weight is the (tied) input
    embedding: embeddings are never sparsified."""
    get_embedding = getattr(model, "get_input_embeddings", None)
    embedding = get_embedding() if get_embedding is not None else None
    tied = getattr(embedding, "weight", None)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is not tied}


def nm_pattern(weights: list[torch.Tensor]) -> str | None:
    """``"N:M"`` when every group of M consecutive weights along the input (last) dimension of every tensor has at
    least M-N zeros (the smallest M of ``NM_GROUPS`` that fits), else None."""
    for group in NM_GROUPS:
        if not weights or any(w.shape[-1] % group for w in weights):
            continue
        zeros = min(int((w.reshape(-1, group) == 0).sum(dim=1).min()) for w in weights)
        if zeros:
            return f"{group - zeros}:{group}"
    return None


def weight_sparsity(model: nn.Module) -> dict[str, Any]:
    """The zero fraction over the model's Linear weights and its pattern: ``"N:M"``, ``"unstructured"``, or None
    when under ``MIN_ZERO_FRACTION`` (a dense model)."""
    weights = [m.weight.detach() for m in linear_weights(model).values()]
    total = sum(w.numel() for w in weights)
    fraction = sum(int((w == 0).sum()) for w in weights) / total if total else 0.0
    pattern = None if fraction < MIN_ZERO_FRACTION else nm_pattern(weights) or "unstructured"
    return {"zero_fraction": round(fraction, 4), "pattern": pattern}
