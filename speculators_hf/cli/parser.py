"""One CLI mechanism: `HfArgumentParser` over argument dataclasses, plus `--config file.yaml`.

YAML values become defaults and flags given on the command line override them; unknown YAML keys are an error.
A `UserError` (or `ValueError` from argument validation) prints one line and exits 2, with no traceback.
`--help` lists our own flags first; flags a dataclass inherits (e.g. `TrainingArguments`') follow in their own group.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..utils import UserError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` to a flag's help, except when there is no default to tell (None or empty)."""

    def _get_help_string(self, action):
        if action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)


def make_parser(dataclass_types, prog: str | None = None, description: str | None = None) -> HfArgumentParser:
    types = dataclass_types if isinstance(dataclass_types, Sequence) else [dataclass_types]
    parser = HfArgumentParser(
        types,
        prog=prog,
        description=description or (types[0].__doc__ or "").strip(),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file of flag values (flags on the command line win).")
    _own_flags_first(parser, types)
    return parser


def _declared_in(cls) -> list[str]:
    return list(vars(cls).get("__annotations__", {}))


def _own_flags_first(parser: argparse.ArgumentParser, types) -> None:
    """List our own flags first, in the order the dataclasses declare them; flags of fields a dataclass inherits
    (not re-declared in its body) follow in one help group per base class. A short usage line replaces the list of
    every flag."""
    rank: dict[str, int] = {}
    inherited: dict[str, type] = {}
    for cls in types:
        declared = _declared_in(cls)
        for name in declared:
            rank.setdefault(name, len(rank))
        for f in dataclasses.fields(cls):
            if f.name not in declared:
                inherited[f.name] = next(base for base in cls.__mro__[1:] if f.name in _declared_in(base))
    inherited = {dest: base for dest, base in inherited.items() if dest not in rank}
    if not inherited:
        return

    def order(action: argparse.Action) -> tuple[bool, int]:
        return action.dest in inherited, rank.get(action.dest, -1)

    groups: dict[type, argparse._ArgumentGroup] = {}
    for action in list(parser._optionals._group_actions):
        base = inherited.get(action.dest)
        if base is not None:
            if base not in groups:
                title = f"{base.__name__} flags (from {base.__module__.split('.')[0]})"
                groups[base] = parser.add_argument_group(title)
            parser._optionals._group_actions.remove(action)
            groups[base]._group_actions.append(action)
    # Stable sorts: a flag and its `--no-*` complement share a dest and keep their order (parsing relies on it).
    parser._optionals._group_actions.sort(key=order)
    parser._actions.sort(key=order)
    required = [a for a in parser._actions if a.required and a.option_strings]
    flags = "".join(f" {a.option_strings[min(1, len(a.option_strings) - 1)]} {a.dest.upper()}" for a in required)
    parser.usage = f"%(prog)s [-h] [--config CONFIG]{flags} [flags below]"


def parse(parser: HfArgumentParser, argv: list[str] | None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)  # finds --config before required flags are checked
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.exists():
            raise UserError(f"--config {path} does not exist.")
        values = yaml.safe_load(path.read_text()) or {}
        dests = {a.dest for a in parser._actions}
        unknown = sorted(k for k in values if k.replace("-", "_") not in dests)
        if unknown:
            raise UserError(f"--config {path}: unknown keys {unknown}.")
        defaults = {k.replace("-", "_"): v for k, v in values.items()}
        parser.set_defaults(**defaults)
        for action in parser._actions:  # a required flag given in the YAML is no longer required on the command line
            if action.dest in defaults:
                action.required = False
    *outputs, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    # HfArgumentParser appends a Namespace holding arguments outside the dataclasses (here: --config); drop it.
    outputs = [o for o in outputs if not isinstance(o, argparse.Namespace)]
    rest = [r for i, r in enumerate(rest) if not (r == "--config" or (i > 0 and rest[i - 1] == "--config"))]
    rest = [r for r in rest if not r.startswith("--config=")]
    if rest:
        raise UserError(f"unrecognised arguments: {' '.join(rest)} (see --help).")
    return outputs


def run_command(dataclass_types, fn: Callable, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse, run `fn(*args)`, and turn user errors into one line on stderr and exit status 2."""
    parser = make_parser(dataclass_types, prog=prog)
    try:
        args = parse(parser, argv)
        fn(*args)
    except UserError as err:
        print(f"{prog or parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # raised by dataclass validation inside HfArgumentParser
        if err.__traceback__ is not None and _raised_in_post_init(err):
            print(f"{prog or parser.prog}: error: {err}", file=sys.stderr)
            return 2
        raise
    return 0


def _raised_in_post_init(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "__post_init__":
            return True
        tb = tb.tb_next
    return False
