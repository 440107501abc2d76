"""`DatagenArguments`: every flag of `python -m speculators_hf.datagen` (also what `data_config.json` records)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..formats.shards import STORAGE_DTYPES
from ..utils import UserError

BACKENDS = ("auto", "vllm", "transformers")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Output layouts: 2 = safetensors shards of many samples (ours), 1 = the seed's `data_{idx}.pt` per sample.
DATA_FORMAT_VERSIONS = (1, 2)


@dataclass
class DatagenArguments:
    """Generate EAGLE-3 training data: tokenize chats with the verifier's chat template (loss mask = assistant tokens),
    run the verifier once over every sample, and store its hidden states at the auxiliary layers and the last layer
    (pre-norm) as memory-mappable shards, with data_config.json and token_freq.pt next to them.

    Example: python -m speculators_hf.datagen --target-model-path meta-llama/Llama-3.1-8B-Instruct
    --train-data-path sharegpt --output-dir data/llama8b --max-samples 5000"""

    target_model_path: str = field(metadata={"help": "The verifier: a Hugging Face model id or a local folder."})
    train_data_path: str = field(
        metadata={
            "help": "Chats to train on: `sharegpt` or `ultrachat` (their public datasets), any Hugging Face dataset "
            "id, a local .json/.jsonl file, or a folder written by `datasets.save_to_disk`. Rows need `messages` "
            "(role/content) or `conversations` (from/value, ShareGPT)."
        }
    )
    output_dir: str = field(metadata={"help": "Folder for the shards, index.json, data_config.json, token_freq.pt."})
    seq_length: int = field(default=2048, metadata={"help": "Truncate every tokenized chat to this many tokens."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache for downloaded and tokenized datasets (default: the HF datasets cache)."},
    )
    layer_ids: list[int] | None = field(
        default=None,
        metadata={
            "help": "Verifier layers to store, in vLLM's convention (id i = input to decoder layer i; id n = output "
            "of the last layer before the final norm). The last id must be n. Default: [2, n//2, n-3, n]."
        },
    )
    backend: str = field(
        default="auto",
        metadata={"help": "`vllm` (production), `transformers` (any model, CPU or GPU), `auto` (vLLM if installed)."},
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per vLLM replica (tensor parallel)."})
    data_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Replicas on this machine: datagen starts this many worker processes, each with "
            "--tensor-parallel-size GPUs of its own, and splits the shards between them."
        },
    )
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "Fraction of GPU memory vLLM may use."})
    batch_size: int = field(default=16, metadata={"help": "Samples sent to the backend at once."})
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many chats (after shuffling)."})
    shuffle: bool = field(default=False, metadata={"help": "Shuffle the chats with --seed before --max-samples."})
    seed: int = field(default=0, metadata={"help": "Seed for --shuffle and for vLLM."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Verifier dtype, also the stored hidden states' unless --storage-dtype (auto: the verifier's)."
        },
    )
    storage_dtype: str = field(
        default="auto",
        metadata={
            "help": "How hidden states are stored: auto (= --dtype), float32, bfloat16, float16, or fp8_e4m3 (float8 "
            "with one scale per token and layer: about half the bytes of bfloat16, relative error <= 2^-4; "
            "training dequantizes on its device). Needs --data-format-version 2."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "A Jinja chat template (or a file holding one) to use instead of the tokenizer's."},
    )
    split: str = field(default="train", metadata={"help": "Dataset split to read."})
    token_freq_path: str | None = field(
        default=None, metadata={"help": "Where to write token_freq.pt (default: <output-dir>/token_freq.pt)."}
    )
    data_format_version: int = field(
        default=2,
        metadata={"help": "2: safetensors shards of many samples (default); 1: the seed's data_{idx}.pt per sample."},
    )
    shard_size_mb: int = field(default=1024, metadata={"help": "Approximate size of one shard on disk (MB)."})
    num_proc: int = field(
        default=1,
        metadata={
            "help": "Processes that tokenize the chats (`datasets.map(num_proc=...)`; same result, cached once per "
            "value): ~0.5-5 ms per chat on one core, so use 8-16 from a few hundred thousand chats."
        },
    )
    tokens_only: bool = field(
        default=False,
        metadata={
            "help": "Write tokens, loss masks, token_freq.pt and data_config.json without hidden states (no verifier "
            "run): training fetches the states from `speculators-hf serve-hidden-states` servers "
            "(--hidden-states-source online|hybrid). data_config.json records the layer ids the servers must capture."
        },
    )
    rank: int = field(default=0, metadata={"help": "This machine's part when several machines share the work."})
    world_size: int = field(default=1, metadata={"help": "How many machines share the work (same --output-dir)."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow the verifier's own code (its config's `auto_map` .py files) to run when its config, "
            "tokenizer or model is loaded. Without it such a verifier is refused (nothing is asked on stdin)."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Start over: delete what an earlier datagen run recorded in --output-dir (only those files) and "
            "rerun. Without it a run resumes, and a folder written with other flags is refused. With --rank/"
            "--world-size give it to rank 0: the other ranks wait for rank 0 to replace a run with other flags."
        },
    )

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UserError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}.")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}.")
        if self.data_format_version not in DATA_FORMAT_VERSIONS:
            raise UserError(f"--data-format-version {self.data_format_version}: use 2 (shards) or 1 (.pt files).")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise UserError(f"--storage-dtype {self.storage_dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}.")
        if self.storage_dtype == "fp8_e4m3" and self.data_format_version != 2:
            raise UserError(
                "--storage-dtype fp8_e4m3 needs --data-format-version 2 (the v1 .pt layout has no scales)."
            )
        if self.tokens_only and self.data_format_version != 2:
            raise UserError("--tokens-only writes shards (--data-format-version 2); .pt files need states.")
        for flag in (
            "seq_length",
            "batch_size",
            "tensor_parallel_size",
            "data_parallel_size",
            "world_size",
            "shard_size_mb",
        ):
            if getattr(self, flag) < 1:
                raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(self, flag)}.")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"--max-samples must be at least 1, got {self.max_samples} (leave it out to use all).")
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"--rank {self.rank} must be in [0, --world-size {self.world_size}).")
        if not 0 < self.gpu_memory_utilization <= 1:  # NaN fails too
            raise UserError(f"--gpu-memory-utilization {self.gpu_memory_utilization} must be in (0, 1].")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed {self.seed} must be in [0, 2^32) (what the shuffle and vLLM take).")
        if self.layer_ids is not None and any(i < 0 for i in self.layer_ids):
            raise UserError(f"--layer-ids {self.layer_ids}: ids are 0 (embeddings) or more.")
        if not self.split:
            raise UserError("--split is empty: give the dataset split to read (e.g. train).")
