"""The package's one HTTP client: JSON requests to OpenAI-compatible (vLLM) servers, on `requests`.

What every caller (the online hidden-states client, `regenerate --server-url`, `serve-hidden-states` waiting for its
server) shares is defined here once:

- a TOTAL deadline per request: a timer shuts the request's socket down when it passes, whatever the request is doing
  (waiting for headers, or reading a body trickled one byte at a time), so a read that never ends is cut; socket
  timeouts alone bound each read, not the request. A caller with a deadline for its whole run passes it too.
- which failures are worth retrying (`Retryable`: refused or lost connections, deadlines, HTTP 408/409/425/429/5xx)
  and how long a server rests after failing (`backoff`: doubling from the caller's first delay, at most `MAX_BACKOFF`,
  at least what the server's Retry-After asks). Callers keep their own round-robin over servers.
- an optional API key, sent as `Authorization: Bearer <key>` (what `vllm serve --api-key` checks), from a flag or
  the environment variable `SPECULATORS_HF_API_KEY`.
- errors as one line naming the URL; `Unauthorized` (HTTP 401/403) names the caller's API key flag.

Servers are reached directly: proxies and `.netrc` from the environment are not used.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from .validation import describe

API_KEY_ENV = "SPECULATORS_HF_API_KEY"
RETRY_STATUS = frozenset({408, 409, 425, 429, *range(500, 600)})
MAX_BACKOFF = 60.0  # seconds; also the most of a server's Retry-After that is honoured
MAX_ANSWER_BYTES = 64 * 2**20
_CHUNK = 64 * 1024


class HTTPFailure(Exception):
    """`<url>: <what happened>` (one line); `status` is the HTTP status when there was one."""

    def __init__(self, url: str, problem: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(f"{url}: {problem}")
        self.url, self.problem, self.status, self.retry_after = url, problem, status, retry_after


class Retryable(HTTPFailure):
    """This server failed this time (down, overloaded, too slow, cut off): try again later or elsewhere."""


class Rejected(HTTPFailure):
    """The server refused the request itself (HTTP 4xx other than the retry statuses): retrying will not help."""


class Unauthorized(Rejected):
    """HTTP 401/403: the server wants another API key."""


def api_key(value: str | None) -> str | None:
    """The API key a flag gives, else `$SPECULATORS_HF_API_KEY`, else None."""
    return value or os.environ.get(API_KEY_ENV) or None


def backoff(failures: int, first: float = 1.0, retry_after: float | None = None) -> float:
    """Seconds a server rests after `failures` consecutive failures: `first`, doubling, at most `MAX_BACKOFF`; at
    least the server's own Retry-After (also at most `MAX_BACKOFF`)."""
    delay = min(MAX_BACKOFF, first * 2 ** max(0, failures - 1))
    return max(delay, min(retry_after or 0.0, MAX_BACKOFF))


class JSONClient:
    """JSON over HTTP with a total deadline per request; thread-safe (share one per process and API key).

    Args:
        api_key (`str`, *optional*): sent as `Authorization: Bearer <key>`.
        key_flag (`str`): the caller's flag for the key, named when a server answers 401/403.
        pool_size (`int`): connections kept open per server (the caller's requests in flight).
    """

    def __init__(self, api_key: str | None = None, key_flag: str = "--api-key", pool_size: int = 16):
        self.key_flag = key_flag
        self.session = requests.Session()
        self.session.trust_env = False
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        adapter = _DeadlineAdapter(pool_connections=4, pool_maxsize=max(1, pool_size))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def get(self, url: str, *, timeout: float, deadline: float | None = None) -> Any:
        return self.request("GET", url, None, timeout=timeout, deadline=deadline)

    def post(self, url: str, body: Any, *, timeout: float, deadline: float | None = None) -> Any:
        return self.request("POST", url, body, timeout=timeout, deadline=deadline)

    def request(self, method: str, url: str, body: Any = None, *, timeout: float, deadline: float | None = None):
        """One attempt: the answer's JSON, complete within `timeout` seconds (and before `deadline`, a
        `time.monotonic()` value, if given); else `Retryable` or `Rejected`, one line naming `url`."""
        end = time.monotonic() + timeout if deadline is None else min(time.monotonic() + timeout, deadline)
        seconds = end - time.monotonic()
        if seconds <= 0:
            raise Retryable(url, "no time left for another request (the run's deadline passed)")
        with _Deadline(seconds) as watch:
            try:
                with self.session.request(method, url, json=body, timeout=seconds, stream=True) as response:
                    data = _read_body(response, url, end)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as err:
                reason = _reason(err)
                # the watch, or the socket's read timeout if it fired first: the same budget ran out
                if watch.expired or (reason == _READ_TIMEOUT and time.monotonic() >= end):
                    raise Retryable(url, f"no complete answer within {round(seconds, 1):g} s") from err
                raise Retryable(url, reason) from err
        status = response.status_code
        if status >= 400:
            problem = f"HTTP {status}" + (f": {_detail(data)}" if data.strip() else f" {response.reason or ''}")
            problem = problem.strip()
            if status in (401, 403):
                fix = f"pass the server's API key with {self.key_flag} (or set {API_KEY_ENV})"
                raise Unauthorized(url, f"{problem}; {fix}", status)
            if status in RETRY_STATUS:
                raise Retryable(url, problem, status, _retry_after(response.headers.get("Retry-After")))
            raise Rejected(url, problem, status)
        try:
            return json.loads(data)
        except ValueError as err:
            raise Retryable(url, f"answered HTTP {status} with something other than JSON") from err

    def close(self) -> None:
        self.session.close()


