"""Export a student to every format and precision, verify each artifact, and write what the mobile team gets.

``export_student`` builds the fixed-shape prefill/decode graphs (``graphs.py``), writes them per format
(``onnx.py``, ``tflite.py``, ``coreml.py``), checks every artifact against the PyTorch student on golden prompts
(``verify.py``), times prefill and decode in onnxruntime and LiteRT, then writes the tokenizer, ``manifest.json``,
``report.md`` and ``report.png``. Everything is written into a temporary folder beside the target and moved into
place only when every check passed: a failed or interrupted export never leaves a complete-looking folder.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoglm_distill.data.episodes import EpisodeFormat
from autoglm_distill.data.phone import ChatEncoder, DataError, read_split
from autoglm_distill.data.synth import sample_chats
from autoglm_distill.export import coreml, litertlm, onnx, tflite
from autoglm_distill.export.graphs import GraphSpec, buckets
from autoglm_distill.export.report import measure_latency, size_rows, write_report
from autoglm_distill.export.storage import weight_storage
from autoglm_distill.export.verify import Bars, ExportVerificationError, Golden, Session, compare, judge, references
from autoglm_distill.models import decoder_parts, qat_record, weight_sparsity
from autoglm_distill.utils import save_dir_atomic, sha256_of

log = logging.getLogger(__name__)

BACKENDS = {"onnx": onnx, "tflite": tflite, "coreml": coreml}
# litertlm bundles each TFLite precision with the tokenizer and chat template (export/litertlm.py).
FORMATS = (*BACKENDS, litertlm.FORMAT)
# 2: a KV cache per layer, prefill_<S> buckets and decode windows (1: one prefill of C tokens, whole-cache tensors)
MANIFEST_VERSION = 2


@dataclass
class ExportSettings:
    """What to export and how hard to check it (``conf/export/default.yaml`` mirrors these fields)."""

    max_context: int = 512
    # prefill graphs of these lengths (those below max_context) and of max_context; decode windows of the same
    prefill_buckets: Sequence[int] = (64, 128, 256)
    formats: Sequence[str] = ("onnx", "tflite", "litertlm", "coreml")
    quantize: bool = True  # also write the int8 and int4 artifacts
    max_new_tokens: int = 32  # greedy tokens compared per golden prompt
    golden_prompts: int = 4
    latency_runs: int = 20
    bars: Bars = field(default_factory=Bars)

    def __post_init__(self):
        problems = []
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown:
            problems.append(f"unknown export format(s) {unknown}; choose from {sorted(FORMATS)}.")
        formats = list(self.formats)
        if litertlm.FORMAT in formats and (
            tflite.FORMAT not in formats or formats.index(tflite.FORMAT) > formats.index(litertlm.FORMAT)
        ):
            problems.append("export.formats: litertlm bundles the .tflite files, so list tflite before it.")
        if self.max_context <= self.max_new_tokens:
            problems.append(
                f"export.max_context={self.max_context} must exceed export.max_new_tokens={self.max_new_tokens}."
            )
        if any(int(b) < 1 for b in self.prefill_buckets):
            problems.append(f"export.prefill_buckets={list(self.prefill_buckets)}: every bucket must be >= 1 token.")
        if problems:
            raise ValueError(" ".join(problems))
        if isinstance(self.bars, Mapping):  # from a config (DictConfig) or JSON
            self.bars = Bars(**dict(self.bars))


def settings_from_config(cfg: Mapping[str, Any]) -> ExportSettings:
    """``ExportSettings`` from the ``export`` config group (keys that are not settings, like ``dir``, are ignored)."""
    names = {f.name for f in fields(ExportSettings)}
    values = {k: v for k, v in cfg.items() if k in names}
    values["formats"] = tuple(values.get("formats", ExportSettings.formats))
    values["prefill_buckets"] = tuple(values.get("prefill_buckets", ExportSettings.prefill_buckets))
    return ExportSettings(**values)


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def model_facts(
    model: nn.Module,
    tokenizer,
    max_context: int,
    golden: Golden | None = None,
    prefill_buckets: Sequence[int] = ExportSettings.prefill_buckets,
) -> dict[str, Any]:
    """The facts a runtime needs to drive the graphs; stored in the manifest and in every file's metadata.

    For an image-text student ``golden`` (a prompt with its screenshot) fixes the image geometry of the graphs."""
    text, _, cfg = decoder_parts(model)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or cfg.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = getattr(cfg, "pad_token_id", None)
    facts = {
        "producer": "autoglm_distill",
        "architecture": model.config.model_type,
        "max_context": max_context,
        "prefill_buckets": buckets(prefill_buckets, max_context),
        "vocab_size": cfg.vocab_size,
        "num_layers": cfg.num_hidden_layers,
        "num_kv_heads": cfg.num_key_value_heads,
        "head_dim": text.layers[0].self_attn.head_dim,
        "eos_token_ids": eos_ids,
        "pad_token_id": pad if pad is not None else 0,
        "special_tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens},
        "weight_sparsity": weight_sparsity(model),  # zeros in the Linear weights; pattern None: dense
    }
    qat = qat_record(model)
    if qat is not None:  # trained with fake-quantized weights: the int8 artifacts carry what was trained
        facts["qat"] = qat
    if model.config.model_type == "glm4v":
        if golden is None or golden.grid_thw is None:
            raise ValueError("an image-text student needs golden prompts with a screenshot to fix the image size")
        vision = model.config.vision_config
        t, h, w = golden.grid_thw
        merged = [h // vision.spatial_merge_size, w // vision.spatial_merge_size]
        tokens = merged[0] * merged[1]
        facts["image"] = {
            "token_id": tokenizer.convert_tokens_to_ids("<|image|>"),
            "height_px": h * vision.patch_size,
            "width_px": w * vision.patch_size,
            "grid_thw": [t, h, w],
            "patch_dim": int(golden.pixel_values.shape[1]),
            "merged_grid": merged,
            "tokens": tokens,
            "rope_delta": max(merged) - tokens,
        }
    return facts


def data_goldens(root: Path, encoder, limit: int = 64, fmt: EpisodeFormat | None = None) -> list[Golden]:
    """Golden prompts from the first ``limit`` valid chats of ``<root>/val.jsonl`` (episode steps rendered with
    ``fmt``), encoded as in training (with their screenshots when ``encoder`` has an image processor)."""
    path = root / "val.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist: data_path must be a data folder with val.jsonl")
    records, _ = read_split(path, root, fmt)
    goldens = []
    for record in records[:limit]:
        ids, images = encoder.encode_prompt(record["messages"], root)
        if encoder.use_images and len(images) == 1:
            pixels = encoder.pixels(images, root)
            grid = tuple(int(n) for n in pixels["image_grid_thw"][0])
            goldens.append(Golden(ids, pixels["pixel_values"].float(), grid))
        elif not encoder.use_images:
            goldens.append(Golden(ids))
    return goldens


def fitting(goldens: Sequence[Golden], settings: ExportSettings) -> list[Golden]:
    """The first ``settings.golden_prompts`` goldens that leave room for ``max_new_tokens`` in ``max_context`` (and,
    with screenshots, have the first one's image size: the graphs are built for one size)."""
    room = settings.max_context - settings.max_new_tokens + 1
    grid = goldens[0].grid_thw if goldens else None
    fit = [g for g in goldens if 0 < len(g.prompt) <= room and g.grid_thw == grid][: settings.golden_prompts]
    if not fit:
        longest = max((len(g.prompt) for g in goldens), default=0)
        raise ValueError(
            f"no golden prompt fits: export.max_context={settings.max_context} leaves {room} tokens after "
            f"export.max_new_tokens={settings.max_new_tokens}, the prompts have up to {longest}; raise "
            "export.max_context"
        )
    return fit


def _shared_weights(record: Mapping[str, Any], tmp: Path, seen: dict[Path, dict]) -> dict[str, Any]:
    """``{"weights": file, bytes, sha256, sharing figures}`` for a graph whose weights live in a file it shares with
    the other graphs of its format and precision (ONNX external data); ``{}`` for a self-contained file. ``seen``
    holds the entries already made, so each shared file is hashed once."""
    if "weights_file" not in record:
        return {}
    path = Path(record["weights_file"])
    if path not in seen:
        seen[path] = {
            "file": str(path.relative_to(tmp)),
            "bytes": _bytes(path),
            "sha256": sha256_of(path),
            **record["weight_sharing"],
        }
    return {"weights": seen[path]}


def _with_qat(quantization: dict | None, qat: dict | None, precision: str) -> dict | None:
    """A quantized artifact's quantization record, with the QAT scheme the student was trained under (if any)."""
    if quantization is None or qat is None:
        return quantization
    if precision == "int8" and qat.get("weights_on_int8_grid"):
        note = "weights were trained on this int8 per-channel grid: the int8 file holds the trained values"
    else:  # e.g. trained for int4 per group of 16, written as int4 in blocks of 32 or as int8 per channel
        note = f"trained for {qat['weights']}; written as {quantization['weights']} (the grids differ: not exact)"
    return {**quantization, "qat": qat, "qat_note": note}


def _fp32_cpu(model: nn.Module) -> nn.Module:
    if all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32)


