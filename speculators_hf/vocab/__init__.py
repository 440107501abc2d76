"""Stage 2: token frequencies -> a draft vocabulary (`d2t.npy`, `t2d.npy`), and the mapping's readers and checks that
the draft model and export use.

`run(VocabArguments(...)) -> VocabResult`; `python -m speculators_hf.vocab` parses the same flags and calls it.
"""

from .arguments import VocabArguments
from .mapping import (
    D2T_FILE,
    T2D_FILE,
    build_vocab_mapping,
    load_token_freq,
    load_vocab_mapping,
    save_vocab_mapping,
    validate_vocab_mapping,
)
from .runner import VocabResult, run

__all__ = [
    "D2T_FILE",
    "T2D_FILE",
    "VocabArguments",
    "VocabResult",
    "build_vocab_mapping",
    "load_token_freq",
    "load_vocab_mapping",
    "run",
    "save_vocab_mapping",
    "validate_vocab_mapping",
]
