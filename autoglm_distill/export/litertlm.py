"""LiteRT-LM bundles: ``student.<precision>.litertlm``, what LiteRT-LM (Android, iOS, desktop) loads as one file.

A bundle (``litert-lm-builder``) holds the TFLite model of that precision (its ``prefill_<S>`` / ``decode`` signatures
follow LiteRT-LM's conventions, see ``tflite.py``), the HF tokenizer (``tokenizer.json``), and the LLM metadata: the
student's chat template (jinja, rendered by the runtime), its stop tokens, the context length and a greedy sampler (a
phone agent acts on its single best answer). The answer text is the raw ``<think>...</think><answer>...</answer>``;
the app parses the ``<answer>`` as with every other format.

``check`` runs the bundle in the LiteRT-LM engine (``litert-lm-api``, CPU) on the golden prompts and requires the
text it generates to equal what the bundle's own .tflite generates through the reference runner's protocol, which the
TFLite parity check has already tied to PyTorch: the bundle adds the tokenizer, template and stop tokens, and this
checks those. Image-text students get no bundle: LiteRT-LM's vision path expects its own encoder/adapter models.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FORMAT = "litertlm"
NOT_FOR_IMAGES = (
    "image-text student: LiteRT-LM's vision path expects its own vision encoder and adapter models, which this "
    "export does not write (the .tflite has the vision signature; drive it as the reference runner does)"
)


def converter_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("litert-lm-builder", "litert-lm-api")}


def _metadata(facts: Mapping[str, Any], chat_template: str) -> bytes:
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2, sampler_params_pb2

    meta = llm_metadata_pb2.LlmMetadata()
    for token in facts["eos_token_ids"]:
        meta.stop_tokens.add().token_ids.ids.append(int(token))
    meta.max_num_tokens = int(facts["max_context"])
    meta.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(generic_model=llm_model_type_pb2.GenericModel()))
    meta.jinja_prompt_template = chat_template
    meta.sampler_params.type = sampler_params_pb2.SamplerParameters.GREEDY
    meta.sampler_params.k = 1
    return meta.SerializeToString()


def write(tflite_file: Path, tokenizer_dir: Path, path: Path, facts: Mapping[str, Any]) -> dict:
    """Bundle ``tflite_file`` with the tokenizer and chat template of ``tokenizer_dir`` into ``path``; the record."""
    import litert_lm_builder as builder

    template = tokenizer_dir / "chat_template.jinja"
    if not template.is_file():
        raise ValueError(f"{template} not found: a LiteRT-LM bundle needs the student's chat template")
    bundle = builder.LitertLmFileBuilder()
    bundle.add_system_metadata(builder.Metadata(key="Authors", value="autoglm_distill", dtype=builder.DType.STRING))
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        metadata = Path(scratch) / "llm_metadata.pb"
        metadata.write_bytes(_metadata(facts, template.read_text()))
        bundle.add_llm_metadata(str(metadata))
        bundle.add_hf_tokenizer(str(tokenizer_dir / "tokenizer.json"))
        bundle.add_tflite_model(str(tflite_file), builder.TfLiteModelType.PREFILL_DECODE)
        with open(path, "wb") as out:
            bundle.build(out)
    return {"file": path, "contents": ["tflite prefill/decode", "hf tokenizer", "llm metadata"]}


def generate(path: Path, texts: Sequence[str], max_new_tokens: int) -> tuple[list[str], dict]:
    """Greedy answers of the LiteRT-LM engine (CPU) to already-rendered prompts, and its timing of the last one."""
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    answers, timing = [], {}
    # (the engine caches compiled XNNPACK kernels beside the model unless told otherwise: not in the export folder)
    with (
        tempfile.TemporaryDirectory() as cache,
        litert_lm.Engine(str(path), backend=litert_lm.Backend.CPU(), cache_dir=cache, enable_benchmark=True) as engine,
    ):
        for text in texts:
            session = engine.create_session(
                apply_prompt_template=False,
                sampler_config=litert_lm.SamplerConfig(top_k=1),
                max_output_tokens=max_new_tokens,
            )
            with session:
                session.run_prefill([text])
                answers.append(session.run_decode().texts[0])
                info = session.get_benchmark_info()
                timing = {
                    "prefill_tokens_per_second": info.last_prefill_tokens_per_second,
                    "decode_tokens_per_second": info.last_decode_tokens_per_second,
                }
    return answers, timing


def check(path: Path, tokenizer, goldens, expected: Sequence[Sequence[int]], facts: Mapping[str, Any]) -> dict:
    """Run the bundle on each golden prompt (token ids, rendered back to text) and compare its answer with the text of
    ``expected`` (the greedy tokens of the bundle's .tflite, EOS dropped: LiteRT-LM stops before a stop token)."""
    eos = set(facts["eos_token_ids"])
    texts, wanted = [], []
    for golden, tokens in zip(goldens, expected, strict=True):
        text = tokenizer.decode(golden.prompt)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != list(golden.prompt):
            raise ValueError("a golden prompt does not survive decode + encode; LiteRT-LM takes text prompts")
        texts.append(text)
        wanted.append(tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True))
    answers, timing = generate(path, texts, max(len(t) for t in expected))
    same = [a == w for a, w in zip(answers, wanted, strict=True)]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    return {
        "kind": "runtime",
        "runtime": "LiteRT-LM Engine (CPU)",
        "prompts": len(texts),
        "same_text_as_tflite": sum(same),
        "bar": "every greedy answer equals the .tflite's through the reference protocol",
        "passed": all(same),
        "first_mismatch": None if first is None else {"bundle": answers[first], "tflite": wanted[first]},
        **{f"litertlm_{k}": v for k, v in timing.items()},
    }
