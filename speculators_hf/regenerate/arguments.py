"""`RegenerateArguments`: every flag of `python -m speculators_hf.regenerate` (also what `regenerate_config.json`
records)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..utils import UserError

BACKENDS = ("auto", "vllm", "transformers")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TURNS = ("all", "last")
REASONING = ("keep", "strip", "disable")
AFTER_TRUNCATION = ("end", "next-turn")
# The range of every numeric flag: (flag, lower bound, whether the bound itself is allowed); None = the default.
# Float flags must also be finite (a NaN passes every comparison).
RANGES = (
    *((flag, 1, True) for flag in ("concurrency", "tensor_parallel_size", "data_parallel_size", "max_new_tokens")),
    *((flag, 1, True) for flag in ("max_model_len", "max_samples", "max_turns", "batch_size", "chunk_size")),
    ("world_size", 1, True),
    *((flag, 0, True) for flag in ("top_k", "max_retries", "seed", "rank")),
    ("temperature", 0.0, True),
    ("request_timeout", 0.0, False),
    ("retry_backoff", 0.0, True),
)


@dataclass
class RegenerateArguments:
    """Regenerate the assistant turns of chat data with the verifier itself (on-policy training data for the draft).

    Every user turn is answered in order by the verifier given the *regenerated* conversation so far (system turns
    kept, the source's assistant turns dropped); `--turns last` regenerates only the final assistant turn given the
    source history. Prompts are rendered once, here, with the verifier's chat template and sent as token ids, so every
    engine (transformers, vLLM in-process, `vllm serve`) sees identical prompts. The output is a chat file that
    `python -m speculators_hf.datagen --train-data-path` reads as it is.

    Example: python -m speculators_hf.regenerate --target-model-path meta-llama/Llama-3.1-8B-Instruct
    --train-data-path sharegpt --output-path data/sharegpt-regen.jsonl --max-samples 50000 --backend vllm"""

    target_model_path: str = field(metadata={"help": "The verifier: a Hugging Face model id or a local folder."})
    train_data_path: str = field(
        metadata={
            "help": "Chats to regenerate: `sharegpt` or `ultrachat`, any Hugging Face dataset id, a local "
            ".json/.jsonl file, or a `save_to_disk` folder (the sources datagen reads)."
        }
    )
    output_path: str = field(
        metadata={
            "help": "Where to write: a .jsonl file, or a folder (written with `datasets.save_to_disk`). "
            "`<name>.regenerate_config.json` and `<name>.failures.jsonl` go next to a file; inside a folder."
        }
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "`vllm` (in-process, continuous batching), `transformers` (any model, CPU or GPU, batched "
            "generate), `auto` (vLLM if installed). Ignored with --server-url."
        },
    )
    server_url: list[str] | None = field(
        default=None,
        metadata={
            "help": "Base URLs of running OpenAI-compatible vLLM servers (`vllm serve VERIFIER`), used round-robin; "
            "e.g. http://host:8000. Requests send token-id prompts to /v1/completions."
        },
    )
    server_api_key: str | None = field(
        default=None,
        metadata={
            "help": "The --server-url servers' `vllm serve --api-key` (sent as `Authorization: Bearer`). Default: "
            "$SPECULATORS_HF_API_KEY, which keeps it off the command line and out of the run's records."
        },
    )
    concurrency: int = field(default=64, metadata={"help": "Requests in flight at once, over all --server-url."})
    request_timeout: float = field(default=600.0, metadata={"help": "Seconds before a server request times out."})
    max_retries: int = field(
        default=5,
        metadata={
            "help": "Retries of a server request after a timeout, a refused connection or HTTP 408/409/425/429/5xx."
        },
    )
    retry_backoff: float = field(
        default=1.0, metadata={"help": "First retry delay in seconds; doubles on every retry (at most 60 s)."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per vLLM replica (tensor parallel)."})
    data_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Replicas on this machine (in-process engines): this many worker processes, each with "
            "--tensor-parallel-size GPUs of its own, split the conversations between them."
        },
    )
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "Fraction of GPU memory vLLM may use."})
    dtype: str = field(default="auto", metadata={"help": "Verifier dtype (auto: the checkpoint's)."})
    revision: str | None = field(default=None, metadata={"help": "Verifier revision (branch, tag or commit)."})
    temperature: float | None = field(
        default=None,
        metadata={"help": "Sampling temperature; 0 is greedy. Default: the verifier's generation_config."},
    )
    top_p: float | None = field(default=None, metadata={"help": "Top-p (default: the verifier's generation_config)."})
    top_k: int | None = field(
        default=None, metadata={"help": "Top-k, 0 = off (default: the verifier's generation_config)."}
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed for --shuffle and sampling (each request's seed derives from it and the chat id)."},
    )
    max_new_tokens: int = field(
        default=2048, metadata={"help": "New tokens per assistant turn; a turn cut there counts as truncated."}
    )
    max_model_len: int | None = field(
        default=None,
        metadata={
            "help": "Longest conversation in tokens (prompt + answer); a turn cut there counts as truncated and a "
            "conversation stops when it is full. Default: the verifier's context length (a server's max_model_len)."
        },
    )
    max_samples: int | None = field(default=None, metadata={"help": "Regenerate at most this many chats."})
    shuffle: bool = field(default=False, metadata={"help": "Shuffle the chats with --seed before --max-samples."})
    max_turns: int | None = field(default=None, metadata={"help": "At most this many assistant turns a chat."})
    turns: str = field(
        default="all",
        metadata={
            "help": "`all`: answer every user turn in order given the regenerated prefix (multi-turn rollout); "
            "`last`: only the final assistant turn, given the source history."
        },
    )
    reasoning: str = field(
        default="keep",
        metadata={
            "help": "Reasoning models (`<think>...</think>`): `keep` the reasoning in the trained turn and strip it "
            "from the history later turns see (as at inference); `strip` it from both; `disable` thinking in the "
            "chat template (enable_thinking=False)."
        },
    )
    after_truncation: str = field(
        default="next-turn",
        metadata={
            "help": "After a turn cut at --max-new-tokens (kept, marked `finish_reason: length`; datagen trains its "
            "tokens but no end-of-turn token after it): go on to the `next-turn` (the cut answer stays in the "
            "history; default: τ +0.40 over `end` with a quarter of the turns cut, 3 seeds) or `end` the "
            "conversation there. A turn cut because the context is full always ends it."
        },
    )
    drop_truncated: bool = field(
        default=False,
        metadata={"help": "Drop a turn cut at --max-new-tokens and end the conversation there."},
    )
    batch_size: int = field(default=32, metadata={"help": "Prompts per `generate` call (transformers backend)."})
    chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Chats rolled out together by an in-process engine (all their turns at one depth form one batch); "
            "finished chats are saved as they finish."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "A Jinja chat template (or a file holding one) to use instead of the tokenizer's."},
    )
    split: str = field(default="train", metadata={"help": "Dataset split to read."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache for downloaded datasets."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run Python code from the verifier's folder (its config's `auto_map`) to load it. Only for a "
            "verifier whose code you trust; without it such a verifier is refused in one line."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Start over: delete what an earlier regenerate run into this --output-path wrote (only the files "
            "it recorded, never others) and regenerate everything. Without it an unfinished run resumes, a finished "
            "one is skipped and one with other flags or inputs is refused."
        },
    )
    rank: int = field(default=0, metadata={"help": "Internal (--data-parallel-size): this replica's index."})
    world_size: int = field(default=1, metadata={"help": "Internal (--data-parallel-size): number of replicas."})

    def __post_init__(self):
        for flag, choices in (
            ("backend", BACKENDS),
            ("dtype", DTYPES),
            ("turns", TURNS),
            ("reasoning", REASONING),
            ("after_truncation", AFTER_TRUNCATION),
        ):
            if getattr(self, flag) not in choices:
                raise UserError(f"--{_flag(flag)} {getattr(self, flag)!r}: choose one of {', '.join(choices)}.")
        suffix = Path(self.output_path).suffix
        if suffix and suffix != ".jsonl":
            raise UserError(f"--output-path {self.output_path}: write a .jsonl file or a folder (save_to_disk).")
        for flag, low, closed in RANGES:
            value = getattr(self, flag)
            if value is not None and not (math.isfinite(value) and (value >= low if closed else value > low)):
                bound = f"at least {low}" if closed else f"above {low}"
                raise UserError(f"--{_flag(flag)} must be {bound}{' (finite)' * isinstance(low, float)}, got {value}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:  # (a NaN fails this too)
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}.")
        if not 0 < self.gpu_memory_utilization <= 1:  # (a NaN fails this too)
            raise UserError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.rank >= self.world_size:
            raise UserError(f"--rank {self.rank} must be in [0, --world-size {self.world_size}).")
        if self.server_url is not None:
            self.server_url = [u.rstrip("/") for u in self.server_url] or None
        if self.server_url and self.data_parallel_size > 1:
            raise UserError("--data-parallel-size is for in-process engines; with --server-url add URLs instead.")


def _flag(name: str) -> str:
    return name.replace("_", "-")
