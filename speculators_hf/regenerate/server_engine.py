"""Generation against running OpenAI-compatible vLLM servers (`vllm serve VERIFIER`), through `speculators_hf.http`.

Each request is `POST <url>/v1/completions` with the prompt as token ids (rendered here, so the server sees exactly the
ids every other engine sees), explicit sampling values, the stop ids and `return_token_ids` (the answer comes back as
ids, not re-tokenised text). URLs are used round-robin; a request that cannot connect, gets HTTP 408/409/425/429/5xx
or has no complete answer within `--request-timeout` seconds (in all: a server that trickles bytes is cut) is retried
on the next URL after an exponential backoff (`http.backoff`). When the retries are spent the run stops with one line
(`ServerUnavailable`); finished conversations are already saved and a rerun resumes.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ..http import JSONClient, Rejected, Retryable, Unauthorized, backoff
from ..http import api_key as resolve_api_key
from ..utils import UserError, get_logger
from .generation import Generation, GenerationRequest, finish
from .sampling import Sampling

logger = get_logger(__name__)

KEY_FLAG = "--server-api-key"


class ServerUnavailable(UserError):
    """The servers could not answer after every retry, or refused the API key (one line for the CLI)."""


class ServerEngine:
    """Round-robin client of one or more vLLM OpenAI-compatible servers.

    Args:
        urls (`list[str]`): base URLs (`http://host:port`, with or without `/v1`).
        sampling (`Sampling`): explicit sampling values and stop ids, sent with every request.
        concurrency (`int`): requests in flight at once (over all URLs) when `generate` gets many requests.
        timeout (`float`): seconds per request, in all. max_retries (`int`), backoff (`float`): see the module
            docstring.
        api_key (`str`, *optional*): the servers' `--api-key` (default: `$SPECULATORS_HF_API_KEY`).
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
        api_key: str | None = None,
    ):
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in urls]
        self.sampling = sampling
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.http = JSONClient(resolve_api_key(api_key), key_flag=KEY_FLAG, pool_size=concurrency)
        self._next = itertools.count()
        self._lock = threading.Lock()
        models = [self._model(url) for url in self.urls]
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

    def _model(self, url: str) -> dict:
        data = self._call(url, "/v1/models", None, pinned=True).get("data")
        if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise UserError(f"--server-url {url}: /v1/models lists no model; is it a vLLM server?")
        return data[0]

    def _pick(self) -> str:
        with self._lock:
            return self.urls[next(self._next) % len(self.urls)]

    def _call(self, url: str | None, path: str, body: dict | None, pinned: bool = False) -> dict:
        """One request with retries (on the next URL each time unless `pinned`)."""
        url = url or self._pick()
        last, retry_after = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(backoff(attempt, self.backoff, retry_after))
                url = url if pinned else self._pick()
            try:
                answer = self.http.request("GET" if body is None else "POST", url + path, body, timeout=self.timeout)
                if isinstance(answer, dict):
                    return answer
                raise Retryable(url + path, "answered with JSON other than an object")
            except Retryable as err:
                last, retry_after = f"{url}: {err.problem}", err.retry_after
                logger.info("request %s failed (%s); attempt %d of %d", path, err, attempt + 1, self.max_retries + 1)
            except Unauthorized as err:
                raise ServerUnavailable(f"--server-url {err}.") from err
            except Rejected as err:
                raise UserError(f"--server-url {err}.") from err
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
        choices = response.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise UserError("--server-url: the server's answer holds no choices: is it a vLLM server?")
        choice = choices[0]
        if choice.get("token_ids") is None:
            raise UserError("--server-url: the server returns no token ids (`return_token_ids`): use vLLM >= 0.11.")
        if choice.get("prompt_token_ids") is not None and list(choice["prompt_token_ids"]) != list(request.prompt_ids):
            raise UserError("--server-url: the server processed other prompt tokens than were sent.")
        return finish(list(choice["token_ids"]), request.max_new_tokens, s.stop_token_ids)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.complete, requests))

    def close(self) -> None:
        self.http.close()
