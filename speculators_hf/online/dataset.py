"""Training samples whose hidden states come from `serve-hidden-states` servers instead of datagen shards.

`OnlineHiddenStatesDataset` reads tokens and loss masks from a datagen folder (`--tokens-only`, or full shards whose
states it ignores) and fetches each sample's states when the sample is loaded: in the DataLoader workers, ahead of the
training step (`dataloader_num_workers` x `dataloader_prefetch_factor` batches), at most `max_in_flight` requests per
training process. Each process fetches only the samples its own batches hold (DDP/FSDP shard the batches).

    online   states are read into memory and their files deleted at once: every epoch fetches again, and at most
             the requests in flight are on disk.
    hybrid   the first time a sample is fetched its states are written to a cache in datagen's shard format
             (`cache.py`); later epochs and restarts read the cache.

A sample whose states stay unusable (NaN/inf, unreadable) after a retry is replaced by a zero-loss placeholder (same
tokens, loss mask 0, zero states) so that batch shapes and DDP step counts do not change; it is counted as skipped.
Each sample carries `fetch_stats` (`FETCH_STATS_COLUMNS`), which the collator and the trainer turn into metrics.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..formats.shards import ShardDataset
from ..training.data import PackedDataset
from ..utils import get_logger, write_json
from ..validation import read_json_if_exists
from .cache import HiddenStatesCache
from .client import HiddenStatesClient

logger = get_logger(__name__)

# Per-sample statistics, summed over a logging interval (`spool_bytes` is a peak: max, not sum).
FETCH_STATS_COLUMNS = ("fetched", "cache_hits", "skipped", "fetch_seconds", "retries", "spool_bytes")
HIDDEN_STATES_REPORT = "hidden_states_report.json"  # written into --save-path at the end of an online/hybrid run


class OnlineHiddenStatesDataset(torch.utils.data.Dataset):
    """`dataset[i]` = `{"input_ids" [T], "loss_mask" [T], "hidden_states" [T, L, H], "fetch_stats" [6]}`.

    Args:
        tokens (`ShardDataset`): the samples' tokens (read with `tokens_only=True`).
        servers (`list[str]`): server URLs, used round-robin.
        layer_ids (`list[int]`): the ids the data needs (aux ids then the last layer), checked against the servers.
        hidden_size (`int`): the verifier's hidden size.
        max_in_flight (`int`): requests in flight per training process (split over its DataLoader workers).
        num_workers (`int`): the DataLoader workers that will share `max_in_flight`.
        timeout (`float`): seconds without any server answering before training stops with one line.
        cache_dir (`str`, *optional*): hybrid mode's cache folder (None: online mode, nothing kept).
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
        self.cache = HiddenStatesCache(cache_dir, cache_meta or {}) if cache_dir is not None else None
        self.mode = "hybrid" if self.cache is not None else "online"
        self._pid: int | None = None

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
        out = []
        dtype = next((s.dtype for s in states if s is not None), torch.float32)
        for j, sample in enumerate(samples):
            if states[j] is None:  # skipped: a zero-loss placeholder keeps shapes and step counts unchanged
                T = len(sample["input_ids"])
                sample = {**sample, "loss_mask": torch.zeros_like(sample["loss_mask"])}
                states[j] = torch.zeros(T, *self.hidden_shape, dtype=dtype)
            out.append({**sample, "hidden_states": states[j], "fetch_stats": stats[j]})
        return out


class OnlinePackedDataset(PackedDataset):
    """`PackedDataset` whose groups are fetched together: one pack's (or one batch's) samples in flight at once."""

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        return self.dataset.get_many(self.packs[i])

    def __getitems__(self, pack_indices: list[int]) -> list[list[dict[str, torch.Tensor]]]:
        flat = [j for i in pack_indices for j in self.packs[i]]
        samples = iter(self.dataset.get_many(flat))
        return [[next(samples) for _ in self.packs[i]] for i in pack_indices]


