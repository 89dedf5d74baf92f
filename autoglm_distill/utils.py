"""Small helpers: atomic writes, rank-aware logging, and keeping secrets out of everything the run writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pytorch_lightning.utilities import rank_zero_only


def rank_zero_logger(name: str) -> logging.Logger:
    """A logger whose info/warning calls print on global rank 0 only."""
    logger = logging.getLogger(name)
    for level in ("debug", "info", "warning"):
        setattr(logger, level, rank_zero_only(getattr(logger, level)))
    return logger


def write_file_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it and rename it over ``path``: readers (and a
    rerun after kill -9) see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; the result is as readable as any output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (`write_file_atomic`)."""
    return write_file_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


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


# Environment variables that hold credentials (WANDB_API_KEY, HF_TOKEN, ...) and config keys that name one.
SECRET_ENV = re.compile(r".*(API_KEY|TOKEN|SECRET|PASSWORD).*", re.IGNORECASE)
SECRET_KEY = re.compile(r"(.*_)?(api_key|secret|password)|(hf_|hub_|auth_|access_|api_)?token", re.IGNORECASE)
# `name=value` (an override, also inside Hydra's override_dirname) and a YAML `name: value` line.
ASSIGNMENT = re.compile(r"([\w.~]*?([\w~]+)=)([^,\s]+)")
YAML_ITEM = re.compile(r"^(\s*-?\s*([\w~]+)\s*:\s*)(\S.*)$")
MASK = "***"


def secret_values() -> list[str]:
    """The values of this process's credential environment variables (at least 8 characters: not flags)."""
    return sorted({v for k, v in os.environ.items() if SECRET_ENV.fullmatch(k) and len(v) >= 8}, key=len, reverse=True)


def redact_text(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """``obj`` (a resolved config or summary) with credentials masked: every value under a key such as ``api_key``,
    ``hf_token`` or ``password``, and every occurrence of a credential environment variable's value."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {
            k: MASK if SECRET_KEY.fullmatch(str(k)) and isinstance(v, str) and v else redact(v, secrets)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return type(obj)(redact(v, secrets) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


class RedactSecrets(logging.Filter):
    """Masks credential values in every log record that passes through a handler (console and Hydra's log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_values()
        message = record.getMessage()
        if any(secret in message for secret in secrets):
            record.msg, record.args = redact_text(message, secrets), None
        return True


def install_secret_filter() -> None:
    """Attach `RedactSecrets` to the root logger's handlers (once)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


def redact_line(line: str, secrets: list[str]) -> str:
    """A line of text or a command-line argument with credential values and values of secret-named keys masked."""
    line = ASSIGNMENT.sub(lambda m: m[1] + MASK if SECRET_KEY.fullmatch(m[2]) else m[0], redact_text(line, secrets))
    item = YAML_ITEM.match(line)
    if item and SECRET_KEY.fullmatch(item[2]) and item[3].strip() not in ("null", "~"):
        line = item[1] + MASK
    return line


def redact_files(folder: str | Path, secrets: list[str] | None = None) -> None:
    """Rewrite the YAML files in ``folder`` (Hydra's config dump: config.yaml, overrides.yaml, hydra.yaml) with
    credentials masked, so that a token passed on the command line is not left on disk."""
    secrets = secret_values() if secrets is None else secrets
    for path in Path(folder).glob("*.yaml"):
        text = path.read_text()
        clean = "".join(redact_line(line, secrets) + "\n" for line in text.splitlines())
        if clean != text:
            path.write_text(clean)


@contextlib.contextmanager
def masked_argv() -> Iterator[None]:
    """``sys.argv`` with secrets masked while the block runs: W&B records the command line when its run starts."""
    original = sys.argv[:]
    secrets = secret_values()
    sys.argv[1:] = [redact_line(arg, secrets) for arg in original[1:]]
    try:
        yield
    finally:
        sys.argv[:] = original
