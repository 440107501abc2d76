"""Engine selection: `--server-url` -> the servers, else `--backend` (`auto`: vLLM in-process when installed)."""

from __future__ import annotations

from ..utils import UserError, vllm_is_available
from .arguments import RegenerateArguments
from .generation import Engine
from .hf_engine import TransformersEngine
from .sampling import Sampling
from .server_engine import ServerEngine
from .vllm_engine import VLLMEngine


def resolve_backend_name(args: RegenerateArguments) -> str:
    if args.server_url:
        return "vllm-server"
    if args.backend != "auto":
        return args.backend
    return "vllm" if vllm_is_available() else "transformers"


def make_engine(args: RegenerateArguments, sampling: Sampling, dtype: str, model_config) -> Engine:
    """The engine `args` asks for (a `ServerEngine` checks its servers before returning)."""
    name = resolve_backend_name(args)
    if name == "vllm-server":
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
        return VLLMEngine(
            args.target_model_path,
            sampling,
            dtype=dtype,
            max_model_len=args.max_model_len,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            revision=args.revision,
            trust_remote_code=args.trust_remote_code,
        )
    if args.tensor_parallel_size > 1:
        raise UserError("--tensor-parallel-size > 1 needs --backend vllm (the transformers engine uses one device).")
    return TransformersEngine(
        args.target_model_path,
        sampling,
        dtype=dtype,
        batch_size=args.batch_size,
        max_model_len=args.max_model_len or getattr(model_config, "max_position_embeddings", None) or 2048,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )
