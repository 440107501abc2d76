"""`speculators-hf push` (== `python -m speculators_hf.hub`): parse the flags, run, print how to serve the draft."""

from __future__ import annotations

from ..commandline import run_command
from .arguments import PushArguments
from .card import serve_commands
from .runner import PushResult, run


def _run_and_report(args: PushArguments) -> PushResult:
    result = run(args)
    print(f"staged (not uploaded): {result.local_dir}" if args.local_dir else f"uploaded: {result.url}")
    commands, note = serve_commands(args.checkpoint, args.repo_id)
    print("Serve it:\n  " + "\n  ".join(commands) + f"\n{note}")
    return result


def main(argv: list[str] | None = None) -> int:
    return run_command(PushArguments, _run_and_report, argv, prog="speculators-hf push")
