"""The conversion context: the output folder, the screenshots written into it (from bytes, Hugging Face image dicts,
base64, raw pixels or file names) and the per-episode bookkeeping that fills the report."""

from __future__ import annotations

import base64
import binascii
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from autoglm_distill.actions import try_parse
from autoglm_distill.data.convert.common import Report, Unmappable, as_text, safe_name, scalar
from autoglm_distill.data.convert.inputs import episode_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _decode_base64(text: str, size: tuple[int, int] | None) -> bytes | None:
    """The bytes of a base64 string holding an encoded image or raw pixels of ``size``; None when it holds neither."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if _looks_like_image(data) or _raw_mode(data, size) else None


def _raw_mode(data: bytes, size: tuple[int, int] | None) -> str | None:
    """``RGB``/``RGBA`` when ``data`` is that many raw pixels of ``size`` (AITW's ``image/encoded`` is raw uint8 pixels,
    its visualization_utils.py reads it with tf.io.decode_raw and reshapes to height x width x channels)."""
    if not size:
        return None
    return {size[0] * size[1] * 3: "RGB", size[0] * size[1] * 4: "RGBA"}.get(len(data))


def _looks_like_image(data: bytes) -> bool:
    return data.startswith((PNG_MAGIC, b"\xff\xd8\xff", b"RIFF", b"GIF8"))


def _png(data: bytes, size: tuple[int, int] | None) -> tuple[bytes, tuple[int, int]]:
    """PNG bytes and (width, height) of an encoded image, or of raw RGB(A) pixels when ``size`` says how to read
    them (AITW's own form); raises Unmappable("undecodable_image") when it is neither."""
    if data.startswith(PNG_MAGIC) and len(data) >= 24:
        return data, (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
    try:
        if _looks_like_image(data):
            image = Image.open(io.BytesIO(data))
        elif mode := _raw_mode(data, size):
            image = Image.frombytes(mode, size, data)
        else:
            raise ValueError(f"{len(data)} bytes, neither an encoded image nor raw pixels of the stated size")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    except (ValueError, OSError) as err:  # PIL raises OSError subclasses for bytes it cannot read
        raise Unmappable("undecodable_image", str(err)) from None
    return buffer.getvalue(), image.size


@dataclass
class Context:
    """Where a conversion writes, and what it has counted so far."""

    out: Path
    report: Report
    images_dir: Path | None = None
    drop_episode: bool = False  # --on-unmappable drop-episode: one unmappable step drops its whole episode
    listed: set[str] | None = None  # with --splits-file: the episode ids it lists (others are dropped, counted)

    def attempt(self, make_step, file: Any, position: str, episode: Any, step: int) -> dict | None:
        """``make_step()``, or None (reported with its file, position, episode and step) when it raises Unmappable."""
        try:
            return make_step()
        except Unmappable as err:
            self.report.bad(err.reason, file, position, err.detail, episode=episode, step=step)
        return None

    def episode(self, raw_id: Any, task: Any, steps: list[dict | None], file: Any, position: str) -> dict | None:
        """The episode record from its steps (None: a dropped step, already reported), or None when it is dropped
        whole (reported here). Counts the steps kept, unknown apps and the final status."""
        dropped = sum(s is None for s in steps)
        kept = [s for s in steps if s is not None]
        task = as_text(task)
        reason = None
        if self.listed is not None and episode_key(raw_id) not in self.listed:
            reason, detail = "not_in_splits_file", "the --splits-file does not list this episode"
        elif not task or not task.strip():
            reason, detail = "malformed_record", "no goal/instruction text"
        elif dropped and self.drop_episode:
            reason, detail = "episode_dropped", f"{dropped} unmappable of {len(steps)} steps (--on-unmappable)"
        elif not kept:
            reason, detail = "empty_episode", f"none of its {len(steps)} steps could be converted"
        if reason is not None:
            self.report.bad(reason, file, position, detail, episode=raw_id)
            self.report.steps_dropped += len(steps)
            self.drop_images(str(raw_id))
            return None
        report = self.report
        report.steps_dropped += dropped
        report.episodes_with_dropped_steps += dropped > 0
        report.current_app_unknown += sum(s["current_app"] == "Unknown" for s in kept)
        last = kept[-1]["action"]
        if last.startswith("finish("):
            report.status_actions[try_parse(f"<answer>{last}</answer>")["message"]] += 1
        else:
            report.episodes_without_status += 1
        return {"id": f"{report.source}-{raw_id}", "task": task.strip(), "source": report.source, "steps": kept}

    def screenshot(self, value: Any, episode: str, step: int, size: tuple[int, int] | None = None):
        """Store one step's screenshot. ``value``: image bytes, a Hugging Face image dict (``bytes``/``path``), a
        base64 string or a file name. Returns ``(path relative to the output folder or None, (width, height) or
        None)``; raises Unmappable for bytes that are no image. A file name is copied in from ``images_dir`` when
        given and found there; otherwise the name is kept and the step counted under ``missing_screenshots``."""
        value = scalar(value)
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str) and not value.lower().endswith(IMAGE_SUFFIXES) and len(value) > 64:
            value = _decode_base64(value, size) or value
        rel = f"images/{safe_name(episode)}/{step}.png"
        if isinstance(value, bytes | bytearray):
            data, size = _png(bytes(value), size)
            self._write(rel, data)
            return rel, size
        if not value:
            self._missing(f"{episode} step {step}: no screenshot in the record")
            return None, None
        found = self._find(str(value))
        if found is None:
            self._missing(str(value))
            return str(value), None
        data, size = _png(found.read_bytes(), None)  # a PNG is copied as is; other formats become PNG
        self._write(rel, data)
        return rel, size

    def _find(self, name: str) -> Path | None:
        if self.images_dir is None:
            return None
        root = self.images_dir.resolve()
        for candidate in (self.images_dir / name, self.images_dir / Path(name).name):
            if candidate.is_file() and candidate.resolve().is_relative_to(root):
                return candidate
        return None

    def _write(self, rel: str, data: bytes) -> None:
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def _missing(self, what: str) -> None:
        self.report.missing_screenshots += 1
        if len(self.report.missing_examples) < 10:
            self.report.missing_examples.append(what)

    def remove(self, rel: str | None) -> None:
        """Remove a screenshot written for a step that turned out unmappable."""
        if rel is not None and rel.startswith("images/"):
            (self.out / rel).unlink(missing_ok=True)

    def drop_images(self, episode: str) -> None:
        """Remove the screenshots already written for an episode that is dropped whole."""
        shutil.rmtree(self.out / "images" / safe_name(episode), ignore_errors=True)
