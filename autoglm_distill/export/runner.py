"""Reference runner: greedy generation from an export folder alone (no PyTorch model), the spec of how to drive
the graphs.

    python -m autoglm_distill.export.runner export/demo --prompt "Turn on Wi-Fi ..." [--format tflite]

1. Render the chat (system + user) with ``tokenizer/``'s chat template, generation prompt included, and tokenize.
2. Caches: ``2 * num_layers`` float32 zeros of [1, ``num_kv_heads``, ``max_context``, ``head_dim``] (``manifest.json``
   ``model``), in the order k_0, v_0, k_1, ...; named ``kv_cache_k_<i>`` / ``kv_cache_v_<i>`` in and out (TFLite),
   ``past_key_values.<i>.key`` / ``.value`` in and ``present.<i>.key`` / ``.value`` out (ONNX).
3. Prefill every prompt token but the last, in chunks: each chunk the smallest bucket of ``model.prefill_buckets``
   that holds the rest (else the largest), right-padded with ``pad_token_id``: ``prefill_<S>`` takes ``tokens`` int32
   [1, S], ``input_pos`` int32 [S] (the chunk's positions: start, start + 1, ...) and the caches, and returns the
   caches, which replace the ones fed.
4. Decode the last prompt token: ``decode`` takes ``tokens`` int32 [1, 1], ``input_pos`` int32 [1] (its position)
   and the caches -> ``logits`` [1, 1, V] and the caches. Next token = argmax(logits); stop at an EOS id
   (``model.eos_token_ids``) or the budget; else decode it at the next position. While the position is below a
   bucket W, ``decode_<W>`` (the smallest such) does the same step reading only the first W cache positions.
5. Detokenize and parse the ``<answer>`` into an action.

Image-text (GLM-4.1V) exports (``manifest.json`` has ``model.image``) take a screenshot too (``--image``):

a. Resize it to exactly ``image.width_px`` x ``image.height_px`` and run the image processor saved in ``tokenizer/``
   (normalise, cut into ``grid_thw`` patches): ``pixel_values`` float32 [N, ``patch_dim``].
b. ``vision``: ``pixel_values`` -> ``image_embeds`` [``image.tokens``, hidden].
c. The user message is [image, text]; the chat template renders one ``<|image|>`` for the image, which is expanded
   to ``image.tokens`` copies of it; ``image_start`` is the index of the first.
d. Every ``prefill_<S>`` call also takes ``image_embeds`` and ``image_start`` int32 [1] (between ``input_pos`` and
   the caches).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from autoglm_distill.data import SYSTEM_PROMPT

Step = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class ExportFolderError(ValueError):
    """The folder is not a complete export, or lacks the requested artifact."""


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise ExportFolderError(
            f"{path} not found: {folder} is not a finished export folder (an interrupted export leaves none). "
            "Export with `python -m autoglm_distill.export student=<folder>`."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("manifest_version", 1) < 2:
        raise ExportFolderError(
            f"{path} is a version-1 export (one padded prefill graph, whole-cache tensors), which this runner does not "
            "drive: export the student again with `python -m autoglm_distill.export student=<folder>`."
        )
    return manifest


def artifact_files(artifact: dict) -> list[dict]:
    """The manifest entries (file, bytes, sha256) an artifact needs: its own file, and the weight file it shares with
    the other graphs of its format and precision (ONNX), when it has one."""
    return [artifact] + ([artifact["weights"]] if "weights" in artifact else [])


def check_files(folder: Path, manifest: dict, files: set[str]) -> None:
    """Every file about to be loaded has the size and sha256 the manifest recorded (a copy cut short or altered
    in transit fails here, naming the file, instead of giving wrong answers)."""
    from autoglm_distill.utils import sha256_of

    checked = set()
    for artifact in manifest["artifacts"]:
        if artifact["file"] not in files:
            continue
        for entry in artifact_files(artifact):
            if entry["file"] in checked:
                continue
            checked.add(entry["file"])
            path = folder / entry["file"]
            if not path.exists() or sha256_of(path) != entry["sha256"]:
                raise ExportFolderError(
                    f"{path} does not match manifest.json (sha256): the file is damaged or was changed; copy the "
                    "export folder again"
                )


def _artifacts(manifest: dict, fmt: str, precision: str) -> dict[str, str]:
    """graph name -> file, for one format and precision."""
    found = {
        g: a["file"]
        for a in manifest["artifacts"]
        if a["format"] == fmt and a["precision"] == precision
        for g in a["graphs"]
    }
    if "decode" not in found or not any(g.startswith("prefill_") for g in found):
        have = sorted({f"{a['format']}/{a['precision']}" for a in manifest["artifacts"]})
        raise ExportFolderError(f"no {fmt}/{precision} prefill+decode in this export; it has {have}")
    return found


def cache_names(fmt: str, layers: int) -> tuple[list[str], list[str]]:
    """The caches' input and output names in ``fmt``'s graphs (step 2 of the module docstring)."""
    if fmt == "onnx":
        kinds = [(i, kind) for i in range(layers) for kind in ("key", "value")]
        return [f"past_key_values.{i}.{k}" for i, k in kinds], [f"present.{i}.{k}" for i, k in kinds]
    names = [f"kv_cache_{kv}_{i}" for i in range(layers) for kv in "kv"]
    return names, names


def prefill_plan(tokens: int, buckets: list[int], context: int) -> list[int]:
    """The prefill chunks (bucket sizes) for ``tokens`` prompt tokens (step 3): each the smallest bucket that holds
    the rest, else the largest, never one that would write past ``context``. Tokens left over go through decode."""
    buckets = sorted(buckets)
    chunks, start = [], 0
    while start < tokens:
        fitting = [b for b in buckets if start + b <= context]
        if not fitting:
            break
        size = next((b for b in fitting if b >= tokens - start), fitting[-1])
        chunks.append(size)
        start += min(size, tokens - start)
    return chunks


def decode_graph(position: int, graphs) -> str:
    """The graph that decodes at ``position`` (step 4): the smallest ``decode_<W>`` window with ``position < W`` among
    ``graphs`` (names), else ``decode``."""
    windows = sorted(int(g.split("_")[1]) for g in graphs if g.startswith("decode_"))
    return next((f"decode_{w}" for w in windows if position < w), "decode")


def load_steps(folder: Path, manifest: dict, fmt: str, precision: str) -> dict[str, Step]:
    """Every graph of one format and precision, each taking and returning ``{name: array}``."""
    files = _artifacts(manifest, fmt, precision)
    check_files(folder, manifest, set(files.values()))
    if fmt == "onnx":
        import onnxruntime as ort

        def session(graph: str) -> Step:
            sess = ort.InferenceSession(str(folder / files[graph]), providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            return lambda feeds: dict(zip(names, sess.run(None, feeds), strict=True))

        return {graph: session(graph) for graph in files}
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(folder / files["decode"]))

        def signature(graph: str) -> Step:
            runner = interpreter.get_signature_runner(graph)
            # Copy the outputs: the runner's arrays may alias interpreter memory that the next call overwrites.
            return lambda feeds: {k: np.array(v) for k, v in runner(**feeds).items()}

        return {graph: signature(graph) for graph in files}
    raise ExportFolderError(f"--format {fmt}: the runner drives onnx or tflite (Core ML runs on Apple devices)")


def generate(
    steps: dict[str, Step],
    prompt: list[int],
    model: dict,
    max_new_tokens: int,
    fmt: str,
    pixel_values: np.ndarray | None = None,
) -> list[int]:
    """Greedy decoding through the graphs (steps 2-4 and b-d of the module docstring); EOS included when reached."""
    context = model["max_context"]
    if not prompt or len(prompt) + max_new_tokens - 1 > context:
        raise ValueError(f"prompt ({len(prompt)} tokens) + {max_new_tokens} new tokens exceed max_context={context}")
    inputs, outputs = cache_names(fmt, model["num_layers"])
    shape = (1, model["num_kv_heads"], context, model["head_dim"])
    caches = {name: np.zeros(shape, dtype=np.float32) for name in inputs}
    extras = {}
    image = model.get("image")
    if image is not None:
        if pixel_values is None:
            raise ValueError("this export reads a screenshot with every prompt: pass --image")
        extras["image_embeds"] = steps["vision"]({"pixel_values": pixel_values.astype(np.float32)})["image_embeds"]
        extras["image_start"] = np.array([prompt.index(image["token_id"])], dtype=np.int32)

    def decode(token: int, position: int) -> dict[str, np.ndarray]:
        return run(decode_graph(position, steps), [token], 1, position)

    def run(graph: str, tokens: list[int], size: int, start: int) -> dict[str, np.ndarray]:
        ids = np.full((1, size), model["pad_token_id"], dtype=np.int32)
        ids[0, : len(tokens)] = tokens
        feeds = {"tokens": ids, "input_pos": np.arange(start, start + size, dtype=np.int32), **caches}
        out = steps[graph]({**feeds, **extras} if graph.startswith("prefill_") else feeds)
        caches.update({i: out[o] for i, o in zip(inputs, outputs, strict=True)})
        return out

    body, start = prompt[:-1], 0
    for size in prefill_plan(len(body), model["prefill_buckets"], context):
        chunk = body[start : start + size]
        run(f"prefill_{size}", chunk, size, start)
        start += len(chunk)
    for position in range(start, len(body)):
        decode(body[position], position)
    position, token, tokens = len(body), prompt[-1], []
    while True:
        token = int(np.argmax(decode(token, position)["logits"].reshape(-1)))
        tokens.append(token)
        if token in model["eos_token_ids"] or len(tokens) == max_new_tokens:
            return tokens
        position += 1


class Runner:
    """An export folder loaded once: tokenizer (and image processor), manifest and one format+precision's graphs."""

    def __init__(self, folder: str | Path, fmt: str = "onnx", precision: str = "fp32"):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        tokenizer_dir = str(self.folder / self.manifest["tokenizer"]["folder"])
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.image = self.manifest["model"].get("image")
        self.image_processor = AutoImageProcessor.from_pretrained(tokenizer_dir) if self.image else None
        self.format, self.precision = fmt, precision
        self.steps = load_steps(self.folder, self.manifest, fmt, precision)

    def pixel_values(self, path: str | Path) -> np.ndarray:
        """Step a: the screenshot resized to the export's fixed size, as the image processor's patches."""
        from PIL import Image

        with Image.open(path) as screenshot:
            resized = screenshot.convert("RGB").resize((self.image["width_px"], self.image["height_px"]))
        out = self.image_processor(images=[resized], return_tensors="np")
        if list(out["image_grid_thw"][0]) != self.image["grid_thw"]:
            raise ValueError(f"{path}: patch grid {list(out['image_grid_thw'][0])} != {self.image['grid_thw']}")
        return np.asarray(out["pixel_values"], dtype=np.float32)

    def encode(self, messages: list[dict], root: Path) -> tuple[list[int], np.ndarray | None]:
        """Steps 1 and c: prompt token ids (image placeholder expanded) and the screenshot's pixel values."""
        prompt, images = [], []
        for message in messages:
            if message["role"] == "assistant":
                continue
            content = message["content"]
            if isinstance(content, list):
                if self.image is None:  # a text-only student reads the text parts only
                    content = [c for c in content if c["type"] == "text"]
                images += [root / c["image"] for c in content if c["type"] == "image"]
            prompt.append({"role": message["role"], "content": content})
        if self.image is not None and len(images) != 1:
            raise ValueError(f"this export reads exactly one screenshot per prompt, the chat has {len(images)}")
        text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if images:
            text = text.replace("<|image|>", "<|image|>" * self.image["tokens"])
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, self.pixel_values(images[0]) if images else None

    def __call__(self, messages: list[dict], max_new_tokens: int = 64, root: str | Path = ".") -> dict:
        """Answer a chat (an assistant message, if any, is left out of the prompt); image paths are under ``root``."""
        from autoglm_distill.actions import try_parse

        ids, pixel_values = self.encode(messages, Path(root))
        tokens = generate(self.steps, ids, self.manifest["model"], max_new_tokens, self.format, pixel_values)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return {
            "format": self.format,
            "precision": self.precision,
            "prompt_tokens": len(ids),
            "tokens": tokens,
            "text": text,
            "action": try_parse(text),
        }


def run(
    folder: str | Path,
    prompt: str,
    system: str | None = SYSTEM_PROMPT,
    fmt: str = "onnx",
    precision: str = "fp32",
    max_new_tokens: int = 64,
    image: str | Path | None = None,
) -> dict:
    """Generate an answer for one user message (and screenshot); returns token counts, the text and the action."""
    content = prompt if image is None else [{"type": "image", "image": str(image)}, {"type": "text", "text": prompt}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return Runner(folder, fmt, precision)(messages, max_new_tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m autoglm_distill.export.runner", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="an export folder (has manifest.json)")
    parser.add_argument("--prompt", required=True, help='the user message, e.g. "Task: ...\\nApp: ...\\nElements: ..."')
    parser.add_argument("--system", default=SYSTEM_PROMPT, help="system message ('' for none)")
    parser.add_argument("--format", default="onnx", choices=["onnx", "tflite"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int4"])
    parser.add_argument("--image", help="the screenshot (image-text exports)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        result = run(
            args.folder,
            args.prompt.replace("\\n", "\n"),
            args.system or None,
            args.format,
            args.precision,
            args.max_new_tokens,
            args.image,
        )
    except (ExportFolderError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(result["text"])
    print(
        json.dumps(
            {"action": result["action"], "prompt_tokens": result["prompt_tokens"], "new_tokens": len(result["tokens"])}
        )
    )


if __name__ == "__main__":
    main()
