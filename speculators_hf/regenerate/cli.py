"""`python -m speculators_hf.regenerate` == `speculators-hf regenerate`: flags in `RegenerateArguments`."""

from __future__ import annotations

from ..commandline import run_command
from .arguments import RegenerateArguments
from .runner import run, run_replica

PROG = "python -m speculators_hf.regenerate"


def _run(args: RegenerateArguments) -> None:
    if args.world_size > 1:  # a worker process started by --data-parallel-size
        run_replica(args)
    else:
        run(args)


def main(argv: list[str] | None = None) -> int:
    return run_command(RegenerateArguments, _run, argv, prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
