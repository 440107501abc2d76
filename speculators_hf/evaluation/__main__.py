"""`python -m speculators_hf.evaluation`: parse the flags (`EvaluateArguments`), then `run`."""

from .cli import main

raise SystemExit(main())
