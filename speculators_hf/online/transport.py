"""How one request's hidden states travel from a server's KV connector to the trainer.

The server answers a request with `kv_transfer_params`; a transport turns them into tensors and frees the server-side
copy. `SpoolTransport` reads the file the hidden-states connector wrote into its `shared_storage_path` (tmpfs on one
node, a shared filesystem across nodes). Another transport (Mooncake, NIXL) implements the same two methods for a
connector that puts the states elsewhere; nothing else changes.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load

from ..utils import UserError
from ..validation import describe, resolve_inside
from .common import SERVER_INFO, SPOOL_DIRS_ENV, BadStates, UntrustedPath, trusted_spool_dirs


class HiddenStatesTransport(Protocol):
    name: str

    def load(self, kv_transfer_params: dict) -> dict[str, torch.Tensor]:
        """`{"hidden_states": [T, L, H], "token_ids": [T]}` of one request; the server-side copy is freed."""

    def discard(self, kv_transfer_params: dict) -> None:
        """Free the server-side copy without using it (a rejected answer)."""

    def server_info(self, kv_transfer_params: dict) -> dict | None:
        """What the server says it captures (`layer_ids`, `hidden_size`, ...), when the transport can tell."""


class SpoolTransport:
    """Files `<spool>/<request id>.safetensors` written by the connector under an exclusive lock on `<file>.lock`.

    `load` takes a shared lock on the `.lock` file (it blocks until the writer is done, as vLLM's own
    `load_hidden_states`), reads the file into memory, and then deletes both: at most the requests in flight are on
    disk. A path from a server is never trusted: it must resolve (symlinks followed) to a `.safetensors` file inside
    one of `spool_dirs`, or the run stops with one line (`UntrustedPath`) and nothing is read or deleted; a file is
    deleted only after it was read completely.

    Args:
        spool_dirs (`list[str]`, *optional*): the folders states may be read from and deleted in (default:
            `$SPECULATORS_HF_SPOOL_DIRS`, else `/dev/shm/speculators_hf`: see `common.py`).
        path_map (`dict[str, str]`, *optional*): server path prefix -> local path prefix, for a shared filesystem
            mounted at another path on the trainer nodes (applied before the check).
        lock_timeout (`float`): seconds to wait for the writer's lock before giving the answer up as bad.
    """

    name = "spool"

    def __init__(
        self,
        spool_dirs: list[str | Path] | None = None,
        path_map: dict[str, str] | None = None,
        lock_timeout: float = 120.0,
    ):
        self.spool_dirs = trusted_spool_dirs(spool_dirs)
        self.path_map = dict(path_map or {})
        self.lock_timeout = lock_timeout
        self._local = threading.local()

    @property
    def last_spool_bytes(self) -> int:
        """Bytes of states in the spool folder when this thread last read a file (a sample of the disk in use)."""
        return getattr(self._local, "spool_bytes", 0)

    def local_path(self, kv_transfer_params: dict) -> Path:
        """The states file an answer names, resolved inside a trusted spool folder (else `UntrustedPath`)."""
        path = (kv_transfer_params or {}).get("hidden_states_path")
        if not path:
            raise BadStates("the server returned no hidden_states_path: is its hidden-states KV connector active?")
        if not isinstance(path, str):
            raise UntrustedPath(f"names {path!r} as its states file, not a path; refused")
        for remote, local in self.path_map.items():
            if path.startswith(remote):
                path = local + path[len(remote) :]
        folders = ", ".join(map(str, self.spool_dirs))
        fix = (
            "refused, nothing read or deleted: give the server a --spool-dir inside one of them, or list its spool "
            f"folder in {SPOOL_DIRS_ENV}"
        )
        for root in self.spool_dirs:
            try:
                resolved = resolve_inside(root, path, "hidden_states_path")
            except UserError:
                continue
            if resolved == root or resolved.suffix != ".safetensors":
                raise UntrustedPath(
                    f"names {path[:200]!r} as its states file, not a .safetensors file; refused, nothing read or "
                    "deleted (is it a serve-hidden-states server?)"
                )
            return resolved
        raise UntrustedPath(
            f"names {path[:200]!r} as its states file, outside the spool folders this trainer reads ({folders}); {fix}"
        )

    def load(self, kv_transfer_params: dict) -> dict[str, torch.Tensor]:
        path = self.local_path(kv_transfer_params)
        data = self._read(path)
        self._local.spool_bytes = spool_bytes(path.parent)
        _remove(path)  # read completely: the server-side copy is no longer needed
        try:
            return load(data)
        except Exception as err:  # a file cut short by a server that died while writing it
            raise BadStates(f"{path} is not a readable safetensors file ({err})") from err

    def discard(self, kv_transfer_params: dict) -> None:
        path = self.local_path(kv_transfer_params)
        try:
            self._read(path)
        except BadStates:
            return  # gone, or not a file we may delete
        _remove(path)

    def server_info(self, kv_transfer_params: dict) -> dict | None:
        info = self.local_path(kv_transfer_params).parent / SERVER_INFO
        try:  # the server's own record; unreadable: no layer check (the states' shape is still checked)
            value = json.loads(info.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _read(self, path: Path) -> bytes:
        """The whole file, once its writer is done; `BadStates` if it is missing or not a regular file."""
        self._wait_for_writer(path)
        try:  # no symlink (the path is resolved), no FIFO or device: they could block or never end
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError as err:
            raise BadStates(f"{path} does not exist: is the spool folder shared with this machine?") from err
        except OSError as err:
            raise BadStates(f"{path} cannot be read ({describe(err)})") from err
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise BadStates(f"{path} is not a regular file")
            try:
                return file.read()
            except OSError as err:
                raise BadStates(f"{path} cannot be read ({describe(err)})") from err

    def _wait_for_writer(self, path: Path) -> None:
        lock = Path(f"{path}.lock")
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            return  # no lock (use_synchronization_lock off, or already released and removed)
        except OSError as err:
            raise BadStates(f"{lock} cannot be opened ({describe(err)})") from err
        try:
            deadline, delay = time.monotonic() + self.lock_timeout, 0.001
            while True:  # a blocking flock cannot time out; poll (the writer holds it for milliseconds)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BadStates(f"{path}: the writer held its lock for {self.lock_timeout:.0f} s") from None
                    time.sleep(delay)
                    delay = min(2 * delay, 0.05)
        finally:
            os.close(fd)


def spool_bytes(folder: Path) -> int:
    """Bytes of hidden-state files in a spool folder now (every writer's and reader's, not only ours)."""
    total = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".safetensors"):
                    try:
                        total += entry.stat().st_size
                    except FileNotFoundError:
                        continue
    except FileNotFoundError:
        return 0
    return total


def _remove(path: Path) -> None:
    Path(f"{path}.lock").unlink(missing_ok=True)
    path.unlink(missing_ok=True)
