"""Stage 1: chat data -> tokens + assistant-only loss masks -> verifier hidden states -> memory-mapped shards."""

from .arguments import DatagenArguments
from .backends import HiddenStatesBackend, make_backend, resolve_layer_ids
from .builder import build_dataset, prepare
from .hf_backend import HFHiddenStatesBackend
from .shards import ShardDataset, read_index, write_shard
from .sources import load_source, normalize_messages
from .tokenize import tokenize_conversation, tokenize_dataset

__all__ = [
    "DatagenArguments",
    "HFHiddenStatesBackend",
    "HiddenStatesBackend",
    "ShardDataset",
    "build_dataset",
    "load_source",
    "make_backend",
    "normalize_messages",
    "prepare",
    "read_index",
    "resolve_layer_ids",
    "tokenize_conversation",
    "tokenize_dataset",
    "write_shard",
]
