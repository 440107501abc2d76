"""Machine faults for the fault table: a command run with a full disk or a read-only folder, for real.

`run_with_mounts` runs a command in its own user and mount namespace (`unshare -rm`, no privileges needed) in which
the given folders are small or read-only tmpfs mounts; nothing outside that process sees them. Tests skip, with the
reason, where the kernel does not allow unprivileged namespaces.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest


def namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


requires_namespaces = pytest.mark.skipif(
    not namespaces_available(), reason="needs unprivileged user+mount namespaces (`unshare -rm`) for tmpfs mounts"
)


def run_with_mounts(
    argv: list[str],
    full: list[str] = (),
    readonly: list[str] = (),
    size: str = "64k",
    env: dict | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run `argv` where each folder of `full` is a tmpfs of `size` bytes and each of `readonly` a read-only tmpfs
    (the folders must exist; what they held is hidden, not touched)."""
    mounts = [f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(p))}" for p in full]
    mounts += [f"mount -t tmpfs -o ro tmpfs {shlex.quote(str(p))}" for p in readonly]
    script = " && ".join([*mounts, "exec " + shlex.join(argv)])
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def cli(*args: str) -> list[str]:
    """`python -m speculators_hf <args>` with this interpreter."""
    return [sys.executable, "-m", "speculators_hf", *args]
