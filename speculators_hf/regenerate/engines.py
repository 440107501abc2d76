"""The one small interface every generation engine implements, and engine selection.

An engine takes token-id prompts (rendered by the caller with the verifier's chat template) and returns the token ids
the verifier produced, the stop token included when one ended the turn. Engines: transformers (`hf_engine`), vLLM
in-process (`vllm_engine`) and running OpenAI-compatible servers (`server_engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..utils import UserError
from .sampling import Sampling


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


def resolve_backend_name(args) -> str:
    if args.server_url:
        return "vllm-server"
    if args.backend != "auto":
        return args.backend
    from ..utils import vllm_is_available

    return "vllm" if vllm_is_available() else "transformers"


def make_engine(args, sampling: Sampling, dtype: str, model_config) -> Engine:
    """The engine `args` asks for (a `ServerEngine` checks its servers before returning)."""
    name = resolve_backend_name(args)
    if name == "vllm-server":
        from .server_engine import ServerEngine

        return ServerEngine(
            args.server_url,
            sampling,
            concurrency=args.concurrency,
            timeout=args.request_timeout,
            max_retries=args.max_retries,
            backoff=args.retry_backoff,
            api_key=args.server_api_key,
        )
    if name == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(
            args.target_model_path,
            sampling,
            dtype=dtype,
            max_model_len=args.max_model_len,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            revision=args.revision,
        )
    if args.tensor_parallel_size > 1:
        raise UserError("--tensor-parallel-size > 1 needs --backend vllm (the transformers engine uses one device).")
    from .hf_engine import TransformersEngine

    return TransformersEngine(
        args.target_model_path,
        sampling,
        dtype=dtype,
        batch_size=args.batch_size,
        max_model_len=args.max_model_len or getattr(model_config, "max_position_embeddings", None) or 2048,
        revision=args.revision,
    )
