"""`speculators-hf datagen` == `python -m speculators_hf.datagen`: flags in `DatagenArguments`, work in `run`."""

from __future__ import annotations

from ..commandline import run_command
from .arguments import DatagenArguments
from .builder import run

PROG = "python -m speculators_hf.datagen"


def main(argv: list[str] | None = None) -> int:
    return run_command(DatagenArguments, run, argv, prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
