"""The hybrid-mode cache: states fetched in the first epoch, kept in datagen's shard format for later epochs/restarts.

Each write is one shard (`datagen.shards.write_shard`, atomic) named `data-c<first sample>-<random>.safetensors`, so
several processes can fill one folder and `ShardDataset(folder)` reads it like datagen output. Samples are keyed by
their datagen sample id (`ShardDataset.sample_id`). A killed run leaves only complete shards, and the next run reads
them instead of fetching again. Every shard is checked (`check_shard`, and its states' shape against `meta`) when it is
first indexed, so a bad file left in the folder is one line naming it; the folder and its `cache_config.json` are
written with the first shard (a run that stops before fetching anything leaves nothing).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open

from ..formats.shards import check_shard, write_shard
from ..utils import UserError, write_json
from ..validation import read_json_if_exists
from .client import OnlineError

CACHE_CONFIG = "cache_config.json"


class HiddenStatesCache:
    """`get(sample_id) -> [T, L, H] | None`, `put(samples)`; `meta` (data fingerprint, layer ids) guards reuse."""

    def __init__(self, folder: str | Path, meta: dict):
        self.folder = Path(folder)
        self.meta = meta
        fix = "delete it or choose another --hidden-states-cache-dir"
        try:
            previous = read_json_if_exists(self.folder / CACHE_CONFIG, fix=fix)
        except UserError as err:
            raise OnlineError(str(err)) from err
        if previous is not None and previous != meta:
            shown = str(previous) if len(str(previous)) <= 120 else str(previous)[:117] + "..."
            raise OnlineError(
                f"--hidden-states-cache-dir {self.folder / CACHE_CONFIG}: records states of other data or layers "
                f"({shown}); delete the folder or choose another."
            )
        self._where: dict[int, tuple[str, int, int]] = {}  # sample id -> (file, start, end)
        self._files: set[str] = set()
        self._handles: dict[str, object] = {}
        self.refresh()  # what an earlier run left, checked now (in the main process)

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def refresh(self) -> None:
        """Index shards written since the last call (by this or any other process), checking each one."""
        for path in sorted(self.folder.glob("data-*.safetensors")):
            if path.name in self._files:
                continue
            try:
                shape, offsets, ids = check_shard(path, fix="delete it (its samples are fetched again)")
            except UserError as err:  # an OnlineError: one line even from a DataLoader worker
                raise OnlineError(str(err)) from err
            layers, hidden = len(self.meta.get("layer_ids") or []), self.meta.get("hidden_size")
            if shape is None or (hidden is not None and list(shape[1:]) != [layers, hidden]):
                got = "no hidden states" if shape is None else f"states [N, {shape[1]}, {shape[2]}]"
                raise OnlineError(
                    f"{path}: holds {got}, expected [N, {layers}, {hidden}] (layers, hidden size); delete it (its "
                    "samples are fetched again)."
                )
            offsets, ids = offsets.tolist(), ids.tolist()
            for s, sample_id in enumerate(ids):
                self._where[sample_id] = (path.name, offsets[s], offsets[s + 1])
            self._files.add(path.name)

    def __contains__(self, sample_id: int) -> bool:
        return sample_id in self._where

    def get(self, sample_id: int) -> torch.Tensor | None:
        where = self._where.get(sample_id)
        if where is None:
            return None
        name, a, b = where
        if name not in self._handles:  # a shard refresh() checked, or put() wrote
            self._handles[name] = safe_open(str(self.folder / name), "pt")
        return self._handles[name].get_slice("hidden_states")[a:b]  # [T, L, H]

    def put(self, samples: list[dict[str, torch.Tensor]], sample_ids: list[int]) -> None:
        """Write `samples` (`input_ids`, `loss_mask`, `hidden_states`) as one shard and index it."""
        if not samples:
            return
        if not (self.folder / CACHE_CONFIG).exists():
            write_json(self.folder / CACHE_CONFIG, self.meta)
        path = self.folder / f"data-c{sample_ids[0]:09d}-{uuid.uuid4().hex[:8]}.safetensors"
        write_shard(path, samples, sample_ids)
        offset = 0
        for sample_id, sample in zip(sample_ids, samples):
            n = len(sample["input_ids"])
            self._where[sample_id] = (path.name, offset, offset + n)
            offset += n
        self._files.add(path.name)

    def num_bytes(self) -> int:
        """Bytes of every cache shard in the folder (written by any process)."""
        return sum(os.path.getsize(p) for p in self.folder.glob("data-*.safetensors"))  # none: no folder yet
