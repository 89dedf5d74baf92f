"""Convert public phone-agent datasets into this project's episode JSONL.

``python -m autoglm_distill.data.convert {androidcontrol,aitw,gui_odyssey} --src PATH --out FOLDER`` reads the
releases' Hugging Face forms (Parquet, JSON, JSONL; TFRecord needs tensorflow, see ``inputs.py``) and writes
``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` (one episode a line: ``id``, ``task``, ``source``, ``steps`` with
``screenshot``, ``current_app``, ``action`` in Open-AutoGLM's syntax on its 0-999 grid, optional ``elements`` and
``target``), the screenshots under ``images/<episode id>/<step>.png`` and ``convert_report.json``: the counts, the
mapping conventions, and every record or step that could not be converted, by reason, with its file and position.

Episodes are split by a hash of their id (``--val-fraction``/``--test-fraction``, 5% each by default), or as the
source's own splits file says (``--splits-file``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from autoglm_distill.data import SPLITS
from autoglm_distill.data.convert import aitw, androidcontrol, gui_odyssey
from autoglm_distill.data.convert.common import ConvertError, Report
from autoglm_distill.data.convert.context import Context
from autoglm_distill.data.convert.inputs import episode_key, find_inputs, iter_records, read_splits_file
from autoglm_distill.utils import save_dir_atomic

SOURCES = {module.NAME: module for module in (androidcontrol, aitw, gui_odyssey)}
REPORT_FILE = "convert_report.json"
ON_UNMAPPABLE = ("drop-step", "drop-episode")


def hash_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """``train``, ``val`` or ``test`` from a stable hash of ``key`` (the same on every machine and run)."""
    u = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _check_out(out: Path, overwrite: bool) -> None:
    """``out`` may be new, empty, or (with ``overwrite``) an earlier conversion; the new one replaces it only once
    complete (written beside it, then moved into place), so an interrupted conversion loses nothing."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} is a file: give a folder.")
    if out.is_dir() and any(out.iterdir()):
        if not ((out / REPORT_FILE).is_file() or (out / "train.jsonl").is_file()):
            raise ConvertError(f"--out {out} is not empty and holds no earlier conversion: give a new or empty folder.")
        if not overwrite:
            raise ConvertError(f"--out {out} holds an earlier conversion: pass --overwrite to replace it.")


def _check_args(source, images_dir, split_by, splits_file, val_fraction, test_fraction, on_unmappable) -> str:
    if source not in SOURCES:
        raise ConvertError(f"unknown source {source!r}: choose one of {sorted(SOURCES)}.")
    if split_by is None:
        split_by = "source" if splits_file is not None else "hash"
    if split_by not in ("hash", "source"):
        raise ConvertError(f"--split-by {split_by!r}: choose hash (by episode id) or source (with --splits-file).")
    if split_by == "source" and splits_file is None:
        raise ConvertError("--split-by source needs --splits-file: the release's splits JSON (e.g. splits.json).")
    if split_by == "hash" and splits_file is not None:
        raise ConvertError("--splits-file is read with --split-by source only: drop one of the two.")
    if splits_file is not None and not Path(splits_file).is_file():
        raise ConvertError(f"--splits-file {splits_file} does not exist.")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConvertError(f"--val-fraction {val_fraction}, --test-fraction {test_fraction}: each in [0, 1), sum < 1.")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise ConvertError(f"--images-dir {images_dir} is not a folder: point it at the release's screenshots.")
    if on_unmappable not in ON_UNMAPPABLE:
        raise ConvertError(f"--on-unmappable {on_unmappable!r}: choose one of {ON_UNMAPPABLE}.")
    return split_by


def convert(
    source: str,
    src: str | Path | None,
    out: str | Path | None,
    *,
    images_dir: str | Path | None = None,
    split_by: str | None = None,
    splits_file: str | Path | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    on_unmappable: str = "drop-step",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert ``src`` (a file or folder of ``source``'s release) into episode JSONL splits in ``out``; returns the
    report (also written to ``out/convert_report.json``). Raises ConvertError, naming the fix, for bad arguments or
    an unreadable input."""
    if src is None:
        raise ConvertError(f"--src is required: the {source} release, a .parquet/.json/.jsonl file or a folder.")
    if out is None:
        raise ConvertError("--out is required: the folder to write train/val/test.jsonl and images/ into.")
    split_by = _check_args(source, images_dir, split_by, splits_file, val_fraction, test_fraction, on_unmappable)
    src, out = Path(src), Path(out)
    images_dir = Path(images_dir) if images_dir else None
    if hasattr(SOURCES[source], "locate"):  # a release's own folder layout (GUI-Odyssey: annotations/, screenshots/)
        src, images_dir = SOURCES[source].locate(src, images_dir)
    files = [f for f in find_inputs(src) if splits_file is None or f.resolve() != Path(splits_file).resolve()]
    mapping, ignored_keys = read_splits_file(Path(splits_file)) if splits_file is not None else ({}, [])
    has_val = "val" in mapping.values()
    _check_out(out, overwrite)
    report = Report(source)

    def write(folder: Path) -> None:
        ctx = Context(
            folder, report, images_dir, on_unmappable == "drop-episode", set(mapping) if splits_file else None
        )
        handles = {split: open(folder / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}
        try:
            for raw_id, episode in SOURCES[source].convert(iter_records(files, report), ctx):
                if split_by == "hash":
                    split = hash_split(episode["id"], val_fraction, test_fraction)
                else:
                    split = mapping[episode_key(raw_id)]  # the context dropped (and counted) episodes it does not list
                    if split == "train" and not has_val and hash_split(episode["id"], val_fraction, 0.0) == "val":
                        split = "val"  # the source has no validation split (GUI-Odyssey): carve it out of train
                handles[split].write(json.dumps(episode, ensure_ascii=False) + "\n")
                report.episodes += 1
                report.steps += len(episode["steps"])
                report.splits[split] += 1
        finally:
            for handle in handles.values():
                handle.close()
        (folder / REPORT_FILE).write_text(json.dumps(result(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def result() -> dict[str, Any]:
        return report.to_json(
            {
                "src": str(src),
                "out": str(out),
                "images_dir": str(images_dir) if images_dir else None,
                "split_by": split_by,
                "splits_file": str(splits_file) if splits_file else None,
                "splits_file_keys_ignored": ignored_keys,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction if split_by == "hash" else None,
                "on_unmappable": on_unmappable,
                "conventions": SOURCES[source].CONVENTIONS,
            }
        )

    save_dir_atomic(out, write)
    return result()
