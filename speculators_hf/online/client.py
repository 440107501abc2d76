"""`HiddenStatesClient.fetch(token_ids) -> [T, L, H]`: one sample's verifier hidden states from the servers.

One prompt per request (vLLM reports the states of one prompt per response), `max_tokens=1`, `return_token_ids`.
Every answer is checked: the server computed exactly the tokens sent, the states cover them with the layers the
data needs, and they are finite. Servers are used round-robin; one that fails (connection refused, timeout, 5xx,
429) rests with exponential backoff while the others carry on; when none has answered for `timeout` seconds the fetch
fails with one line. Unusable states (NaN/inf, unreadable file) are retried on another server, then skipped: the
caller counts them.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

from ..utils import UserError, get_logger
from .transport import BadStates, HiddenStatesTransport, SpoolTransport

logger = get_logger(__name__)

RETRYABLE_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)
MAX_BACKOFF = 30.0


class OnlineError(UserError):
    """A problem the user must fix (no server left, a server capturing other layers, a prompt too long).

    Raised inside a DataLoader worker, it comes back to the training process as `type(traceback text)`; the
    constructor keeps only this exception's own line, so the CLI still prints one line.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Original Traceback" in message:
            lines = [line for line in message.splitlines() if f"{type(self).__name__}: " in line]
            if lines:
                message = lines[-1].split(f"{type(self).__name__}: ", 1)[1]
        super().__init__(message)


class ProducerUnavailable(OnlineError):
    """No hidden-states server answered for `--hidden-states-timeout` seconds."""


class _Retry(Exception):
    """This server failed this time; try another."""


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


def server_models(url: str, timeout: float = 10) -> list[str]:
    """The model names a server serves (`GET /v1/models`); raises `OSError` if it does not answer."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=timeout) as response:
        return [m["id"] for m in json.loads(response.read())["data"]]


class HiddenStatesClient:
    """Fetches hidden states from `serve-hidden-states` servers (thread-safe: share one per process).

    Args:
        servers (`list[str]`): server URLs (`http://host:port`).
        hidden_shape (`tuple[int, int]`, *optional*): the `(L, H)` every answer must have.
        layer_ids (`list[int]`, *optional*): the ids the data needs; checked against each server's `server.json`.
        transport (`HiddenStatesTransport`): how states travel (default: the file spool).
        timeout (`float`): seconds without any answer before `ProducerUnavailable`; also one request's limit.
        bad_attempts (`int`): tries for a sample whose states are unusable before it is skipped.
        start (`int`): first server of the round-robin (spread processes and workers over the servers).
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
    ):
        if not servers:
            raise OnlineError("no hidden-states server given: pass --hidden-states-servers URL [URL ...].")
        self.servers = [_Server(url.rstrip("/")) for url in servers]
        self.hidden_shape = tuple(hidden_shape) if hidden_shape else None
        self.layer_ids = list(layer_ids) if layer_ids else None
        self.transport = transport or SpoolTransport()
        self.timeout = timeout
        self.bad_attempts = bad_attempts
        self._next = start % len(self.servers)
        self._lock = threading.Lock()
        self._last_answer = time.monotonic()

    # ------------------------------------------------------------------------------------------------ servers

    def wait_for_servers(self, timeout: float | None = None) -> list[str]:
        """Block until at least one server answers; returns the URLs that do (fails after `timeout`)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            ready = []
            for server in self.servers:
                try:
                    server.model = server_models(server.url, timeout=5)[0]
                    ready.append(server.url)
                except (OSError, ValueError, KeyError, IndexError) as err:
                    server.last_error = _describe(err)
            if ready:
                return ready
            if time.monotonic() > deadline:
                raise ProducerUnavailable(self._none_left_message(self.timeout if timeout is None else timeout))
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

    def _failed(self, server: _Server, error: str) -> None:
        with self._lock:
            server.failures += 1
            server.last_error = error
            backoff = min(MAX_BACKOFF, 2.0 ** (server.failures - 1))
            server.down_until = time.monotonic() + backoff
            server.model = None
        alive = sum(s.down_until <= time.monotonic() for s in self.servers)
        logger.warning(
            "hidden-states server %s failed (%s); retrying in %.0f s, %d other server(s) up",
            server.url,
            error,
            backoff,
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
                params = self._request(server, token_ids)
            except _Retry as err:
                self._failed(server, str(err))
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

    def _wait_for_a_server(self, fetch_started: float) -> None:
        """Sleep until a server's backoff ends; fail once no server has answered for `timeout` seconds (counted
        from the last answer, or from this fetch's start when the trainer has not asked for a while)."""
        with self._lock:
            waited = time.monotonic() - max(self._last_answer, fetch_started)
            wake = min(s.down_until for s in self.servers)
        if waited > self.timeout:
            raise ProducerUnavailable(self._none_left_message(waited))
        time.sleep(max(0.05, min(wake - time.monotonic(), self.timeout - waited, 1.0)))

    def _request(self, server: _Server, token_ids: list[int]) -> dict:
        """POST one prompt; returns the answer's `kv_transfer_params` after checking the prompt token ids."""
        try:
            if server.model is None:
                server.model = server_models(server.url, timeout=min(self.timeout, 30))[0]
            body = {
                "model": server.model,
                "prompt": token_ids,
                "max_tokens": 1,
                "temperature": 0.0,
                "return_token_ids": True,
            }
            request = urllib.request.Request(
                f"{server.url}/v1/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = _error_detail(err)
            if err.code in RETRYABLE_STATUS:
                raise _Retry(f"HTTP {err.code}: {detail}") from err
            raise OnlineError(
                f"hidden-states server {server.url} rejected a prompt of {len(token_ids)} tokens (HTTP {err.code}: "
                f"{detail}); check that it serves the verifier the data came from, with --max-model-len above "
                "datagen's --seq-length."
            ) from err
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as err:
            raise _Retry(_describe(err)) from err
        params = answer.get("kv_transfer_params") or {}
        choices = answer.get("choices") or [{}]
        if choices[0].get("prompt_token_ids") != token_ids:
            if params:
                self.transport.discard(params)
            got = choices[0].get("prompt_token_ids")
            raise OnlineError(
                f"hidden-states server {server.url} computed {len(got) if got is not None else 'unknown'} prompt "
                f"tokens, not the {len(token_ids)} sent: is it a vLLM with return_token_ids (0.32+)?"
            )
        return params

    def _load_and_check(self, server: _Server, params: dict, token_ids: list[int]) -> torch.Tensor:
        if not server.checked and self.layer_ids is not None:
            info = self.transport.server_info(params)
            if info is not None and isinstance(info.get("layer_ids"), list) and info["layer_ids"] != self.layer_ids:
                self.transport.discard(params)
                raise OnlineError(
                    f"hidden-states server {server.url} captures layer ids {info.get('layer_ids')} but the data needs "
                    f"{self.layer_ids} (data_config.json): start it with --layer-ids "
                    f"{' '.join(map(str, self.layer_ids))}."
                )
            server.checked = True
        data = self.transport.load(params)
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


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and err.reason is not None:
        err = err.reason if isinstance(err.reason, BaseException) else err
    if isinstance(err, TimeoutError):
        return "timed out"
    return f"{type(err).__name__}: {err}"[:200]


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read())
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
        return str(message or body)[:300]
    except Exception:
        return err.reason or ""


__all__ = ["Fetched", "HiddenStatesClient", "OnlineError", "ProducerUnavailable", "server_models"]
