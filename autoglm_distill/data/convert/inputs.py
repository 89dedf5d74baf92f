"""Reading the releases' common forms: Parquet shards (Hugging Face mirrors), JSON files (one record, or a list of
them) and JSONL files, a file or a folder of them; and the splits files. TFRecord, the Google Cloud releases' own
form, needs tensorflow, which this project does not ship: such a file stops the run naming how to turn it into JSONL
once, elsewhere (``tfrecord_to_jsonl.py`` beside this file)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autoglm_distill.data.convert.common import ConvertError, Report

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
GZIP_MAGIC = b"\x1f\x8b"
TFRECORD_FIX = (
    "it needs tensorflow, which this project does not ship. Convert it to JSONL once, on any machine with "
    "tensorflow (pip install tensorflow): copy autoglm_distill/data/convert/tfrecord_to_jsonl.py there and run "
    "`python tfrecord_to_jsonl.py <tfrecord files> --out <file>.jsonl`, then pass that .jsonl (or a folder of "
    "them) as --src. A Hugging Face Parquet mirror of the release works too."
)


def _is_tfrecord(path: Path) -> bool:
    name = path.name.lower()
    if "tfrecord" in name:
        return True
    if path.suffix.lower() in DATA_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(2) == GZIP_MAGIC  # the releases are GZIP-compressed TFRecords named like foo-00001-of-00020
    except OSError:
        return False


def find_inputs(src: Path) -> list[Path]:
    """The data files under ``src`` (itself when a file), sorted; raises ConvertError naming the fix."""
    if not src.exists():
        raise ConvertError(f"--src {src} does not exist: point it at the downloaded release (a file or a folder).")
    if src.is_file():
        if _is_tfrecord(src):
            raise ConvertError(f"--src {src} looks like a TFRecord file: {TFRECORD_FIX}")
        if src.suffix.lower() not in DATA_SUFFIXES:
            raise ConvertError(f"--src {src}: unsupported file type; give .parquet, .json or .jsonl files.")
        return [src]
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        tfrecords = [p for p in sorted(src.rglob("*")) if p.is_file() and _is_tfrecord(p)]
        if tfrecords:
            raise ConvertError(f"--src {src} holds TFRecord files ({tfrecords[0].name}, ...): {TFRECORD_FIX}")
        raise ConvertError(f"--src {src} holds no .parquet, .json or .jsonl file: point it at the release's data.")
    return files


def _parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(path)
        index = 0
        for batch in reader.iter_batches(batch_size=64):
            for row in batch.to_pylist():
                yield f"record {index}", row
                index += 1
    except (OSError, ValueError) as err:  # pyarrow's ArrowIOError is an OSError, its ArrowInvalid a ValueError
        raise ConvertError(f"{path} is not a readable Parquet file ({err}): download it again.") from None


def _json(path: Path, report: Report) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConvertError(f"cannot read {path} ({err}): check the file's permissions and that it is UTF-8.") from None
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                report.bad("malformed_record", path, f"line {lineno}", f"not valid JSON ({err.msg})")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        report.bad("malformed_record", path, "whole file", f"not valid JSON ({err.msg} at line {err.lineno})")
        return
    if isinstance(data, list):
        for index, record in enumerate(data):
            yield f"record {index}", record
    else:
        yield "whole file", data


def iter_records(files: list[Path], report: Report) -> Iterator[tuple[Path, str, dict]]:
    """``(file, position, record)`` for every record; a record that is not a JSON object is reported, not yielded."""
    for path in files:
        rows = _parquet(path) if path.suffix.lower() == ".parquet" else _json(path, report)
        for position, record in rows:
            if isinstance(record, dict):
                yield path, position, record
            else:
                report.bad("malformed_record", path, position, f"expected an object, got {type(record).__name__}")


SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


def episode_key(value: Any) -> str:
    """An episode id as the splits files name it: ``123``, ``"123"`` and ``"123.json"`` (GUI-Odyssey) agree."""
    text = str(value)
    return text[: -len(".json")] if text.endswith(".json") else text


def read_splits_file(path: Path) -> tuple[dict[str, str], list[str]]:
    """``{episode id: "train"|"val"|"test"}`` from a ``{"train": [...], "validation": [...], "test": [...]}`` file,
    and the keys it ignored."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"--splits-file {path} is not a readable JSON file ({err}).") from None
    if not isinstance(data, dict) or not any(key in SPLIT_NAMES for key in data):
        raise ConvertError(
            f"--splits-file {path} must map train/validation/test to lists of episode ids, "
            f"got {'keys ' + str(sorted(data)) if isinstance(data, dict) else type(data).__name__}."
        )
    mapping: dict[str, str] = {}
    for key, ids in data.items():
        if key in SPLIT_NAMES and isinstance(ids, list):
            mapping.update((episode_key(i), SPLIT_NAMES[key]) for i in ids)
    return mapping, sorted(k for k in data if k not in SPLIT_NAMES)