def _read_body(response: requests.Response, url: str, end: float) -> bytes:
    """The body, read in chunks: at most `MAX_ANSWER_BYTES`, and only until `end` (the timer cuts a blocked read)."""
    chunks, size = [], 0
    for chunk in response.iter_content(_CHUNK):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise Retryable(url, f"answered more than {MAX_ANSWER_BYTES // 2**20} MiB")
        chunks.append(chunk)
        if time.monotonic() > end:
            raise Retryable(url, "no complete answer before its deadline")
    return b"".join(chunks)


_READ_TIMEOUT = "timed out waiting for an answer"


def _reason(err: BaseException) -> str:
    """A failed connection or read, in a few words ("cannot connect (Connection refused)", "timed out")."""
    chain, seen = [], err
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:  # the innermost cause says most; urllib3 wraps it twice
        if isinstance(e, ConnectionRefusedError):
            return "cannot connect (Connection refused)"
        if isinstance(e, socket.gaierror):
            return f"cannot connect (unknown host: {e.strerror})"
    if any(isinstance(e, (requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)) for e in chain):
        return "cannot connect (timed out)"
    if any(isinstance(e, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)) for e in chain):
        return _READ_TIMEOUT
    if isinstance(err, requests.ConnectionError) and not isinstance(err, requests.exceptions.ChunkedEncodingError):
        return f"connection failed ({describe(err)})"
    return f"connection lost ({describe(err)})"


def _detail(data: bytes) -> str:
    """An error answer's message on one line (vLLM: `{"error": {"message": ...}}` or `{"message": ...}`)."""
    try:
        body = json.loads(data)
    except ValueError:
        body = data.decode("utf-8", errors="replace")
    if isinstance(body, dict):
        error = body.get("error")
        body = (error.get("message") if isinstance(error, dict) else error) or body.get("message") or body
    return " ".join(str(body).split())[:300]


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return Retry().parse_retry_after(value)  # seconds, or an HTTP date
    except urllib3.exceptions.InvalidHeader:
        return None


# ------------------------------------------------------------------------------------------------ the deadline

_in_flight = threading.local()  # the `_Deadline` of the request this thread is making


class _Deadline:
    """Shuts a request's socket down when its deadline passes: a read blocked on it returns at once, whatever
    the request was doing. The socket comes from the connection that sends the request (`_Watched`)."""

    def __init__(self, seconds: float):
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.expired = self._done = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        _in_flight.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        _in_flight.deadline = None
        self._timer.cancel()
        with self._lock:  # a connection back in the pool is never shut down by a late timer
            self._done = True

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _Watched:
    """Connection mixin: hands the socket to the deadline of the request in flight before waiting for its answer."""

    sock: socket.socket | None

    def getresponse(self):
        deadline = getattr(_in_flight, "deadline", None)
        if deadline is not None and self.sock is not None:
            deadline.attach(self.sock)
        return super().getresponse()


class _HTTPConnection(_Watched, HTTPConnection):
    pass


class _HTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter whose connection pools make `_Watched` connections."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


__all__ = [
    "API_KEY_ENV",
    "HTTPFailure",
    "JSONClient",
    "MAX_BACKOFF",
    "RETRY_STATUS",
    "Rejected",
    "Retryable",
    "Unauthorized",
    "api_key",
    "backoff",
]
