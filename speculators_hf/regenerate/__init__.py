"""Stage 0 (optional): regenerate the assistant turns of chat data with the verifier (on-policy training data).

`run(RegenerateArguments(...)) -> RegenerateResult`; `python -m speculators_hf.regenerate` parses the same flags."""

from .arguments import RegenerateArguments
from .engines import make_engine
from .generation import Engine, Generation, GenerationRequest
from .plan import prepare
from .result import RegenerateResult
from .runner import run, run_replica

__all__ = [
    "Engine",
    "Generation",
    "GenerationRequest",
    "RegenerateArguments",
    "RegenerateResult",
    "make_engine",
    "prepare",
    "run",
    "run_replica",
]
