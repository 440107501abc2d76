"""Stage 5: acceptance of a draft against its verifier, online (transformers and vLLM) and offline (held-out shards).

Every tau comes with what moves it: engine and version, K, temperature (0: greedy), chain drafting, dataset and
hardware. The command is in `cli.py` (`speculators-hf evaluate`); `--grid` (`grid.py`) measures K x temperature x
concurrent requests on vLLM and recommends a K.
"""

from .card import build_eval_card, eval_table, render_eval_card, write_eval_card
from .cli import EvaluateArguments, evaluate, evaluate_offline, evaluate_vllm, load_prompts, main
from .online import (
    SpecDecodeResult,
    SpeculativeGenerator,
    evaluate_transformers,
    greedy_baseline,
    speculative_sample,
    verifier_baseline,
)

__all__ = [
    "EvaluateArguments",
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
    "speculative_sample",
    "verifier_baseline",
    "write_eval_card",
]
