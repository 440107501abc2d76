"""`VocabArguments`: every flag of `python -m speculators_hf.vocab`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils import UserError


@dataclass
class VocabArguments:
    """Build the draft vocabulary from datagen's token frequencies: the `--draft-vocab-size` most frequent loss-masked
    tokens, written as d2t.npy / t2d.npy.

    Example: python -m speculators_hf.vocab --token-freq-path out/token_freq.pt --draft-vocab-size 32000
    --target-model-path meta-llama/Llama-3.1-8B-Instruct --output-path out"""

    token_freq_path: str = field(metadata={"help": "token_freq.pt written by datagen (counts of loss-masked tokens)."})
    draft_vocab_size: int = field(default=32000, metadata={"help": "Draft vocabulary size Vd (at least 1)."})
    target_vocab_size: int | None = field(
        default=None, metadata={"help": "Verifier vocabulary size V (or give --target-model-path)."}
    )
    target_model_path: str | None = field(
        default=None, metadata={"help": "Verifier id or folder; its config gives V and is checked against the data."}
    )
    output_path: str = field(default=".", metadata={"help": "Folder for d2t.npy and t2d.npy."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow the verifier's own config code (`auto_map`) to run when its config is loaded."},
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Start over: delete the d2t.npy / t2d.npy an earlier vocab run wrote in --output-path (only "
            "those) and rebuild them. Without it the same inputs again do nothing and other inputs are refused."
        },
    )

    def __post_init__(self):
        if self.target_vocab_size is None and self.target_model_path is None:
            raise UserError("Give --target-vocab-size N or --target-model-path M (the verifier's vocabulary size).")
        if self.draft_vocab_size < 1:
            raise UserError(f"--draft-vocab-size must be at least 1, got {self.draft_vocab_size}.")
        if self.target_vocab_size is not None and self.target_vocab_size < 1:
            raise UserError(f"--target-vocab-size must be at least 1, got {self.target_vocab_size}.")
        if self.target_vocab_size is not None and self.draft_vocab_size > self.target_vocab_size:
            raise UserError(
                f"--draft-vocab-size {self.draft_vocab_size} is larger than the target vocabulary "
                f"({self.target_vocab_size})."
            )
