"""`HiddenStatesClient.fetch(token_ids) -> [T, L, H]`: one sample's verifier hidden states from the servers.

One prompt per request (vLLM reports the states of one prompt per response), `max_tokens=1`, `return_token_ids`.
Every answer is checked: the server computed exactly the tokens sent, the states cover them with the layers the
data needs, and they are finite. Servers are used round-robin; one that fails (connection refused, timeout, 5xx,
429) rests with exponential backoff while the others carry on; when none has answered for `timeout` seconds the fetch
fails with one line. Unusable states (NaN/inf, unreadable file) are retried on another server, then skipped: the
caller counts them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..http import JSONClient, Rejected, Retryable, Unauthorized, backoff
from ..http import api_key as resolve_api_key
from ..utils import get_logger
from .common import KEY_FLAG, BadStates, OnlineError, UntrustedPath, server_models
from .transport import HiddenStatesTransport, SpoolTransport

logger = get_logger(__name__)


class ProducerUnavailable(OnlineError):
    """No hidden-states server answered for `--hidden-states-timeout` seconds."""


@dataclass
class Fetched:
    """One sample's fetch: the states (`None` when skipped) and what it cost."""

    hidden_states: torch.Tensor | None  # [T, L, H]
    seconds: float
    retries: int = 0
    spool_bytes: int = 0  # bytes of states in the server's spool folder when this sample's file was read
    skip_reason: str | None = None


@dataclass
class _Server:
    url: str
    model: str | None = None
    down_until: float = 0.0
    failures: int = 0  # consecutive
    checked: bool = False  # its server.json matched the expected layer ids
    requests: int = 0
    last_error: str = ""


