"""Small helpers: atomic writes and rank-aware logging."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_only


def rank_zero_logger(name: str) -> logging.Logger:
    """A logger whose info/warning calls print on global rank 0 only."""
    logger = logging.getLogger(name)
    for level in ("debug", "info", "warning"):
        setattr(logger, level, rank_zero_only(getattr(logger, level)))
    return logger


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)
    return path


def sha256_of(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names included, in sorted order: an .mlpackage)."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def save_dir_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` and move the folder into place only once it is complete.

    An interrupted save leaves ``<path>.tmp-*`` behind, never a ``path`` that looks finished.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{path.name}.tmp-"))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
