"""Generation with transformers: any causal LM on CPU or GPU, batched `generate` with left padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

from ..utils import UserError
from .generation import Generation, GenerationRequest, finish
from .sampling import Sampling


class TransformersEngine:
    """Batched `model.generate` over token-id prompts; prompts of similar length are batched together.

    Args:
        model_path (`str`): the verifier.
        sampling (`Sampling`): temperature/top-p/top-k and stop ids (greedy when the temperature is 0).
        dtype (`str`): torch dtype name.
        batch_size (`int`): prompts per `generate` call.
        max_model_len (`int`): the longest prompt + answer accepted.
        revision (`str`, *optional*): the verifier's revision.
        trust_remote_code (`bool`): run code from the verifier's folder (`auto_map`); only with the user's consent.
    """

    name = "transformers"

    def __init__(
        self,
        model_path: str,
        sampling: Sampling,
        dtype: str = "float32",
        batch_size: int = 32,
        max_model_len: int = 2048,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        self.version = transformers.__version__
        self.sampling = sampling
        self.batch_size = batch_size
        self.max_model_len = max_model_len
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=getattr(torch, dtype), revision=revision, trust_remote_code=trust_remote_code
            )
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"--target-model-path {model_path}: cannot load the model ({first}).") from err
        self.model.to(self.device).eval()
        config = self.model.config
        pad = getattr(config, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (sampling.stop_token_ids or (0,))[0])

    def _generation_config(self, max_new_tokens: int) -> GenerationConfig:
        s = self.sampling
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            eos_token_id=list(s.stop_token_ids) or None,
            pad_token_id=self.pad_id,
            do_sample=not s.greedy,
        )
        if not s.greedy:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        return GenerationConfig(**kwargs)

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        results: list[Generation | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(requests[i].prompt_ids) for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [B, T], left padded
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
            for row, i in enumerate(batch):
                ids = requests[i].prompt_ids
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            limit = max(requests[i].max_new_tokens for i in batch)
            if not self.sampling.greedy:
                torch.manual_seed(requests[batch[0]].seed or self.sampling.seed)
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=self._generation_config(limit),
            )  # [B, T + new]
            new = out[:, width:].tolist()
            for row, i in enumerate(batch):
                results[i] = finish(new[row], requests[i].max_new_tokens, self.sampling.stop_token_ids)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None