class HiddenStatesClient:
    """Fetches hidden states from `serve-hidden-states` servers (thread-safe: share one per process).

    Args:
        servers (`list[str]`): server URLs (`http://host:port`).
        hidden_shape (`tuple[int, int]`, *optional*): the `(L, H)` every answer must have.
        layer_ids (`list[int]`, *optional*): the ids the data needs; checked against each server's `server.json`.
        transport (`HiddenStatesTransport`): how states travel (default: the file spool, in `spool_dirs`).
        timeout (`float`): seconds without any answer before `ProducerUnavailable`; no request outlives it.
        bad_attempts (`int`): tries for a sample whose states are unusable before it is skipped.
        start (`int`): first server of the round-robin (spread processes and workers over the servers).
        api_key (`str`, *optional*): the servers' `--api-key` (default: `$SPECULATORS_HF_API_KEY`).
        spool_dirs (`list[str]`, *optional*): the folders the default transport may read and delete states in.
    """

    def __init__(
        self,
        servers: list[str],
        hidden_shape: tuple[int, int] | None = None,
        layer_ids: list[int] | None = None,
        transport: HiddenStatesTransport | None = None,
        timeout: float = 300.0,
        bad_attempts: int = 2,
        start: int = 0,
        api_key: str | None = None,
        spool_dirs: list[str | Path] | None = None,
    ):
        if not servers:
            raise OnlineError("no hidden-states server given: pass --hidden-states-servers URL [URL ...].")
        self.servers = [_Server(url.rstrip("/")) for url in servers]
        self.hidden_shape = tuple(hidden_shape) if hidden_shape else None
        self.layer_ids = list(layer_ids) if layer_ids else None
        self.transport = transport or SpoolTransport(spool_dirs)
        self.timeout = timeout
        self.bad_attempts = bad_attempts
        self.http = JSONClient(resolve_api_key(api_key), key_flag=KEY_FLAG)
        self._next = start % len(self.servers)
        self._lock = threading.Lock()
        self._last_answer = time.monotonic()

    # ------------------------------------------------------------------------------------------------ servers

    def wait_for_servers(self, timeout: float | None = None) -> list[str]:
        """Block until at least one server answers; returns the URLs that do (fails after `timeout`)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            ready = []
            for server in self.servers:
                try:
                    server.model = server_models(self.http, server.url, timeout=min(5.0, timeout))[0]
                    ready.append(server.url)
                except Unauthorized as err:
                    raise OnlineError(f"hidden-states server {err}.") from err
                except (Retryable, Rejected) as err:
                    server.last_error = err.problem
            if ready:
                return ready
            if time.monotonic() > deadline:
                raise ProducerUnavailable(self._none_left_message(timeout))
            time.sleep(1.0)

    def _pick(self) -> _Server | None:
        with self._lock:
            now = time.monotonic()
            for _ in range(len(self.servers)):
                server = self.servers[self._next]
                self._next = (self._next + 1) % len(self.servers)
                if server.down_until <= now:
                    return server
        return None

    def _failed(self, server: _Server, error: Retryable) -> None:
        with self._lock:
            server.failures += 1
            server.last_error = error.problem
            rest = backoff(server.failures, 1.0, error.retry_after)
            server.down_until = time.monotonic() + rest
            server.model = None
        alive = sum(s.down_until <= time.monotonic() for s in self.servers)
        logger.warning(
            "hidden-states server %s failed (%s); retrying in %.0f s, %d other server(s) up",
            server.url,
            error.problem,
            rest,
            alive,
        )

    def _none_left_message(self, waited: float) -> str:
        tried = "; ".join(f"{s.url}: {s.last_error or 'no answer'}" for s in self.servers)
        return (
            f"no hidden-states server answered for {waited:.0f} s ({tried}); start them with `speculators-hf "
            "serve-hidden-states` and check --hidden-states-servers (or raise --hidden-states-timeout)."
        )

    # -------------------------------------------------------------------------------------------------- fetch

    def fetch(self, token_ids: list[int]) -> Fetched:
        """States `[T, L, H]` for `token_ids`, or `hidden_states=None` with a `skip_reason` after `bad_attempts`."""
        token_ids = [int(t) for t in token_ids]
        started = time.monotonic()
        retries, bad = 0, 0
        while True:
            server = self._pick()
            if server is None:
                self._wait_for_a_server(started)
                continue
            try:
                params = self._request(server, token_ids, self._run_deadline(started))
            except Retryable as err:
                self._failed(server, err)
                retries += 1
                continue
            with self._lock:
                server.failures, server.requests = 0, server.requests + 1
                self._last_answer = time.monotonic()
            try:
                states = self._load_and_check(server, params, token_ids)
                spool = getattr(self.transport, "last_spool_bytes", 0)
                return Fetched(states, time.monotonic() - started, retries, spool)
            except BadStates as err:
                bad += 1
                if bad >= self.bad_attempts:
                    logger.warning("skipping a sample of %d tokens: %s (after %d tries)", len(token_ids), err, bad)
                    return Fetched(None, time.monotonic() - started, retries, 0, str(err))
                retries += 1

    def _run_deadline(self, fetch_started: float) -> float:
        """When this fetch fails if no server answers: `timeout` after the last answer (or after this fetch's start
        when the trainer has not asked for a while)."""
        with self._lock:
            return max(self._last_answer, fetch_started) + self.timeout

    def _wait_for_a_server(self, fetch_started: float) -> None:
        """Sleep until a server's backoff ends; fail once no server has answered for `timeout` seconds."""
        with self._lock:
            waited = time.monotonic() - max(self._last_answer, fetch_started)
            wake = min(s.down_until for s in self.servers)
        if waited > self.timeout:
            raise ProducerUnavailable(self._none_left_message(waited))
        time.sleep(max(0.05, min(wake - time.monotonic(), self.timeout - waited, 1.0)))

    def _request(self, server: _Server, token_ids: list[int], deadline: float) -> dict:
        """POST one prompt; returns the answer's `kv_transfer_params` after checking the prompt token ids."""
        try:
            if server.model is None:
                server.model = server_models(self.http, server.url, timeout=min(self.timeout, 30))[0]
            body = {
                "model": server.model,
                "prompt": token_ids,
                "max_tokens": 1,
                "temperature": 0.0,
                "return_token_ids": True,
            }
            answer = self.http.post(f"{server.url}/v1/completions", body, timeout=self.timeout, deadline=deadline)
        except Unauthorized as err:
            raise OnlineError(f"hidden-states server {err}.") from err
        except Rejected as err:
            raise OnlineError(
                f"hidden-states server {server.url} rejected a prompt of {len(token_ids)} tokens ({err.problem}); "
                "check that it serves the verifier the data came from, with --max-model-len above datagen's "
                "--seq-length."
            ) from err
        if not isinstance(answer, dict):
            raise Retryable(server.url, "answered /v1/completions with something other than a JSON object")
        params = answer.get("kv_transfer_params")
        params = params if isinstance(params, dict) else {}
        choices = answer.get("choices") or [{}]
        first = choices[0] if isinstance(choices, list) and isinstance(choices[0], dict) else {}
        if first.get("prompt_token_ids") != token_ids:
            if params:
                self._untrusted(server, self.transport.discard, params)
            got = first.get("prompt_token_ids")
            raise OnlineError(
                f"hidden-states server {server.url} computed {len(got) if isinstance(got, list) else 'unknown'} "
                f"prompt tokens, not the {len(token_ids)} sent: is it a vLLM with return_token_ids (0.32+)?"
            )
        return params

    def _untrusted(self, server: _Server, method, params: dict):
        """`method(params)` of the transport; a path outside the spool folders stops the run, naming the server."""
        try:
            return method(params)
        except UntrustedPath as err:
            raise UntrustedPath(f"hidden-states server {server.url} {err}.") from err

    def _load_and_check(self, server: _Server, params: dict, token_ids: list[int]) -> torch.Tensor:
        if not server.checked and self.layer_ids is not None:
            info = self._untrusted(server, self.transport.server_info, params)
            if info is not None and isinstance(info.get("layer_ids"), list) and info["layer_ids"] != self.layer_ids:
                self.transport.discard(params)
                raise OnlineError(
                    f"hidden-states server {server.url} captures layer ids {info.get('layer_ids')} but the data needs "
                    f"{self.layer_ids} (data_config.json): start it with --layer-ids "
                    f"{' '.join(map(str, self.layer_ids))}."
                )
            server.checked = True
        data = self._untrusted(server, self.transport.load, params)
        states, ids = data.get("hidden_states"), data.get("token_ids")
        if states is None or ids is None:
            raise BadStates(f"{server.url} wrote no hidden_states/token_ids")
        if ids.tolist() != token_ids:
            raise BadStates(f"{server.url} wrote states for other tokens ({len(ids)} instead of {len(token_ids)})")
        if states.ndim != 3 or states.shape[0] != len(token_ids):
            raise BadStates(f"{server.url} wrote states of shape {tuple(states.shape)} for {len(token_ids)} tokens")
        if self.hidden_shape is not None and tuple(states.shape[1:]) != self.hidden_shape:
            raise OnlineError(
                f"hidden-states server {server.url} returns {tuple(states.shape[1:])} (layers, hidden size) per token "
                f"but the data needs {self.hidden_shape}: serve the same verifier with the data's --layer-ids."
            )
        if not torch.isfinite(states).all():
            raise BadStates(f"{server.url} returned NaN/inf hidden states")
        return states

    def stats(self) -> dict[str, int]:
        """Requests answered per server URL."""
        return {s.url: s.requests for s in self.servers}


__all__ = ["Fetched", "HiddenStatesClient", "OnlineError", "ProducerUnavailable", "server_models"]
