"""Stage 1: chat data -> tokens + assistant-only loss masks -> verifier hidden states -> memory-mapped shards.

`run(DatagenArguments(...)) -> DatagenResult`; `python -m speculators_hf.datagen` parses the same flags and calls it.
The shard format itself (names, reader, fp8 scaling) is `speculators_hf.formats.shards`.
"""

from ..formats.shards import ShardDataset, read_index, write_shard
from .arguments import DatagenArguments
from .backends import HiddenStatesBackend, make_backend, resolve_layer_ids
from .builder import DatagenResult, build_dataset, run
from .hf_backend import HFHiddenStatesBackend
from .plan import prepare
from .sources import load_source, normalize_messages
from .tokenize import tokenize_conversation, tokenize_dataset

__all__ = [
    "DatagenArguments",
    "DatagenResult",
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
    "run",
    "tokenize_conversation",
    "tokenize_dataset",
    "write_shard",
]
