"""`python -m speculators_hf.datagen` == `speculators-hf datagen`: flags in `DatagenArguments`."""

from __future__ import annotations

from .arguments import DatagenArguments

PROG = "python -m speculators_hf.datagen"


def main(argv: list[str] | None = None) -> int:
    from ..cli.parser import run_command

    def run(args: DatagenArguments) -> None:
        from .builder import build_dataset

        build_dataset(args)

    return run_command(DatagenArguments, run, argv, prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
