"""`speculators-hf evaluate` == `python -m speculators_hf.evaluation`: acceptance of a draft against its verifier.

    speculators-hf evaluate --draft out/checkpoint --verifier meta-llama/Llama-3.1-8B-Instruct \\
        --prompts chat.jsonl --engine both --num-speculative-tokens 3 --max-new-tokens 64 --num-prompts 16
    speculators-hf evaluate --draft out/draft --grid --k 1 2 3 4 5 6 7 --temperature 0 1 --batch-size 1 4 16 64

Prints a table and writes `eval_card.json` / `eval_card.md` next to the draft; `--grid` adds the vLLM serving grid,
its recommendation and plots (`grid.py`, `plots.py`). The stage itself is `stage.run`.
"""

from __future__ import annotations

from ..commandline import run_command
from ..validation import read_json
from .arguments import EvaluateArguments
from .stage import run


def evaluate(args: EvaluateArguments) -> dict:
    """The evaluation as the pipeline calls it today (in folders it owns: an earlier evaluation with other inputs is
    replaced); returns the eval card."""
    return read_json(run(args, replace_stale=True).card)


def main(argv: list[str] | None = None) -> int:
    return run_command(EvaluateArguments, run, argv, prog="speculators-hf evaluate")


if __name__ == "__main__":
    raise SystemExit(main())