def _runtime(fmt: str, records: Sequence[Mapping], specs: Mapping[str, GraphSpec]) -> dict[str, Any]:
    """Every graph of one format+precision, loaded in its real runtime and called like the torch wrappers."""

    def find(graph: str) -> Mapping:
        return next(r for r in records if graph in r["graphs"])

    return {g: BACKENDS[fmt].load(find(g), spec) for g, spec in specs.items()}


def _check(fmt: str, precision: str, records, specs, graphs, refs, facts, bars: Bars) -> dict:
    """Core ML: structural checks of each package; ONNX/TFLite: parity of the loaded ``graphs`` against ``refs``."""
    if fmt == "coreml":
        checks = {g: coreml.check_structure(r, specs, precision, g) for r in records for g in r["graphs"]}
        return {"kind": "structural", **checks, "passed": all(c["passed"] for c in checks.values())}
    figures = compare(graphs, refs, facts)
    return {
        "kind": "runtime",
        "runtime": "onnxruntime CPU EP" if fmt == "onnx" else "ai_edge_litert Interpreter",
        **judge(figures, precision, bars),
    }


def _bundles(tmp, artifacts, runtimes, tokenizer, goldens, facts, settings) -> tuple[list[dict], list[str]]:
    """A LiteRT-LM bundle per TFLite artifact written so far, each run in the LiteRT-LM engine: manifest entries and
    failures."""
    out, failures = [], []
    folder = tmp / litertlm.FORMAT
    folder.mkdir()
    versions = litertlm.converter_versions()
    for artifact in [a for a in artifacts if a["format"] == tflite.FORMAT]:
        precision = artifact["precision"]
        start = time.perf_counter()
        path = folder / f"student.{precision}.litertlm"
        record = litertlm.write(tmp / artifact["file"], tmp / "tokenizer", path, facts)
        session = Session(runtimes[(tflite.FORMAT, precision)], facts)
        expected = [session.generate(g, settings.max_new_tokens, facts["eos_token_ids"]) for g in goldens]
        parity = litertlm.check(path, tokenizer, goldens, expected, facts)
        log.info(
            "export: litertlm %s: %s in %.1f s",
            precision,
            "passed" if parity["passed"] else "FAILED",
            time.perf_counter() - start,
        )
        if not parity["passed"]:
            failures.append(f"litertlm {precision}: {json.dumps(parity)}")
        out.append(
            {
                **{k: artifact[k] for k in ("precision", "graphs", "signatures", "max_context", "kv_cache")},
                **{k: artifact[k] for k in ("quantization", "weight_storage")},
                "format": litertlm.FORMAT,
                "file": str(path.relative_to(tmp)),
                "bytes": _bytes(path),
                "sha256": sha256_of(path),
                "contents": record["contents"],
                "converter": versions,
                "parity": parity,
                "cpu_latency_ms": None,
            }
        )
    return out, failures


