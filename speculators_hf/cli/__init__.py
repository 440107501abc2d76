"""`speculators-hf <command>` (== `python -m speculators_hf <command>`): one console script for every stage."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "regenerate": ("speculators_hf.regenerate.cli", "Regenerate chat responses with the verifier (on-policy data)."),
    "datagen": ("speculators_hf.datagen.cli", "Chat data -> tokens, loss masks and verifier hidden states."),
    "vocab": ("speculators_hf.vocab.cli", "Token frequencies -> d2t.npy / t2d.npy."),
    "serve-hidden-states": (
        "speculators_hf.online.server",
        "Serve the verifier's hidden states from vLLM for online training.",
    ),
    "train": ("speculators_hf.training.cli", "Train an EAGLE-3 draft (Trainer + accelerate)."),
    "export": ("speculators_hf.export", "Check or convert a draft checkpoint into the format vLLM serves."),
    "evaluate": ("speculators_hf.evaluation.cli", "Acceptance of a draft against its verifier."),
    "push": ("speculators_hf.hub", "Upload a draft with its model card."),
    "pipeline": ("speculators_hf.pipeline", "Run every stage; with no arguments, on the embedded tiny default."),
    "accelerate-config": ("speculators_hf.cli.accelerate_config", "Path of a shipped accelerate config, by name."),
}


def usage() -> str:
    lines = ["usage: speculators-hf <command> [flags]   (speculators-hf <command> --help for its flags)", ""]
    lines += [f"  {name:<20} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command's `main`. With no command (or `--help`) the usage goes to stdout and the exit status is
    0, as `pip` does; an unknown command is a usage error: one line on stderr, exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"speculators-hf: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name][0]).main(rest)
