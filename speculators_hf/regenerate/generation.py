"""What every generation engine takes and returns, below the engines (each engine module and the rollout import it).

An engine takes token-id prompts (rendered by the caller with the verifier's chat template) and returns the token ids
the verifier produced, the stop token included when one ended the turn. Engines: transformers (`hf_engine`), vLLM
in-process (`vllm_engine`) and running OpenAI-compatible servers (`server_engine`); `engines` picks one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int | None = None  # per-request sampling seed (None when greedy)


@dataclass
class Generation:
    token_ids: list[int]  # what the verifier produced, the stop token included when one ended the turn
    finish_reason: str  # "stop" or "length"
    error: str | None = None  # set when this one request failed (the conversation is recorded as failed)


class Engine(Protocol):
    name: str  # "transformers", "vllm" or "vllm-server"
    version: str
    max_model_len: int  # the longest prompt + answer the engine accepts

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One `Generation` per request, in order."""

    def close(self) -> None: ...


def finish(token_ids: list[int], limit: int, stop_ids: Sequence[int]) -> Generation:
    """Cut raw generated ids at the first stop token (kept) or at `limit`."""
    stops = set(stop_ids)
    for i, t in enumerate(token_ids[:limit]):
        if t in stops:
            return Generation(list(token_ids[: i + 1]), "stop")
    return Generation(list(token_ids[:limit]), "length")
