"""`python -m speculators_hf.regenerate` == `speculators-hf regenerate`: flags in `RegenerateArguments`."""

from __future__ import annotations

from .arguments import RegenerateArguments

PROG = "python -m speculators_hf.regenerate"


def main(argv: list[str] | None = None) -> int:
    from ..cli.parser import run_command

    def run(args: RegenerateArguments) -> None:
        from .runner import regenerate

        regenerate(args)

    return run_command(RegenerateArguments, run, argv, prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
