"""What the hidden-states server, the spool transport and the client share (a module below all three).

Spool folders: a server's connector writes each request's states to `<spool>/<request id>.safetensors`, and the
trainer reads and deletes that file. The trainer trusts only the folders it was configured with: the paths named in
`SPECULATORS_HF_SPOOL_DIRS` (separated by `:`), else `default_spool_root()` (`/dev/shm/speculators_hf`, where every
`serve-hidden-states` without `--spool-dir` spools). A server that names a file anywhere else is refused.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..http import JSONClient, Retryable
from ..utils import UserError

SERVER_INFO = "server.json"  # written into the spool by the server: what it captures, read by clients as a check
SPOOL_DIRS_ENV = "SPECULATORS_HF_SPOOL_DIRS"
KEY_FLAG = "--hidden-states-api-key"  # the trainer's flag for a server's --api-key


class OnlineError(UserError):
    """A problem the user must fix (no server left, a server capturing other layers, a prompt too long).

    Raised inside a DataLoader worker, it comes back to the training process as `type(traceback text)`; the
    constructor keeps only this exception's own line, so the CLI still prints one line.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Original Traceback" in message:
            lines = [line for line in message.splitlines() if f"{type(self).__name__}: " in line]
            if lines:
                message = lines[-1].split(f"{type(self).__name__}: ", 1)[1]
        super().__init__(message)


class UntrustedPath(OnlineError):
    """A server named a file outside the trainer's spool folders: nothing is read or deleted, the run stops."""


class BadStates(RuntimeError):
    """A server's answer that cannot be trained on (missing or unreadable states): retried, then skipped."""


def default_spool_root() -> Path:
    """`/dev/shm/speculators_hf` (the temporary folder where there is no writable /dev/shm)."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return root / "speculators_hf"


def default_spool_dir(port: int) -> Path:
    return default_spool_root() / f"hidden-states-{port}"


def trusted_spool_dirs(spool_dirs: list[str | Path] | None = None) -> list[Path]:
    """The folders a trainer reads and deletes states in: `spool_dirs`, else `$SPECULATORS_HF_SPOOL_DIRS`, else the
    default root; resolved (symlinks followed)."""
    if spool_dirs is None:
        spool_dirs = [p for p in os.environ.get(SPOOL_DIRS_ENV, "").split(os.pathsep) if p] or [default_spool_root()]
    return [Path(p).expanduser().resolve() for p in spool_dirs]


def server_models(http: JSONClient, url: str, timeout: float) -> list[str]:
    """The model names a server serves (`GET /v1/models`); raises `http.Retryable`/`Rejected` if it cannot tell."""
    answer = http.get(f"{url}/v1/models", timeout=timeout)
    try:
        models = [str(m["id"]) for m in answer["data"]]
    except (TypeError, KeyError) as err:
        raise Retryable(f"{url}/v1/models", "answered without a model list (is it a vLLM server?)") from err
    if not models:
        raise Retryable(f"{url}/v1/models", "serves no model")
    return models
