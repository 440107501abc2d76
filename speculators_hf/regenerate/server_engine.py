"""Generation against running OpenAI-compatible vLLM servers (`vllm serve VERIFIER`), with the standard library only.

Each request is `POST <url>/v1/completions` with the prompt as token ids (rendered here, so the server sees exactly the
ids every other engine sees), explicit sampling values, the stop ids and `return_token_ids` (the answer comes back as
ids, not re-tokenised text). URLs are used round-robin; a request that times out, cannot connect or gets HTTP
408/409/425/429/5xx is retried on the next URL after an exponential backoff. When the retries are spent the run stops
with one line (`ServerUnavailable`); finished conversations are already saved and a rerun resumes.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ..utils import UserError, get_logger
from .generation import Generation, GenerationRequest, finish
from .sampling import Sampling

logger = get_logger(__name__)

RETRY_STATUS = {408, 409, 425, 429}
MAX_BACKOFF = 60.0


class ServerUnavailable(UserError):
    """The servers could not answer after every retry (one line for the CLI)."""


class _Retryable(Exception):
    pass


class ServerEngine:
    """Round-robin client of one or more vLLM OpenAI-compatible servers.

    Args:
        urls (`list[str]`): base URLs (`http://host:port`, with or without `/v1`).
        sampling (`Sampling`): explicit sampling values and stop ids, sent with every request.
        concurrency (`int`): requests in flight at once (over all URLs) when `generate` gets many requests.
        timeout (`float`): seconds per request. max_retries (`int`), backoff (`float`): see the module docstring.
    """

    name = "vllm-server"

    def __init__(
        self,
        urls: Sequence[str],
        sampling: Sampling,
        concurrency: int = 64,
        timeout: float = 600.0,
        max_retries: int = 5,
        backoff: float = 1.0,
    ):
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in urls]
        self.sampling = sampling
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._next = itertools.count()
        self._lock = threading.Lock()
        models = [self._call(url, "/v1/models", None, pinned=True)["data"][0] for url in self.urls]
        self.model = models[0]["id"]
        if len({m["id"] for m in models}) > 1:
            raise UserError(f"--server-url: the servers serve different models {[m['id'] for m in models]}.")
        lengths = [m.get("max_model_len") for m in models if m.get("max_model_len")]
        self.max_model_len = int(min(lengths)) if lengths else 0
        try:
            self.version = "vllm " + str(self._call(self.urls[0], "/version", None, pinned=True).get("version"))
        except UserError:
            self.version = "unknown"

    # ------------------------------------------------------------------------------------------------ requests

    def _pick(self) -> str:
        with self._lock:
            return self.urls[next(self._next) % len(self.urls)]

    def _once(self, url: str, path: str, body: dict | None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            url + path, data=data, headers={"Content-Type": "application/json"}, method="POST" if data else "GET"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300].replace("\n", " ")
            if err.code in RETRY_STATUS or err.code >= 500:
                raise _Retryable(f"HTTP {err.code} {detail}") from err
            raise UserError(f"HTTP {err.code}: {detail}") from err
        except urllib.error.URLError as err:
            raise _Retryable(f"cannot connect ({err.reason})") from err
        except (TimeoutError, ConnectionError, OSError) as err:
            raise _Retryable(f"{type(err).__name__}: {err or 'timed out'}") from err

    def _call(self, url: str | None, path: str, body: dict | None, pinned: bool = False) -> dict:
        """One request with retries (on the next URL each time unless `pinned`)."""
        url = url or self._pick()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF))
                url = url if pinned else self._pick()
            try:
                return self._once(url, path, body)
            except _Retryable as err:
                last = f"{url}: {err}"
                logger.info("request %s failed (%s); attempt %d of %d", path, err, attempt + 1, self.max_retries + 1)
        raise ServerUnavailable(
            f"--server-url {last} after {self.max_retries + 1} attempts; check that `vllm serve` runs there "
            "(finished conversations are saved: rerun the same command to resume)."
        )

    def complete(self, request: GenerationRequest) -> Generation:
        """One prompt -> one `Generation` (thread-safe)."""
        s = self.sampling
        body = {
            "model": self.model,
            "prompt": list(request.prompt_ids),
            "max_tokens": request.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k if s.top_k > 0 else -1,
            "stop_token_ids": list(s.stop_token_ids),
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        try:
            response = self._call(None, "/v1/completions", body)
        except ServerUnavailable:
            raise
        except UserError as err:  # a non-retryable answer to this one request
            return Generation([], "error", error=str(err))
        choice = response["choices"][0]
        if choice.get("token_ids") is None:
            raise UserError("--server-url: the server returns no token ids (`return_token_ids`): use vLLM >= 0.11.")
        if choice.get("prompt_token_ids") is not None and list(choice["prompt_token_ids"]) != list(request.prompt_ids):
            raise UserError("--server-url: the server processed other prompt tokens than were sent.")
        return finish(list(choice["token_ids"]), request.max_new_tokens, s.stop_token_ids)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.complete, requests))

    def close(self) -> None:
        pass
