"""`python -m speculators_hf.regenerate`: parse the flags, then `run`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
