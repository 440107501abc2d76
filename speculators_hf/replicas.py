"""`--data-parallel-size N` on one machine: N copies of a stage's CLI, each with its own GPUs or share of the cores.

datagen and regenerate split their work by `--rank/--world-size`; this module only starts the copies and waits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, fields
from enum import Enum

import torch

from .utils import UserError


def run_replicas(module: str, args, children: list[dict], tensor_parallel_size: int) -> list[int]:
    """Run `python -m module` once per entry of `children` (each overriding fields of the dataclass `args`), in
    parallel; returns the indices of the copies that failed. Copy `i` sees GPUs `[i * tp, (i + 1) * tp)`."""
    n, tp = len(children), tensor_parallel_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if devices and len(devices) < n * tp:
        raise UserError(
            f"--data-parallel-size {n} x --tensor-parallel-size {tp} needs {n * tp} GPUs; {len(devices)} are visible."
        )
    procs = []
    for i, overrides in enumerate(children):
        env = dict(os.environ)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[i * tp : (i + 1) * tp])
        else:  # CPU replicas share the cores instead of each taking all of them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
        argv = to_argv(type(args), {**asdict(args), **overrides})
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env))
    return [i for i, p in enumerate(procs) if p.wait() != 0]


def to_argv(cls, values: dict) -> list[str]:
    """The command-line flags that parse back (`HfArgumentParser`) into `values` for the argument dataclass `cls`.

    Scalars are written `--flag=value` (a value may start with `-`); booleans as `true`/`false`; enums by value;
    lists as `--flag a b`. A field missing from `values` is left out (it parses back to its default), and so is None,
    which parses back only where the default is None. What cannot be written (that None elsewhere, an empty list, a
    list item starting with `-`, a mapping) is a ValueError."""
    argv = []
    for f in fields(cls):
        if f.name not in values:
            continue
        value, flag = values[f.name], f"--{f.name}"
        if isinstance(value, dict):
            raise ValueError(f"{flag} {value!r}: a mapping cannot be written as a command-line flag")
        if isinstance(value, list):
            items = [_text(v) for v in value]
            if not items or any(item.startswith("-") for item in items):
                raise ValueError(f"{flag} {value!r} cannot be written as command-line flags")
            argv += [flag, *items]
        elif value is not None:
            argv.append(f"{flag}={_text(value)}")
        elif f.default is not None:
            raise ValueError(f"{flag} is None, which only its default can be (default {f.default!r})")
    return argv


def _text(value) -> str:
    if isinstance(value, Enum):
        value = value.value
    return str(value).lower() if isinstance(value, bool) else str(value)
