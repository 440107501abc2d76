"""The few helpers every stage shares: logging, atomic writes, user errors."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from transformers.utils import logging as hf_logging


def get_logger(name: str):
    return hf_logging.get_logger(name)


def vllm_is_available() -> bool:
    """Whether vLLM is installed (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class UserError(ValueError):
    """A problem with the user's input: the CLI prints its message as one line and exits 2 (no traceback).

    The message is one short line (what is wrong, where, how to fix it); `details`, if any, follow it on later lines.
    """

    def __init__(self, message: str, details: str | None = None):
        super().__init__(message)
        self.details = details


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; on success it replaces `path` in one `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the result the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
