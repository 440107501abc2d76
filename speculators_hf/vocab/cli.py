"""`speculators-hf vocab` == `python -m speculators_hf.vocab`: flags in `VocabArguments`, work in `run`."""

from __future__ import annotations

from ..commandline import run_command
from .arguments import VocabArguments
from .runner import run

PROG = "speculators-hf vocab"


def main(argv: list[str] | None = None) -> int:
    return run_command(VocabArguments, run, argv, prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