def open_online_dataset(data_path: str | Path, version: int, model_args, args) -> OnlineHiddenStatesDataset:
    """The online/hybrid dataset for `speculators-hf train --hidden-states-source online|hybrid` (checked first).

    Reads and checks the local files (shards, data_config.json, a hybrid cache) before it waits (up to
    `--hidden-states-timeout`) until a server answers, and gives the DataLoader 2 persistent workers when none were
    asked for, so fetching runs ahead of the training step.
    """
    from ..training.data import SHARDS_DATA_FORMAT, data_layer_ids
    from ..utils import UserError
    from ..validation import pretrained_config

    path = Path(data_path)
    if version != SHARDS_DATA_FORMAT:
        raise UserError(f"--hidden-states-source {model_args.hidden_states_source} reads datagen shards (format 2).")
    layer_ids = data_layer_ids(path, version)
    if not layer_ids:
        raise UserError(f"--data-path {path} records no layer ids (data_config.json): rerun datagen --tokens-only.")
    verifier = pretrained_config(model_args.verifier_name_or_path, "--verifier-name-or-path")
    hidden_size = verifier.get_text_config().hidden_size
    tokens = ShardDataset(path, tokens_only=True)
    cache_dir, meta = None, None
    if model_args.hidden_states_source == "hybrid":
        cache_dir = model_args.hidden_states_cache_dir or str(Path(args.output_dir) / "hidden_states_cache")
        fingerprint = None
        for name in ("data_config.json", "index.json"):
            record = read_json_if_exists(path / name, fix="rerun datagen with the same flags")
            if record is not None:
                fingerprint = record.get("fingerprint")
                break
        meta = {"data_fingerprint": fingerprint, "layer_ids": layer_ids, "hidden_size": hidden_size}
    if args.dataloader_num_workers == 0:
        args.dataloader_num_workers, args.dataloader_persistent_workers = 2, True
        logger.warning("online hidden states: 2 persistent DataLoader workers fetch ahead of the training step.")
    dataset = OnlineHiddenStatesDataset(
        tokens,
        model_args.hidden_states_servers,
        layer_ids,
        hidden_size,
        max_in_flight=model_args.hidden_states_max_in_flight,
        num_workers=args.dataloader_num_workers,
        timeout=model_args.hidden_states_timeout,
        cache_dir=cache_dir,
        cache_meta=meta,
        rank=args.process_index,
        api_key=model_args.hidden_states_api_key,
    )
    servers, key = model_args.hidden_states_servers, model_args.hidden_states_api_key
    HiddenStatesClient(servers, timeout=model_args.hidden_states_timeout, api_key=key).wait_for_servers()
    return dataset


def report_hidden_states(trainer, dataset: OnlineHiddenStatesDataset) -> dict | None:
    """After training: the peak bytes of hidden states on disk, what fetching cost, and the offline shards' size.

    Every process calls it (the statistics are summed across processes); the main process prints and logs it.
    """
    totals = trainer.fetch_totals()
    if totals is None:
        return None
    L, H = dataset.hidden_shape
    config = read_json_if_exists(dataset.tokens.data_dir / "data_config.json") or {}  # checked when training began
    dtype = config.get("model", {}).get("hidden_states_dtype") or "float32"
    itemsize = torch.finfo(getattr(torch, dtype)).bits // 8  # what datagen's shards of the same samples would use
    report = {
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
    if trainer.is_world_process_zero():
        cache = (
            f"; hybrid cache {report['cache_bytes'] / 2**20:.2f} MiB in {dataset.cache.folder}"
            if dataset.cache is not None
            else ""
        )
        print(
            f"hidden states on disk: peak {report['disk_peak_bytes'] / 2**20:.2f} MiB in flight ({dataset.mode}; "
            f"offline shards would hold {report['offline_shard_bytes'] / 2**20:.2f} MiB){cache}; fetched "
            f"{report['fetched']}, cache hits {report['cache_hits']}, skipped {report['skipped']} (bad states), "
            f"retries {report['retries']}",
            flush=True,
        )
        write_json(Path(trainer.args.output_dir) / HIDDEN_STATES_REPORT, report)
    return report