def export_student(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    settings: ExportSettings | None = None,
    golden: Sequence[Golden | Sequence[int]] | None = None,
    source: str | None = None,
    image_processor=None,
) -> dict:
    """Export ``model`` (GLM-4 or GLM-4.1V) and its tokenizer to ``out_dir``; returns the manifest.

    Args:
        model: the student; exported as an fp32 CPU copy (the caller's model is untouched).
        tokenizer: its tokenizer; saved into ``out_dir/tokenizer`` and used to render the golden prompts.
        out_dir: the export folder; an existing one is replaced only after every check passed.
        settings: formats, max context, bars; defaults to ``ExportSettings()``.
        golden: prompts the parity checks run (``Golden``, or token-id lists for text-only students); those that fit
            are used, up to ``golden_prompts``. Default (text-only students): seeded synthetic phone chats rendered
            with the tokenizer's chat template. Image-text students need goldens with their screenshots; the first
            one's image size becomes the graphs' fixed size.
        source: where the student came from (a folder, a run), recorded in the manifest.
        image_processor: an image-text student's image processor, saved next to the tokenizer.

    Raises:
        ExportVerificationError: an artifact failed its check; ``report`` holds every figure.
    """

    settings = settings or ExportSettings()
    out_dir = Path(out_dir).resolve()
    model = _fp32_cpu(model)
    if golden is None:
        if model.config.model_type == "glm4v":
            raise ValueError(
                "an image-text student is checked on prompts with screenshots: pass data_path=<folder with val.jsonl>"
            )
        encoder = ChatEncoder(tokenizer, None, max_length=1 << 30)
        golden = [Golden(encoder.encode_prompt(chat, Path("."))[0]) for chat in sample_chats(settings.golden_prompts)]
    goldens = fitting([g if isinstance(g, Golden) else Golden(list(g)) for g in golden], settings)
    facts = model_facts(model, tokenizer, settings.max_context, goldens[0], settings.prefill_buckets)
    log.info(
        "export: %d golden prompts (%s tokens), max_context %d%s",
        len(goldens),
        "/".join(str(len(g.prompt)) for g in goldens),
        settings.max_context,
        f", screenshots {facts['image']['width_px']}x{facts['image']['height_px']}" if "image" in facts else "",
    )
    refs = references(model, goldens, facts, settings.max_new_tokens)
    was_training = model.training
    model.eval()
    manifest: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        artifacts, failures, shared, runtimes, not_built = [], [], {}, {}, {}
        tokenizer.save_pretrained(tmp / "tokenizer")
        if image_processor is not None:
            image_processor.save_pretrained(tmp / "tokenizer")
        for fmt in settings.formats:
            if fmt == litertlm.FORMAT:
                if "image" in facts:
                    not_built[fmt] = litertlm.NOT_FOR_IMAGES
                    log.warning("export: no LiteRT-LM bundle: %s", litertlm.NOT_FOR_IMAGES)
                    continue
                bundles, bundle_failures = _bundles(tmp, artifacts, runtimes, tokenizer, goldens, facts, settings)
                artifacts += bundles
                failures += bundle_failures
                continue
            backend = BACKENDS[fmt]
            specs = backend.specs(model, facts)
            folder = tmp / fmt
            folder.mkdir()
            precisions = backend.PRECISIONS if settings.quantize else backend.PRECISIONS[:1]
            versions = backend.converter_versions()
            for precision in precisions:
                start = time.perf_counter()
                log.info("export: %s %s: converting", fmt, precision)
                records = backend.write(specs, folder, precision, facts)
                graphs = None if fmt == "coreml" else _runtime(fmt, records, specs)  # Core ML runs on macOS only
                runtimes[(fmt, precision)] = graphs
                parity = _check(fmt, precision, records, specs, graphs, refs, facts, settings.bars)
                seconds = time.perf_counter() - start
                log.info(
                    "export: %s %s: %s in %.1f s", fmt, precision, "passed" if parity["passed"] else "FAILED", seconds
                )
                if not parity["passed"]:
                    failures.append(f"{fmt} {precision}: {json.dumps(parity)}")
                latency = None
                if graphs is not None:
                    latency = measure_latency(graphs, goldens[0], facts, settings.latency_runs)
                for record in records:
                    path = Path(record["file"])
                    artifacts.append(
                        {
                            "format": fmt,
                            "precision": precision,
                            "graphs": record["graphs"],
                            "file": str(path.relative_to(tmp)),
                            "bytes": _bytes(path),
                            "sha256": sha256_of(path),
                            **_shared_weights(record, tmp, shared),
                            "signatures": record["signatures"],
                            "max_context": settings.max_context,
                            "kv_cache": backend.KV_CACHE if any(g != "vision" for g in record["graphs"]) else None,
                            "quantization": _with_qat(record["quantization"], facts.get("qat"), precision),
                            "weight_storage": record.get("weight_storage") or weight_storage(facts),
                            "converter": versions,
                            "parity": parity,
                            "cpu_latency_ms": latency,
                        }
                    )
        if failures:
            raise ExportVerificationError(
                "export failed its parity checks (nothing was written):\n  " + "\n  ".join(failures),
                {"artifacts": artifacts},
            )
        manifest.update(
            {
                "manifest_version": MANIFEST_VERSION,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "source": source,
                "model": facts,
                "tokenizer": {
                    "folder": "tokenizer",
                    "files": sorted(p.name for p in (tmp / "tokenizer").iterdir()),
                    "chat_template": "tokenizer/chat_template.jinja",
                    "prompt_ends_with": "<|assistant|>\\n",
                },
                "golden": {
                    "prompts": len(goldens),
                    "max_new_tokens": settings.max_new_tokens,
                    "bars": asdict(settings.bars),
                },
                "artifacts": artifacts,
                "not_built": not_built,
            }
        )
        # What each format + precision takes on disk, every file once (ONNX graphs share their weight file).
        manifest["sizes"] = [{k: r[k] for k in ("format", "precision", "files", "bytes")} for r in size_rows(manifest)]
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        write_report(tmp, manifest)

    try:
        save_dir_atomic(out_dir, write)
    finally:
        model.train(was_training)
    log.info("export: %d artifacts verified and written to %s", len(manifest["artifacts"]), out_dir)
    return manifest
