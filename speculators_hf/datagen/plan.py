"""`prepare`: everything datagen does before the verifier runs (validate inputs, tokenize, plan the shards), writing
nothing. The plan is deterministic: shard `k` always holds the same samples, so a killed run resumes to the same files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..formats.chat_template import read_chat_template
from ..formats.shards import INDEX_FILE, SHARD_SCHEMA_VERSION, shard_name
from ..modeling.verifier_weights import check_verifier_weights
from ..utils import UserError
from ..validation import pretrained_tokenizer
from .arguments import DatagenArguments
from .backends import resolve_backend_name, resolve_layer_ids
from .metadata import load_verifier_config, resolve_dtype, resolve_storage_dtype, storage_bytes_per_value
from .sources import load_source
from .tokenize import tokenize_dataset

DATA_CONFIG = "data_config.json"
TOKEN_FREQ = "token_freq.pt"
TOKENS_ONLY_BACKEND = "none"  # --tokens-only: no verifier runs; the states come from servers while training
# Flags that do not change the data, so a run may resume with other values.
NOT_FINGERPRINTED = (
    "output_dir",
    "cache_dir",
    "token_freq_path",
    "rank",
    "world_size",
    "data_parallel_size",
    "gpu_memory_utilization",
    "overwrite",
    "trust_remote_code",  # consent to run the verifier's code: the data are the same either way
    "num_proc",
)


@dataclass
class Plan:
    args: DatagenArguments
    verifier: dict
    layer_ids: list[int]
    dtype: str
    backend: str
    tokenized: object  # datasets.Dataset, one row per input chat
    token_stats: dict
    shards: list[list[int]]  # sample ids (rows of `tokenized`) per shard
    lengths: dict[int, int]
    fingerprint: str
    storage_dtype: str | None = None  # how hidden states are stored (`--storage-dtype` resolved; None: as `dtype`)
    inputs: dict | None = None  # what the fingerprint covers, by name (the run-state manifest records it)
    _shard_tokens: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def token_freq(self) -> Path:
        """Where token_freq.pt goes (`--token-freq-path`, by default in `--output-dir`)."""
        return Path(self.args.token_freq_path) if self.args.token_freq_path else self.output_dir / TOKEN_FREQ

    @property
    def token_freq_inside(self) -> bool:
        return self.token_freq.parent.resolve() == self.output_dir.resolve()

    def shard_path(self, k: int) -> Path:
        return self.output_dir / shard_name(k)

    def v1_paths(self, k: int) -> list[Path]:
        first = sum(len(s) for s in self.shards[:k])
        return [self.output_dir / f"data_{first + j}.pt" for j in range(len(self.shards[k]))]

    def files(self, k: int) -> list[Path]:
        """The files shard `k` is written as (one safetensors shard, or one .pt file per sample in format 1)."""
        return self.v1_paths(k) if self.args.data_format_version == 1 else [self.shard_path(k)]

    def entries(self) -> list[str]:
        """Every name this run writes in `--output-dir` (token_freq.pt only when it goes there)."""
        names = [DATA_CONFIG] + ([INDEX_FILE] if self.args.data_format_version == 2 else [])
        if self.token_freq_inside:
            names.append(self.token_freq.name)
        return names + [p.name for k in range(len(self.shards)) for p in self.files(k)]

    def is_done(self, k: int) -> bool:
        return all(p.exists() for p in self.files(k))

    def shard_tokens(self, k: int) -> int:
        """Tokens of shard `k` (summed once: index.json is rewritten after every shard)."""
        if k not in self._shard_tokens:
            self._shard_tokens[k] = sum(self.lengths[i] for i in self.shards[k])
        return self._shard_tokens[k]

    def index_entry(self, k: int) -> dict:
        ids = self.shards[k]
        return {
            "file": shard_name(k),
            "num_samples": len(ids),
            "num_tokens": self.shard_tokens(k),
            "first_sample_id": ids[0],
            "last_sample_id": ids[-1],
        }


def prepare(args: DatagenArguments) -> Plan:
    """Everything before the verifier runs: validate inputs, tokenize (cached), plan the shards. Writes nothing."""
    verifier = load_verifier_config(args.target_model_path, args.trust_remote_code)
    check_verifier_weights(args.target_model_path, "--target-model-path")
    layer_ids = resolve_layer_ids(args.layer_ids, verifier["num_hidden_layers"])
    dtype = resolve_dtype(args.dtype, verifier)
    storage_dtype = resolve_storage_dtype(args.storage_dtype, dtype)
    tokenizer = pretrained_tokenizer(
        args.target_model_path, "--target-model-path", trust_remote_code=args.trust_remote_code
    )
    chat_template = read_chat_template(args.chat_template)
    if chat_template is None and not tokenizer.chat_template:
        raise UserError(f"The tokenizer of {args.target_model_path} has no chat template: pass --chat-template.")

    raw = load_source(args.train_data_path, split=args.split, cache_dir=args.cache_dir)
    if args.shuffle:
        raw = raw.shuffle(seed=args.seed)
    if args.max_samples is not None and args.max_samples < len(raw):
        raw = raw.select(range(args.max_samples))
    tokenized, token_stats = tokenize_dataset(
        raw,
        tokenizer,
        args.seq_length,
        chat_template,
        args.cache_dir,
        source=f"--train-data-path {args.train_data_path}",
        num_proc=args.num_proc,
    )

    num_tokens = tokenized["num_tokens"][:]  # one read of the column: `column[i]` costs a table rebuild per row
    kept = [i for i, n in enumerate(num_tokens) if n > 0]
    lengths = {i: num_tokens[i] for i in kept}
    bytes_per_token = int(len(layer_ids) * verifier["hidden_size"] * storage_bytes_per_value(storage_dtype)) + 9
    if args.tokens_only:
        bytes_per_token = 9  # input_ids int64 + loss_mask uint8
    shards = _plan_shards(kept, lengths, args.shard_size_mb * 2**20 // bytes_per_token)
    backend = TOKENS_ONLY_BACKEND if args.tokens_only else resolve_backend_name(args.backend)
    fingerprinted = {k: v for k, v in asdict(args).items() if k not in NOT_FINGERPRINTED}
    fingerprinted.pop("storage_dtype", None)  # fingerprinted resolved (below): auto == the dtype it stands for
    storage = [storage_dtype] if storage_dtype != dtype else []  # fingerprints of plain runs stay as they were
    parts = [fingerprinted, token_stats["fingerprint"], verifier, layer_ids, dtype, backend, SHARD_SCHEMA_VERSION]
    fingerprint = hashlib.sha256(json.dumps([*parts, *storage], sort_keys=True, default=str).encode()).hexdigest()[:16]
    inputs = {
        "arguments": fingerprinted,
        "tokenized": token_stats["fingerprint"],
        "verifier": verifier,
        "layer_ids": layer_ids,
        "dtype": dtype,
        "storage_dtype": storage_dtype,
        "backend": backend,
        "shard_schema": SHARD_SCHEMA_VERSION,
        "data_fingerprint": fingerprint,  # data_config.json's "fingerprint" (training and online read that one)
    }
    return Plan(
        args,
        verifier,
        layer_ids,
        dtype,
        backend,
        tokenized,
        token_stats,
        shards,
        lengths,
        fingerprint,
        storage_dtype,
        inputs,
    )


def _plan_shards(kept: list[int], lengths: dict[int, int], max_tokens: int) -> list[list[int]]:
    shards, current, tokens = [], [], 0
    for i in kept:
        if current and tokens + lengths[i] > max_tokens:
            shards.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        shards.append(current)
    return shards


__all__ = ["DATA_CONFIG", "NOT_FINGERPRINTED", "TOKEN_FREQ", "TOKENS_ONLY_BACKEND", "Plan", "prepare"]
