"""Reading the files a user hands us: a bad file is one `UserError` line naming it, never a traceback.

Every reader of a file goes through these helpers (`tests/test_bad_inputs.py` greps the package for raw readers and
feeds every CLI truncated, random, empty, wrong-type and wrong-shape files). Nothing here runs code from a file: JSON
and YAML are parsed as data, `torch.load` runs with `weights_only=True` and `np.load` with `allow_pickle=False`.
Messages read `<label>: <what is wrong>[; <how to fix it>].`; the label names the file (and the flag it came from).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .utils import UserError

_JSON_TYPES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def describe(err: BaseException, limit: int = 160) -> str:
    """The first line of the innermost message of an exception chain (libraries wrap the useful one), shortened."""
    text, seen = "", set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        first = str(err).strip().splitlines()[0].strip() if str(err).strip() else ""
        text = first or text or type(err).__name__
        err = err.__cause__ or (err.__context__ if not err.__suppress_context__ else None)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad_file(label: str, problem: str, fix: str | None = None, details: str | None = None) -> UserError:
    """`UserError("<label>: <problem>[; <fix>].")`."""
    return UserError(f"{label}: {problem}" + (f"; {fix}" if fix else "") + ".", details)


def _require(path: Path, label: str, fix: str | None) -> None:
    if not path.exists():
        raise bad_file(label, "does not exist", fix)
    if path.is_dir():
        raise bad_file(label, "is a folder, expected a file", fix)
    if not path.is_file():  # opening a FIFO blocks until a writer comes; a device may never end
        raise bad_file(label, "is not a regular file (a FIFO, socket or device)", fix)


def require_file(path: str | Path, label: str | None = None, fix: str | None = None) -> Path:
    """`path` if it is a regular file (symlinks followed), else one line saying what it is instead."""
    path = Path(path)
    _require(path, label or str(path), fix)
    return path


def resolve_inside(root: str | Path, name: str | Path, label: str, fix: str | None = None) -> Path:
    """`root / name` with symlinks resolved, if it stays inside `root` (also resolved); else one line.

    Every path the project takes from a file or an answer (an index's shard names, a server's spool path, a config's
    file names) goes through this before it is read or deleted: `../x`, an absolute path or a symlink out of the
    folder is refused."""
    base = Path(root).resolve()
    text = str(name)
    if not text or "\x00" in text:
        raise bad_file(label, f"names an empty or invalid path {text!r}", fix)
    target = (base / name).resolve()  # an absolute `name` replaces `base`: caught below
    if target != base and base not in target.parents:
        fix = fix or "refused: it may only name files inside that folder"
        raise bad_file(label, f"names {text!r}, which is outside {base}", fix)
    return target


def read_text(path: str | Path, label: str | None = None, fix: str | None = None) -> str:
    """A UTF-8 text file."""
    path = Path(path)
    label = label or str(path)
    _require(path, label, fix)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad_file(label, f"is not UTF-8 text (byte {err.start}: a binary file?)", fix) from err
    except OSError as err:
        raise bad_file(label, f"cannot be read ({describe(err)})", fix) from err


def type_name(value) -> str:
    return _JSON_TYPES.get(type(value), "null" if value is None else type(value).__name__)


def parse_json(text: str | bytes, label: str, expect: type | None = dict, fix: str | None = None):
    """Parse one JSON document (a file's text, or one JSONL row, as read or as raw bytes) and check its top-level
    type."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_file(label, "is not UTF-8 text (a binary file?)", fix) from None
    if not text.strip():
        raise bad_file(label, "is empty", fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad_file(label, f"is not valid JSON (line {err.lineno} column {err.colno}: {err.msg})", fix) from err
    if expect is not None and not isinstance(value, expect):
        raise bad_file(label, f"holds {type_name(value)}, expected {_JSON_TYPES.get(expect, expect.__name__)}", fix)
    return value


def read_json(path: str | Path, label: str | None = None, expect: type | None = dict, fix: str | None = None):
    """A JSON file whose top level is `expect` (default: an object)."""
    label = label or str(path)
    return parse_json(read_text(path, label, fix), label, expect, fix)


def read_json_if_exists(path: str | Path, label: str | None = None, expect: type | None = dict, fix=None):
    """`read_json`, or None when there is no such file."""
    return read_json(path, label, expect, fix) if Path(path).is_file() else None


def read_yaml(path: str | Path, label: str | None = None, fix: str | None = None) -> dict:
    """A YAML file holding a mapping of keys to values (`yaml.safe_load`: plain data only)."""
    import yaml

    label = label or str(path)
    text = read_text(path, label, fix)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or describe(err)
        raise bad_file(label, f"is not valid YAML ({where}{problem})", fix) from err
    if value is None:
        raise bad_file(label, "is empty (no keys)", fix)
    if not isinstance(value, dict):
        raise bad_file(label, f"holds {type_name(value)}, expected a mapping of keys to values", fix)
    return value


def safetensors_header(path: str | Path, label: str | None = None, fix: str | None = None) -> dict:
    """`{name: (dtype, shape)}` of a safetensors file, read from its header (no tensor data is read)."""
    from safetensors import safe_open

    path = Path(path)
    label = label or str(path)
    _require(path, label, fix)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as err:  # safetensors raises SafetensorError, OSError or a Rust panic for a bad header
        raise bad_file(
            label, f"is not a readable safetensors file ({describe(err, 80)}: truncated or corrupt)", fix
        ) from err


def load_safetensors(path: str | Path, label: str | None = None, fix: str | None = None) -> dict:
    """Every tensor of a safetensors file (its header is checked first)."""
    from safetensors.torch import load_file

    safetensors_header(path, label, fix)
    try:
        return load_file(str(path))
    except Exception as err:
        raise bad_file(label or str(path), f"cannot be read ({describe(err, 80)})", fix) from err


def torch_load(path: str | Path, label: str | None = None, fix: str | None = None, mmap: bool = False):
    """`torch.load(weights_only=True)`: tensors, numbers, strings and containers only; anything else is refused."""
    import pickle

    import torch

    path = Path(path)
    label = label or str(path)
    _require(path, label, fix)
    if path.stat().st_size == 0:
        raise bad_file(label, "is empty", fix)
    if mmap:
        with open(path, "rb") as f:
            if f.read(2) != b"PK":  # mmap needs torch.save's zip format; anything else is not a (current) save
                raise bad_file(label, "is not a torch.save file (truncated or corrupt)", fix)
    try:
        return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    except pickle.UnpicklingError as err:
        blocked = re.search(r"GLOBAL (\S+)", str(err))
        if blocked:
            problem = f"holds a Python object ({blocked.group(1)}), refused: loading it could run code"
            raise bad_file(label, problem, fix) from err
        raise bad_file(label, "is not a torch.save file (truncated or corrupt)", fix) from err
    except Exception as err:  # zip/pickle/storage errors of a truncated or foreign file
        problem = f"is not a readable torch.save file ({describe(err, 80)}: truncated or corrupt)"
        raise bad_file(label, problem, fix) from err


def np_load(path: str | Path, label: str | None = None, fix: str | None = None):
    """A `.npy` array (`allow_pickle=False`: object arrays are refused)."""
    import numpy as np

    path = Path(path)
    label = label or str(path)
    _require(path, label, fix)
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise bad_file(label, "is not a .npy file (truncated or corrupt)" if magic else "is empty", fix)
    try:
        value = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err):
            raise bad_file(label, "holds Python objects (refused: loading them could run code)", fix) from err
        raise bad_file(label, f"is not a readable .npy file ({describe(err, 80)})", fix) from err
    except Exception as err:
        problem = f"is not a readable .npy file ({describe(err, 80)}: truncated or corrupt)"
        raise bad_file(label, problem, fix) from err
    if not isinstance(value, np.ndarray):
        raise bad_file(label, "holds several arrays (.npz), expected one .npy array", fix)
    return value


def pretrained_config(path_or_id: str, label: str, trust_remote_code: bool = False, **kwargs):
    """`AutoConfig.from_pretrained` with `trust_remote_code` always explicit (False unless the user gave
    `--trust-remote-code`: a folder's `auto_map` code never runs, and transformers never asks on stdin), with one line
    when the config cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as err:
        raise bad_file(f"{label} {path_or_id}", f"cannot load its config.json ({_remote_code_hint(err)})") from err


def pretrained_tokenizer(path_or_id: str, label: str, trust_remote_code: bool = False, **kwargs):
    """`AutoTokenizer.from_pretrained` under the same rule as `pretrained_config`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as err:
        raise bad_file(f"{label} {path_or_id}", f"cannot load its tokenizer ({_remote_code_hint(err)})") from err


def _remote_code_hint(err: BaseException) -> str:
    messages, link = [], err
    while link is not None and len(messages) < 16:  # the whole chain: describe() shortens the message
        messages.append(str(link))
        link = link.__cause__ or link.__context__
    if any("trust_remote_code" in m or "contains custom code" in m for m in messages):
        return "it needs code from its folder (auto_map); pass --trust-remote-code if you trust that code"
    return describe(err)


@contextmanager
def quiet_library_errors(*names: str) -> Iterator[None]:
    """Silence libraries' own error logs while their exception becomes our one line (e.g. datasets' JSON loader)."""
    import logging

    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
