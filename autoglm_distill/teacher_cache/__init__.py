"""Offline teacher cache: per supervised token, the teacher's top-k log-probs and ids and the leftover mass.

``python -m autoglm_distill.teacher_cache`` writes one; ``distill.teacher=cache`` trains from it without loading
the teacher. A cache is a folder::

    index.json           format, settings (k, value bits, temperature), teacher, data fingerprints, shards + sha256
    tokenizer files      the teacher's tokenizer (and image processor), so that training needs no teacher folder
    {split}-{n:05d}.npz  shards of consecutive examples

Per token the k ids are sorted and delta-coded with a Rice code (quotients in unary, remainders in ``b`` bits, ``b``
chosen per shard to minimise its size); the log-probs, in id order, are quantized to ``value_bits`` levels between
the token's smallest and largest one (both fp32); the log of the leftover mass is fp16. Decoding renormalises the
``k + 1`` buckets. The whole folder is written under a temporary name and moved into place when complete, and every
shard is checked against its sha256 before use, so a truncated or corrupted shard is named, never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autoglm_distill.utils import write_json_atomic

log = logging.getLogger(__name__)

FORMAT = "autoglm_distill.teacher_cache/1"
REBUILD = "rebuild it: python -m autoglm_distill.teacher_cache with the training run's overrides"


class TeacherCacheError(RuntimeError):
    """A teacher cache is missing, incomplete, corrupted or does not fit the run; the message says how to fix it."""


# --- the code: Rice-coded sorted ids, quantized log-probs -------------------------------------------------------


def _rice_parameter(deltas: np.ndarray) -> int:
    """The b minimising the Rice code's size: sum(d >> b) unary bits + (1 + b) bits per value."""
    sizes = [int((deltas >> b).sum()) + deltas.size * (1 + b) for b in range(32)]
    return int(np.argmin(sizes))


