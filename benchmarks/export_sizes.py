"""Bytes per format and precision of an exported student, every file once (the manifest's ``sizes``), against its
full-precision files; and the parity figures of each quantized artifact.

    python benchmarks/export_sizes.py                          # a >= 1M-parameter random GLM-4 (the test's shape)
    python benchmarks/export_sizes.py --export export/demo     # an existing export folder's manifest

The random student shows the storage arithmetic at a width where weights dominate (its int4 parity says nothing about
a trained model's); a trained student's export folder gives both. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from autoglm_distill.data import synth  # noqa: E402
from autoglm_distill.data.phone import corpus_texts  # noqa: E402
from autoglm_distill.export import Bars, ExportSettings, export_student  # noqa: E402
from autoglm_distill.models import build_model  # noqa: E402
from autoglm_distill.tokenizer import train_glm_tokenizer  # noqa: E402

WIDE = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_hidden_layers": 2,
}


# A random model's near-tied logits flip under quantization: no top-1 or KL bar (the figures are still recorded).
NO_QUANTIZED_BARS = Bars(int8_min_top1_agreement=0.0, int4_min_top1_agreement=0.0, int4_max_mean_kl=10.0)


def wide_export(out: Path, settings: ExportSettings | None = None, golden=((1, 2, 3),)) -> tuple[dict, int]:
    """Export a random GLM-4 of shape ``WIDE`` with a small trained tokenizer; returns the manifest and its size.
    Default settings: a 16-token context (sizes only)."""
    data = synth.generate(out / "data", 12, 3, 3, seed=0, images=False)
    tokenizer = train_glm_tokenizer(corpus_texts(data / "train.jsonl"), vocab_size=400)
    torch.manual_seed(0)
    model = build_model("glm4", WIDE, tokenizer).eval()
    settings = settings or ExportSettings(
        max_context=16, max_new_tokens=4, golden_prompts=1, latency_runs=1, bars=NO_QUANTIZED_BARS
    )
    manifest = export_student(model, tokenizer, out / "wide", settings, golden=[list(g) for g in golden])
    return manifest, sum(p.numel() for p in model.parameters())


def table(manifest: dict) -> list[dict]:
    parity = {(a["format"], a["precision"]): a["parity"] for a in manifest["artifacts"]}
    full = {s["format"]: s["bytes"] for s in manifest["sizes"] if s["precision"] in ("fp32", "fp16")}
    rows = []
    for s in manifest["sizes"]:
        p = parity[(s["format"], s["precision"])]
        rows.append(
            {
                "format": s["format"],
                "precision": s["precision"],
                "bytes": s["bytes"],
                "vs_full_precision": s["bytes"] / full[s["format"]],
                # Core ML's full precision is fp16: its ratio to fp32 bytes is half of that
                "vs_fp32": s["bytes"] / full[s["format"]] / (2 if s["format"] == "coreml" else 1),
                "top1_agreement": p.get("top1_agreement"),
                "mean_kl": p.get("mean_kl"),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, help="an export folder (default: export a random wide student)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_sizes.json")
    args = parser.parse_args()
    if args.export is not None:
        manifest, params = json.loads((args.export / "manifest.json").read_text()), None
        source = str(args.export)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            manifest, params = wide_export(Path(tmp))
        source = f"random GLM-4 {WIDE}"
    rows = table(manifest)
    print(f"{source}" + (f", {params:,} parameters" if params else ""))
    print(f"{'format':<9}{'precision':<10}{'bytes':>12}{'vs full':>9}{'vs fp32':>9}{'top-1':>8}{'mean KL':>10}")
    for r in rows:
        top1 = "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}"
        kl = "-" if r["mean_kl"] is None else f"{r['mean_kl']:.1e}"
        print(
            f"{r['format']:<9}{r['precision']:<10}{r['bytes']:>12,}{r['vs_full_precision']:>9.3f}"
            f"{r['vs_fp32']:>9.3f}{top1:>8}{kl:>10}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": source, "parameters": params, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
