"""`speculators-hf export` (== `python -m speculators_hf.export`): parse the flags, run, print what vLLM will serve."""

from __future__ import annotations

from ..commandline import run_command
from .arguments import ExportArguments
from .runner import ExportResult, run


def _run_and_report(args: ExportArguments) -> ExportResult:
    result = run(args)
    print(
        f"OK {result.output_dir}: vLLM-servable EAGLE-3 draft for {result.verifier}"
        f" (draft vocab {result.draft_vocab_size}, aux ids {result.aux_layer_ids})"
    )
    for w in result.warnings:
        print(f"warning: {w}")
    return result


def main(argv: list[str] | None = None) -> int:
    return run_command(ExportArguments, _run_and_report, argv, prog="speculators-hf export")
