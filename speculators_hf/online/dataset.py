"""Training samples whose hidden states come from `serve-hidden-states` servers instead of datagen shards.

`OnlineHiddenStatesDataset` reads tokens and loss masks from a datagen folder (`--tokens-only`, or full shards whose
states it ignores) and fetches each sample's states when the sample is loaded: in the DataLoader workers, ahead of the
training step (`dataloader_num_workers` x `dataloader_prefetch_factor` batches), at most `max_in_flight` requests per
training process. Each process fetches only the samples its own batches hold (DDP/FSDP shard the batches).

    online   states are read into memory and their files deleted at once: every epoch fetches again, and at most
             the requests in flight are on disk.
    hybrid   the first time a sample is fetched its states are written to a cache in datagen's shard format
             (`cache.py`); later epochs and restarts read the cache.

A sample whose states stay unusable (NaN/inf, unreadable) after a retry comes without states (`hidden_states` None):
training replaces it by a zero-loss placeholder and counts it as skipped (`training.data.PackedDataset`). Each sample
carries `fetch_stats` (`FETCH_STATS_COLUMNS`), which the collator and the trainer turn into metrics.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..formats.shards import ShardDataset
from ..utils import get_logger
from ..validation import read_json_if_exists
from .cache import HiddenStatesCache
from .client import HiddenStatesClient

logger = get_logger(__name__)

# Per-sample statistics, summed over a logging interval (`spool_bytes` is a peak: max, not sum).
FETCH_STATS_COLUMNS = ("fetched", "cache_hits", "skipped", "fetch_seconds", "retries", "spool_bytes")
HIDDEN_STATES_REPORT = "hidden_states_report.json"  # written into --save-path at the end of an online/hybrid run


class OnlineHiddenStatesDataset(torch.utils.data.Dataset):
    """`dataset[i]` = `{"input_ids" [T], "loss_mask" [T], "hidden_states" [T, L, H] or None, "fetch_stats" [6]}`.

    Args:
        tokens (`ShardDataset`): the samples' tokens (read with `tokens_only=True`).
        servers (`list[str]`): server URLs, used round-robin.
        layer_ids (`list[int]`): the ids the data needs (aux ids then the last layer), checked against the servers.
        hidden_size (`int`): the verifier's hidden size.
        max_in_flight (`int`): requests in flight per training process (split over its DataLoader workers).
        num_workers (`int`): the DataLoader workers that will share `max_in_flight`.
        timeout (`float`): seconds without any server answering before training stops with one line.
        cache_dir (`str`, *optional*): hybrid mode's cache folder (None: online mode, nothing kept; or
            `use_cache` later).
        cache_meta (`dict`, *optional*): what the cache must match (data fingerprint, layer ids).
        rank (`int`): this process's rank (spreads the round-robin start over the servers).
        api_key (`str`, *optional*): the servers' `--api-key` (default: `$SPECULATORS_HF_API_KEY`).
    """

    def __init__(
        self,
        tokens: ShardDataset,
        servers: list[str],
        layer_ids: list[int],
        hidden_size: int,
        max_in_flight: int = 8,
        num_workers: int = 0,
        timeout: float = 300.0,
        cache_dir: str | Path | None = None,
        cache_meta: dict | None = None,
        rank: int = 0,
        api_key: str | None = None,
    ):
        self.tokens = tokens
        self.servers = list(servers)
        self.layer_ids = list(layer_ids)
        self.hidden_shape = (len(layer_ids), hidden_size)
        self.tokens_only = False
        self.timeout = timeout
        self.rank = rank
        self.api_key = api_key
        self.num_workers = max(1, num_workers)
        self.threads = max(1, -(-max_in_flight // self.num_workers))  # requests in flight per worker
        self.cache: HiddenStatesCache | None = None
        self.mode = "online"
        self._pid: int | None = None
        if cache_dir is not None:
            self.use_cache(cache_dir, cache_meta or {})

    def use_cache(self, folder: str | Path, meta: dict) -> None:
        """Hybrid mode: keep fetched states in `folder` (what an earlier run left there is checked now)."""
        self.cache = HiddenStatesCache(folder, meta)
        self.mode = "hybrid"

    def sample_id(self, i: int) -> int:
        return self.tokens.sample_id(i)

    # the tokens-side interface of the datasets PackedDataset packs
    @property
    def token_dataset(self) -> ShardDataset:
        return self.tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def sample_length(self, i: int) -> int:
        return self.tokens.sample_length(i)

    def num_tokens(self) -> int:
        return sum(self.tokens.sample_length(i) for i in range(len(self.tokens)))

    def __getstate__(self):
        return {**self.__dict__, "_pid": None, "_client": None, "_pool": None, "_lock": None}

    def _process_state(self) -> tuple[HiddenStatesClient, ThreadPoolExecutor]:
        """One client and thread pool per process (the training process or one of its DataLoader workers)."""
        if self._pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            self._client = HiddenStatesClient(
                self.servers,
                hidden_shape=self.hidden_shape,
                layer_ids=self.layer_ids,
                timeout=self.timeout,
                start=self.rank * self.num_workers + worker,
                api_key=self.api_key,
            )
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hidden-states")
            self._lock = threading.Lock()
            self._pid = os.getpid()
        return self._client, self._pool

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.get_many([i])[0]

    def get_many(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """Samples `indices` with their states: cached ones read, the others fetched concurrently."""
        client, pool = self._process_state()
        samples = [self.tokens[i] for i in indices]
        sample_ids = [self.tokens.sample_id(i) for i in indices]
        states: list[torch.Tensor | None] = [None] * len(indices)
        stats = torch.zeros(len(indices), len(FETCH_STATS_COLUMNS), dtype=torch.float64)
        if self.cache is not None:
            if any(s not in self.cache for s in sample_ids):
                self.cache.refresh()  # shards written by other workers, processes or an earlier run
            for j, sample_id in enumerate(sample_ids):
                states[j] = self.cache.get(sample_id)
                stats[j, 1] = states[j] is not None
        todo = [j for j in range(len(indices)) if states[j] is None]
        fresh = []
        for j, fetched in zip(todo, pool.map(lambda j: client.fetch(samples[j]["input_ids"].tolist()), todo)):
            states[j] = fetched.hidden_states
            stats[j, 0] = fetched.hidden_states is not None
            stats[j, 2] = fetched.hidden_states is None
            stats[j, 3], stats[j, 4], stats[j, 5] = fetched.seconds, fetched.retries, fetched.spool_bytes
            if fetched.hidden_states is not None:
                fresh.append(j)
        if self.cache is not None and fresh:
            self.cache.put([{**samples[j], "hidden_states": states[j]} for j in fresh], [sample_ids[j] for j in fresh])
        return [{**sample, "hidden_states": states[j], "fetch_stats": stats[j]} for j, sample in enumerate(samples)]


def hidden_states_report(dataset: OnlineHiddenStatesDataset, totals: dict[str, float]) -> dict:
    """After training: the peak bytes of hidden states on disk, what fetching cost (`totals`: the fetch statistics of
    the whole run, every process), and what datagen's shards of the same samples would hold."""
    L, H = dataset.hidden_shape
    config = read_json_if_exists(dataset.tokens.data_dir / "data_config.json") or {}  # checked when training began
    dtype = config.get("model", {}).get("hidden_states_dtype") or "float32"
    itemsize = torch.finfo(getattr(torch, dtype)).bits // 8  # what datagen's shards of the same samples would use
    return {
        "mode": dataset.mode,
        "disk_peak_bytes": int(totals["spool_bytes"]),
        "offline_shard_bytes": dataset.num_tokens() * L * H * itemsize,
        "fetched": int(totals["fetched"]),
        "cache_hits": int(totals["cache_hits"]),
        "skipped": int(totals["skipped"]),
        "retries": int(totals["retries"]),
        "cache_bytes": dataset.cache.num_bytes() if dataset.cache is not None else 0,
        "trainer_threads": torch.get_num_threads(),  # CPU servers beside the trainer: it must not take their cores
    }


def describe_report(report: dict, cache_folder: Path | None) -> str:
    """The report as the one line training prints."""
    cache = f"; hybrid cache {report['cache_bytes'] / 2**20:.2f} MiB in {cache_folder}" if cache_folder else ""
    return (
        f"hidden states on disk: peak {report['disk_peak_bytes'] / 2**20:.2f} MiB in flight ({report['mode']}; "
        f"offline shards would hold {report['offline_shard_bytes'] / 2**20:.2f} MiB){cache}; fetched "
        f"{report['fetched']}, cache hits {report['cache_hits']}, skipped {report['skipped']} (bad states), "
        f"retries {report['retries']}"
    )
