"""One CLI mechanism: `HfArgumentParser` over argument dataclasses, plus `--config file.yaml` and `--verbose`.

YAML values become defaults and flags given on the command line override them; unknown YAML keys, and values of the
wrong type for their flag, are an error. A `UserError` (or `ValueError` from argument validation) prints one line
(and its details, if any, on the lines after it) and exits 2, with no traceback; `--verbose` adds the traceback of
the error's cause.
`--help` lists our own flags first; flags a dataclass inherits (e.g. `TrainingArguments`') follow in their own group.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
import types
import typing
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path

from transformers import HfArgumentParser

from .utils import UserError, environment_fault
from .validation import read_yaml


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` to a flag's help, except when there is no default to tell (None or empty)."""

    def _get_help_string(self, action):
        if action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)


def make_parser(
    dataclass_types, prog: str | None = None, description: str | None = None, epilog: str | None = None
) -> HfArgumentParser:
    types = dataclass_types if isinstance(dataclass_types, Sequence) else [dataclass_types]
    parser = HfArgumentParser(
        types,
        prog=prog,
        description=description or (types[0].__doc__ or "").strip(),
        epilog=epilog,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file of flag values (flags on the command line win).")
    parser.add_argument("--verbose", action="store_true", help="On an error, also print the traceback of its cause.")
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
    parser.usage = f"%(prog)s [-h] [--config CONFIG] [--verbose]{flags} [flags below]"


def parse(parser: HfArgumentParser, argv: list[str] | None, sections: Sequence[str] = (), moved: dict | None = None):
    """The dataclasses of `parser` from `argv` (and `--config` YAML). With `sections` (the pipeline's stage names),
    `--<section>.<flag> VALUE...` on the command line and YAML mappings under a section's name are taken out first
    and returned, untyped, as a last element `{section: {flag: value}}` (the command line's after the YAML's).
    `moved` maps keys a YAML file may still use to their new form, for the one line that refuses them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, dotted = split_section_flags(argv, sections)
    pre = argparse.ArgumentParser(add_help=False)  # finds --config before required flags are checked
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    found: dict[str, dict] = {name: {} for name in sections}
    if known.config:
        path = Path(known.config)
        label = f"--config {path}"
        values = read_yaml(path, label, fix="write one `flag-name: value` per line")
        for name in sections:
            if isinstance(values.get(name), dict):
                found[name] = {str(k).replace("-", "_"): v for k, v in values.pop(name).items()}
        dests = {a.dest for a in parser._actions}
        unknown = sorted(str(k) for k in values if str(k).replace("-", "_") not in dests)
        old = [k for k in unknown if k.replace("-", "_") in (moved or {})]
        if old:
            raise UserError(f"{label}: `{old[0]}` moved: write it as {moved[old[0].replace('-', '_')]}.")
        if unknown:
            raise UserError(f"{label}: unknown keys {unknown} (see --help for the flags).")
        hints = _field_hints(parser)
        defaults = {}
        for key, value in values.items():
            dest = key.replace("-", "_")
            defaults[dest] = _yaml_value(label, key, value, hints.get(dest), _main_action(parser, dest))
        parser.set_defaults(**defaults)
        for action in parser._actions:  # a required flag given in the YAML is no longer required on the command line
            if action.dest in defaults:
                action.required = False
    *outputs, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    # HfArgumentParser appends a Namespace holding arguments outside the dataclasses (--config, --verbose); drop it.
    outputs = [o for o in outputs if not isinstance(o, argparse.Namespace)]
    rest = [r for i, r in enumerate(rest) if not (r == "--config" or (i > 0 and rest[i - 1] == "--config"))]
    rest = [r for r in rest if not r.startswith("--config=")]
    if rest:
        raise UserError(f"unrecognised arguments: {' '.join(rest)} (see --help).")
    if sections:
        for name, values in dotted.items():
            found[name].update(values)
        outputs.append(found)
    return outputs


def split_section_flags(argv: list[str], sections: Sequence[str]) -> tuple[list[str], dict[str, dict[str, list]]]:
    """Take `--<section>.<flag> VALUE...` and `--<section>.<flag>=VALUE` out of `argv` (dashes or underscores in
    either); a flag with no value is `[]` (a bare boolean flag)."""
    rest: list[str] = []
    found: dict[str, dict[str, list]] = {name: {} for name in sections}
    i = 0
    while i < len(argv):
        token = argv[i]
        head = token[2:].split("=", 1)[0] if token.startswith("--") else ""
        section, dot, flag = head.partition(".")
        section = section.replace("-", "_")  # --on-policy.epochs is --on_policy.epochs
        if not dot or section not in found:
            rest.append(token)
            i += 1
            continue
        values = [token.split("=", 1)[1]] if "=" in token else []
        i += 1
        while "=" not in token and i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2):
            values.append(argv[i])
            i += 1
        found[section][flag.replace("-", "_")] = values
    return rest, found


def typed_section(types, values: dict, label: str) -> dict:
    """`{flag: value}` (YAML values, or lists of command-line strings) typed for the dataclasses `types`, keyed by
    field name; flag aliases (`lr` for `learning_rate`) and `no_<flag>` for booleans are understood. Unknown flags and
    values of the wrong type are one line naming `label.flag`."""
    parser = make_parser(types)
    hints = _field_hints(parser)
    by_option = {opt[2:].replace("-", "_"): a for a in parser._actions for opt in a.option_strings if opt[:2] == "--"}
    typed: dict = {}
    for key, value in values.items():
        action = by_option.get(key)
        if action is None or action.dest in ("help", "config", "verbose"):
            raise UserError(f"{label}.{key}: no such flag (see `{label}` flags in --help).")
        dest, hint = action.dest, hints.get(action.dest)
        if isinstance(value, list) and typing.get_origin(_plain(hint)) is not list:  # command-line strings
            if not value and action.nargs in (0, "?"):
                value = action.const  # a bare flag: --x (True) or --no-x (False)
            elif len(value) == 1:
                value = value[0]
            else:
                raise UserError(f"{label}.{key} takes one value, got {len(value)}: {' '.join(map(str, value))}.")
        elif action.const is False and action.nargs == 0:  # --no-x: 'no_x: true' means x false
            value = not _yaml_value(label, key, value, bool, None)
        typed[dest] = _yaml_value(f"{label}.{key}", "the value", value, hint, _main_action(parser, dest))
    return typed


def _plain(hint):
    """`X` of `X | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _field_hints(parser: HfArgumentParser) -> dict[str, object]:
    """Each flag's type annotation as its dataclass declares it (HfArgumentParser rewrites `field.type`)."""
    hints = {}
    for cls in parser.dataclass_types:
        try:
            hints.update(typing.get_type_hints(cls))
        except Exception:  # noqa: BLE001 - an unresolvable annotation: its values are not checked here
            continue
    return hints


def _main_action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action | None:
    """The flag's own action (not the `--no-*` complement that shares its dest)."""
    return next((a for a in parser._actions if a.dest == dest and a.option_strings and a.const is not False), None)


_SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _yaml_value(label: str, key: str, value, hint, action: argparse.Action | None):
    """A YAML value for flag `key`, converted to the flag's type, or a one-line error naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, dict) and dict in args:
            return value  # e.g. TrainingArguments' fsdp_config: dict | str
        scalars = [a for a in args if a is not type(None) and a is not dict]
        hint = next((a for a in scalars if a is not str), scalars[0] if scalars else None)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    choices = getattr(action, "choices", None)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_scalar(label, key, item, args[0] if args else None, choices) for item in items]
    return _scalar(label, key, value, hint, choices)


def _scalar(label: str, key: str, value, hint, choices):
    def wrong(expected: str) -> UserError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return UserError(f"{label}: {key} is {shown}; expected {expected}.")

    if isinstance(hint, type) and issubclass(hint, Enum):
        choices, hint = [m.value for m in hint], None
    elif typing.get_origin(hint) is typing.Literal:
        choices, hint = list(typing.get_args(hint)), None
    if hint in _SCALARS:
        if isinstance(value, (dict, list)) or value is None:
            raise wrong(_SCALARS[hint])
        try:
            if hint is bool:
                from transformers.hf_argparser import string_to_bool

                value = string_to_bool(value if isinstance(value, bool) else str(value))
            elif hint is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif hint is float:
                if isinstance(value, bool):
                    raise ValueError
                value = value if isinstance(value, int) else float(value)  # YAML's 500 stays 500, as before
            else:
                value = str(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise wrong(_SCALARS[hint]) from None
    if choices and value not in choices and str(value) not in map(str, choices):
        raise wrong(f"one of {', '.join(map(str, choices))}")
    return value


def run_command(
    dataclass_types,
    fn: Callable,
    argv: list[str] | None = None,
    prog: str | None = None,
    sections: Sequence[str] = (),
    epilog: str | None = None,
    moved: dict | None = None,
) -> int:
    """Parse, run `fn(*args)`, and turn user errors into one line on stderr (details after it) and exit status 2; a
    failed run (`RunFailed`) or a fault of the machine (disk full, read-only folder) is one line and exit status 1.
    A process launched with others (`accelerate launch`) leaves its process group before it returns."""
    parser = make_parser(dataclass_types, prog=prog, epilog=epilog)
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        args = parse(parser, argv, sections, moved)
        fn(*args)
    except UserError as err:
        _report(prog or parser.prog, err, verbose)
        return err.exit_code
    except ValueError as err:  # raised by dataclass validation inside HfArgumentParser
        if err.__traceback__ is not None and _raised_in_post_init(err):
            _report(prog or parser.prog, err, verbose)
            return 2
        raise
    except OSError as err:  # the machine's fault (disk full, read-only folder): one line naming the path
        fault = environment_fault(err)
        if fault is None:
            raise
        fault.__cause__ = err
        _report(prog or parser.prog, fault, verbose)
        return fault.exit_code
    finally:
        leave_process_group()
    return 0


def leave_process_group() -> None:
    """Destroy the process group this process started (`accelerate launch`), if any, before the interpreter exits:
    torch's finalizers tearing a gloo group down can abort a rank after a clean run ("terminate called without an
    active exception"), and torchrun's exit barrier then holds every other node up to 300 s."""
    dist = sys.modules.get("torch.distributed")  # a command that never imported torch started no group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _report(prog: str, err: Exception, verbose: bool) -> None:
    print(f"{prog}: error: {err}", file=sys.stderr)
    details = getattr(err, "details", None)
    if details:
        print("\n".join(f"  {line}" for line in str(details).splitlines()), file=sys.stderr)
    cause = err.__cause__ or err.__context__
    if verbose and cause is not None:
        print("".join(traceback.format_exception(cause)).rstrip(), file=sys.stderr)


def _raised_in_post_init(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "__post_init__":
            return True
        tb = tb.tb_next
    return False
