"""Stage 5: acceptance of a draft against its verifier, online (transformers and vLLM) and offline (held-out shards).

Every tau comes with what moves it: engine and version, K, temperature (0: greedy), drafting (chain or parallel),
dataset and hardware. `run(EvaluateArguments) -> EvaluateResult` is the stage (`stage.py`); the command is
`speculators-hf evaluate` (`cli.py`); `--grid` (`grid.py`, plots in `plots.py`) measures K x temperature x concurrent
requests on vLLM (x drafting mode and draft_sample_method where they can differ) and recommends how to serve.
"""

from .arguments import EvaluateArguments
from .card import build_eval_card, eval_table, render_eval_card, write_eval_card
from .cli import evaluate, main
from .online import (
    SpecDecodeResult,
    SpeculativeGenerator,
    evaluate_transformers,
    greedy_baseline,
    speculative_sample,
    verifier_baseline,
)
from .prompts import load_prompts
from .stage import EvalRow, EvaluateResult, evaluate_offline, run
from .vllm_engine import evaluate_vllm

__all__ = [
    "EvalRow",
    "EvaluateArguments",
    "EvaluateResult",
    "SpecDecodeResult",
    "SpeculativeGenerator",
    "build_eval_card",
    "eval_table",
    "evaluate",
    "evaluate_offline",
    "evaluate_transformers",
    "evaluate_vllm",
    "greedy_baseline",
    "load_prompts",
    "main",
    "render_eval_card",
    "run",
    "speculative_sample",
    "verifier_baseline",
    "write_eval_card",
]
