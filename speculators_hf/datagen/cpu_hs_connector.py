"""A CPU-safe variant of vLLM's `ExampleHiddenStatesConnector` (used only when vLLM runs on a CPU platform).

The stock connector copies the request's hidden states out of the KV cache on a CUDA stream into pinned memory, which
fails on a CPU-only torch ("pin_memory=True requires a CUDA or other accelerator backend"). On CPU the KV cache already
lives in host memory, so this subclass gathers the request's slots synchronously, clones them, and hands the stock
`_write_tensors` an event that is already complete. Everything else (lock files, bookkeeping, paths) is the stock
connector's.

vLLM imports this module by name in its spawned workers: `kv_connector_module_path =
"speculators_hf.datagen.cpu_hs_connector"`. It relies on private members of a connector vLLM marks as an example, so it
is pinned to the vLLM version it was written and tested against (`vllm_backend.CPU_CONNECTOR_VLLM_VERSION`; its
name and module path are `CPU_CONNECTOR` and `CPU_CONNECTOR_MODULE` there).
"""

from __future__ import annotations

import fcntl
import os
from functools import partial

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)


class _DoneEvent:
    """Stands in for the CUDA event of the stock connector: the copy is synchronous on CPU."""

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


class CpuHiddenStatesConnector(ExampleHiddenStatesConnector):
    """`ExampleHiddenStatesConnector` without CUDA streams or pinned memory."""

    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        block_ids = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slot_mapping = (offsets[None, :] + block_ids[:, None] * self._block_size).flatten()
        num_tokens = pending.token_ids.shape[0]
        hidden_states = extract_from_kv_cache(self._kv_cache, slot_mapping, num_tokens).clone()  # [T, L, H]
        tensors = {"hidden_states": hidden_states, "token_ids": pending.token_ids.clone()}

        assert self._req_futures.get(pending.req_id) is None, "Found another request with the same req_id"
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        event = _DoneEvent()
        future = self._executor.submit(self._write_tensors, tensors, event, pending.filename, lock_fd)
        self._req_copy_events[pending.req_id] = event
        self._req_futures[pending.req_id] = future
        future.add_done_callback(partial(self._on_write_done, pending.req_id))
