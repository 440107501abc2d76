"""The few helpers every stage shares: logging, atomic writes, user errors."""

from __future__ import annotations

import errno
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

    exit_code = 2

    def __init__(self, message: str, details: str | None = None):
        super().__init__(message)
        self.details = details


class RunFailed(UserError):
    """The run itself failed (non-finite values, nothing to train on, a full disk, a server gone): one line, exit 1.

    Nothing is taken for finished: the stage's outputs stay marked unfinished, and what was complete is kept."""

    exit_code = 1


_FAULTS = {
    errno.ENOSPC: ("the disk is full", "free space there (or write elsewhere) and rerun: finished work is kept"),
    errno.EDQUOT: ("the disk quota is used up", "free space there (or write elsewhere) and rerun"),
    errno.EROFS: ("the file system is read-only", "choose a writable folder"),
    errno.EACCES: ("permission denied", "choose a folder you may write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you may write to, or fix its permissions"),
}


def environment_fault(err: BaseException) -> RunFailed | None:
    """One line for a fault of the machine rather than of the code (disk full, read-only or forbidden folder), naming
    the path; None for any other error."""
    while err is not None and not (isinstance(err, OSError) and err.errno in _FAULTS):
        err = err.__cause__ or err.__context__
    if err is None:
        return None
    what, fix = _FAULTS[err.errno]
    where = f"{err.filename}: " if err.filename else ""
    return RunFailed(f"{where}{what} ({os.strerror(err.errno)}); {fix}.")


def check_writable(folder: str | Path, label: str) -> None:
    """Fail before any work starts when `folder` (created if missing) cannot take new files."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        fault = environment_fault(err)
        if fault is None:
            raise UserError(f"{label} {folder}: cannot write there ({err.strerror or err}).") from err
        raise RunFailed(f"{label} {folder}: {str(fault).split(': ', 1)[-1]}") from err


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