def _pack_fixed(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (non-negative, < 2**bits) as a big-endian bit stream, ``bits`` each."""
    if bits == 0:
        return np.zeros(0, np.uint8)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    return np.packbits(((values.astype(np.uint64)[:, None] >> shifts) & 1).astype(np.uint8).ravel())


def _unpack_fixed(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 0:
        return np.zeros(count, np.uint64)
    flat = np.unpackbits(packed, count=count * bits).reshape(count, bits).astype(np.uint64)
    return flat @ (np.uint64(1) << np.arange(bits - 1, -1, -1, dtype=np.uint64))


def encode(ids: np.ndarray, logp: np.ndarray, rest: np.ndarray, value_bits: int) -> dict[str, np.ndarray]:
    """Arrays for ``n`` tokens: ``ids`` and ``logp`` ``[n, k]``, ``rest`` ``[n]`` (see the module docstring)."""
    n, k = ids.shape
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1).astype(np.int64)
    logp = np.maximum(np.take_along_axis(logp, order, axis=1).astype(np.float32), -1e4)  # -inf: fp16-safe
    deltas = (np.diff(ids, axis=1, prepend=-1) - 1).ravel().astype(np.uint64)  # first id, then gaps - 1
    b = _rice_parameter(deltas)
    quotients = deltas >> np.uint64(b)
    unary = np.ones(int(quotients.sum()) + deltas.size, np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 0  # each quotient's run of ones ends in a zero
    lo, hi = logp.min(axis=1), logp.max(axis=1)
    span = hi - lo
    top = 2**value_bits - 1
    scaled = (logp - lo[:, None]) / np.where(span > 0, span, 1)[:, None]
    levels = np.clip(np.rint(scaled * top), 0, top).astype(np.uint64)
    return {
        "header": np.array([n, k, b, value_bits, unary.size], np.int64),
        "unary": np.packbits(unary),
        "remainders": _pack_fixed(deltas & np.uint64((1 << b) - 1), b),
        "values": _pack_fixed(levels.ravel(), value_bits),
        "lo": lo,
        "hi": hi,
        "rest": rest.astype(np.float16),
    }


def decode(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int64 ``[n, k]`` sorted, log-probs float32 ``[n, k]``, rest float32 ``[n]``), renormalised."""
    n, k, b, value_bits, unary_bits = (int(x) for x in arrays["header"])
    zeros = np.flatnonzero(np.unpackbits(arrays["unary"], count=unary_bits) == 0)
    quotients = np.diff(zeros, prepend=-1) - 1
    if quotients.size != n * k:
        raise ValueError(f"the id stream holds {quotients.size} values, expected {n * k}")
    deltas = (quotients.astype(np.uint64) << np.uint64(b)) | _unpack_fixed(arrays["remainders"], b, n * k)
    ids = np.cumsum(deltas.astype(np.int64).reshape(n, k) + 1, axis=1) - 1
    levels = _unpack_fixed(arrays["values"], value_bits, n * k).reshape(n, k).astype(np.float32)
    lo, hi = arrays["lo"].astype(np.float32), arrays["hi"].astype(np.float32)
    logp = lo[:, None] + levels / (2**value_bits - 1) * (hi - lo)[:, None]
    rest = arrays["rest"].astype(np.float32)
    # Quantization moves the total mass slightly off 1: renormalise the k + 1 buckets.
    with np.errstate(divide="ignore"):
        log_total = np.log(np.exp(logp).sum(axis=1) + np.exp(rest))
    return ids, logp - log_total[:, None], rest - log_total


# --- writing ----------------------------------------------------------------------------------------------------


def fingerprint(rows) -> str:
    """sha256 of a split's tokenized examples (input ids, labels, image paths), in order."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(np.asarray(row["input_ids"], np.int64).tobytes())
        digest.update(np.asarray(row["labels"], np.int64).tobytes())
        digest.update("\0".join(row.get("images") or []).encode() + b"\1")
    return digest.hexdigest()


@dataclass
class CacheWriter:
    """Collects per-example top-k arrays split by split and writes shards of about ``shard_tokens`` tokens into
    ``folder`` (a temporary folder that the caller moves into place); `finish` writes ``index.json``."""

    folder: Path
    value_bits: int = 8
    shard_tokens: int = 1_000_000
    shards: list[dict] = field(default_factory=list)
    _pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    _split: str | None = None
    _first: int = 0
    _count: int = 0

    def add(self, split: str, ids: np.ndarray, logp: np.ndarray, rest: np.ndarray) -> None:
        """One example's supervised tokens, in position order."""
        if split != self._split:
            self._flush()
            self._split, self._first, self._count = split, 0, 0
        self._pending.append((ids, logp, rest))
        if sum(len(p[2]) for p in self._pending) >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        counts = np.array([len(p[2]) for p in self._pending], np.int64)
        ids, logp, rest = (np.concatenate(parts) for parts in zip(*self._pending, strict=True))
        arrays = encode(ids, logp, rest, self.value_bits)
        arrays["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32)
        name = f"{self._split}-{sum(s['split'] == self._split for s in self.shards):05d}.npz"
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
        (self.folder / name).write_bytes(data)
        self.shards.append(
            {
                "file": name,
                "split": self._split,
                "first_example": self._first + self._count,
                "examples": len(counts),
                "tokens": int(counts.sum()),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        self._count += len(counts)
        self._pending = []

    def finish(self, info: dict) -> dict:
        """Flush the last shard and write index.json (``info``: settings, teacher, data); returns the index."""
        self._flush()
        tokens = sum(s["tokens"] for s in self.shards)
        size = sum(s["bytes"] for s in self.shards)
        index = {
            "format": FORMAT,
            **info,
            "value_bits": self.value_bits,
            "tokens": tokens,
            "bytes": size,
            "bytes_per_token": size / max(tokens, 1),
            "shards": self.shards,
        }
        write_json_atomic(self.folder / "index.json", index)
        return index


# --- reading ----------------------------------------------------------------------------------------------------


class TeacherCache:
    """A teacher cache folder, opened for training: `example` gives one example's top-k targets.

    Opening checks the index and that every shard is there at its recorded size; a shard's sha256 is checked when
    it is first read. Decoded shards are kept in a small LRU.
    """

    def __init__(self, path: str | Path, keep_shards: int = 4):
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            partial = sorted(self.path.parent.glob(f"{self.path.name}.tmp-*")) if self.path.parent.is_dir() else []
            hint = f" (an interrupted build left {partial[0].name})" if partial else ""
            raise TeacherCacheError(
                f"No teacher cache at {self.path}: index.json is missing{hint}. Build it first, "
                f"python -m autoglm_distill.teacher_cache <the training run's overrides>, or point "
                "distill.cache.dir at an existing cache."
            )
        try:
            self.index = json.loads(index_path.read_text())
        except json.JSONDecodeError as err:
            raise TeacherCacheError(f"{index_path} is not valid JSON ({err}): {REBUILD}.") from err
        if self.index.get("format") != FORMAT:
            raise TeacherCacheError(
                f"{index_path} has format {self.index.get('format')!r}, this version reads {FORMAT!r}: {REBUILD}."
            )
        self._shards: dict[str, list[dict]] = {}
        for shard in self.index["shards"]:
            file = self.path / shard["file"]
            if not file.resolve().is_relative_to(self.path.resolve()):
                raise TeacherCacheError(
                    f"{index_path} names a shard outside the cache folder ({shard['file']}): {REBUILD}."
                )
            if not file.is_file():
                raise TeacherCacheError(f"Teacher cache shard {file} is missing: {REBUILD}.")
            if file.stat().st_size != shard["bytes"]:
                raise TeacherCacheError(
                    f"Teacher cache shard {file} is truncated or overwritten ({file.stat().st_size} bytes, the index "
                    f"says {shard['bytes']}): {REBUILD}."
                )
            self._shards.setdefault(shard["split"], []).append(shard)
        self._decoded: OrderedDict[str, tuple] = OrderedDict()
        self._keep = keep_shards

    @property
    def temperature(self) -> float:
        return float(self.index["temperature"])

    @property
    def images(self) -> bool:
        return bool(self.index["images"])

    def examples(self, split: str) -> int:
        return sum(s["examples"] for s in self._shards.get(split, []))

    def check_split(self, split: str, rows) -> None:
        """The split's data must be what the cache was written for (same examples, tokens and labels)."""
        expected = self.index["data"].get(split)
        if expected is None:
            raise TeacherCacheError(f"The teacher cache {self.path} has no {split!r} split: {REBUILD}.")
        if expected["examples"] != len(rows) or expected["fingerprint"] != fingerprint(rows):
            raise TeacherCacheError(
                f"The teacher cache {self.path} was written for other {split} data ({expected['examples']} examples, "
                f"this run has {len(rows)}, or their tokens, labels, max_length or tokenizer differ): {REBUILD}."
            )

    def _load(self, shard: dict) -> tuple:
        name = shard["file"]
        if name not in self._decoded:
            data = (self.path / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise TeacherCacheError(
                    f"Teacher cache shard {self.path / name} is corrupted (sha256 mismatch): {REBUILD}."
                )
            with np.load(io.BytesIO(data)) as arrays:
                ids, logp, rest = decode(dict(arrays))
                offsets = arrays["offsets"].astype(np.int64)
            self._decoded[name] = (torch.from_numpy(ids), torch.from_numpy(logp), torch.from_numpy(rest), offsets)
            while len(self._decoded) > self._keep:
                self._decoded.popitem(last=False)
        self._decoded.move_to_end(name)
        return self._decoded[name]

    def example(self, split: str, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids ``[n, k]``, log-probs ``[n, k]``, leftover log-mass ``[n]``) of example ``i`` of ``split``."""
        for shard in self._shards.get(split, []):
            if shard["first_example"] <= i < shard["first_example"] + shard["examples"]:
                ids, logp, rest, offsets = self._load(shard)
                j = i - shard["first_example"]
                sl = slice(offsets[j], offsets[j + 1])
                return ids[sl], logp[sl], rest[sl]
        raise TeacherCacheError(f"The teacher cache {self.path} has no example {i} in split {split!r}: {REBUILD}.")


def top_k(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, log-probs, leftover log-mass) of the ``k`` most likely tokens of ``softmax(logits / T)``, ``[n, V]``."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    top = log_p.topk(k, dim=-1)
    rest = torch.logsumexp(log_p.scatter(-1, top.indices, -torch.inf), dim=-1)
    return top.indices, top.values, rest
