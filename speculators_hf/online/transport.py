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
import threading
import time
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load

from .server import SERVER_INFO


class BadStates(RuntimeError):
    """A server's answer that cannot be trained on (missing or unreadable states): retried, then skipped."""


class HiddenStatesTransport(Protocol):
    name: str

    def load(self, kv_transfer_params: dict) -> dict[str, torch.Tensor]:
        """`{"hidden_states": [T, L, H], "token_ids": [T]}` of one request; the server-side copy is freed."""

    def discard(self, kv_transfer_params: dict) -> None:
        """Free the server-side copy without reading it (a rejected answer)."""

    def server_info(self, kv_transfer_params: dict) -> dict | None:
        """What the server says it captures (`layer_ids`, `hidden_size`, ...), when the transport can tell."""


class SpoolTransport:
    """Files `<spool>/<request id>.safetensors` written by the connector under an exclusive lock on `<file>.lock`.

    `load` takes a shared lock on the `.lock` file (it blocks until the writer is done, as vLLM's own
    `load_hidden_states`), reads the file into memory, and deletes both: at most the requests in flight are on disk.

    Args:
        path_map (`dict[str, str]`, *optional*): server path prefix -> local path prefix, for a shared filesystem
            mounted at another path on the trainer nodes.
        lock_timeout (`float`): seconds to wait for the writer's lock before giving the answer up as bad.
    """

    name = "spool"

    def __init__(self, path_map: dict[str, str] | None = None, lock_timeout: float = 120.0):
        self.path_map = dict(path_map or {})
        self.lock_timeout = lock_timeout
        self._local = threading.local()

    @property
    def last_spool_bytes(self) -> int:
        """Bytes of states in the spool folder when this thread last read a file (a sample of the disk in use)."""
        return getattr(self._local, "spool_bytes", 0)

    def local_path(self, kv_transfer_params: dict) -> Path:
        path = (kv_transfer_params or {}).get("hidden_states_path")
        if not path:
            raise BadStates("the server returned no hidden_states_path: is its hidden-states KV connector active?")
        for remote, local in self.path_map.items():
            if path.startswith(remote):
                path = local + path[len(remote) :]
        return Path(path)

    def load(self, kv_transfer_params: dict) -> dict[str, torch.Tensor]:
        path = self.local_path(kv_transfer_params)
        try:
            self._wait_for_writer(path)
            try:
                data = path.read_bytes()
            except FileNotFoundError as err:
                raise BadStates(f"{path} does not exist: is the spool folder shared with this machine?") from err
            self._local.spool_bytes = spool_bytes(path.parent)
            try:
                return load(data)
            except Exception as err:  # a file cut short by a server that died while writing it
                raise BadStates(f"{path} is not a readable safetensors file ({err})") from err
        finally:
            _remove(path)

    def discard(self, kv_transfer_params: dict) -> None:
        path = self.local_path(kv_transfer_params)
        try:
            self._wait_for_writer(path)
        finally:
            _remove(path)

    def server_info(self, kv_transfer_params: dict) -> dict | None:
        info = self.local_path(kv_transfer_params).parent / SERVER_INFO
        try:  # the server's own record; unreadable: no layer check (the states' shape is still checked)
            value = json.loads(info.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _wait_for_writer(self, path: Path) -> None:
        lock = Path(f"{path}.lock")
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            return  # no lock (use_synchronization_lock off, or already released and removed)
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
