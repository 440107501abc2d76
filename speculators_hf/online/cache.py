"""The hybrid-mode cache: states fetched in the first epoch, kept in datagen's shard format for later epochs/restarts.

Each write is one shard (`datagen.shards.write_shard`, atomic) named `data-c<first sample>-<random>.safetensors`, so
several processes can fill one folder and `ShardDataset(folder)` reads it like datagen output. Samples are keyed by
their datagen sample id (`ShardDataset.sample_id`). A killed run leaves only complete shards, and the next run reads
them instead of fetching again.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open

from ..datagen.shards import write_shard
from ..utils import write_json
from .client import OnlineError

CACHE_CONFIG = "cache_config.json"


class HiddenStatesCache:
    """`get(sample_id) -> [T, L, H] | None`, `put(samples)`; `meta` (data fingerprint, layer ids) guards reuse."""

    def __init__(self, folder: str | Path, meta: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / CACHE_CONFIG
        if config.exists():
            previous = json.loads(config.read_text())
            if previous != meta:
                raise OnlineError(
                    f"--hidden-states-cache-dir {self.folder} holds states of other data or layers ({previous}); "
                    "delete it or choose another folder."
                )
        else:
            write_json(config, meta)
        self._where: dict[int, tuple[str, int, int]] = {}  # sample id -> (file, start, end)
        self._files: set[str] = set()
        self._handles: dict[str, object] = {}

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def refresh(self) -> None:
        """Index shards written since the last call (by this or any other process)."""
        for path in sorted(self.folder.glob("data-*.safetensors")):
            if path.name in self._files:
                continue
            with safe_open(str(path), "pt") as f:
                ids, offsets = f.get_tensor("sample_ids").tolist(), f.get_tensor("sample_offsets").tolist()
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
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), "pt")
        return self._handles[name].get_slice("hidden_states")[a:b]  # [T, L, H]

    def put(self, samples: list[dict[str, torch.Tensor]], sample_ids: list[int]) -> None:
        """Write `samples` (`input_ids`, `loss_mask`, `hidden_states`) as one shard and index it."""
        if not samples:
            return
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
        return sum(os.path.getsize(p) for p in self.folder.glob("data-*.safetensors"))
