"""Online speculative decoding in transformers: chain drafting, greedy verification, KV caches on both sides.

One step, with `pending` the last accepted token (not yet in the verifier cache):

    draft   d_1..d_K      from the draft, fed the verifier's aux states of every accepted position
    verify  [pending, d_1..d_K] in one verifier forward -> greedy predictions p_0..p_K
    accept  the longest prefix with d_i == p_{i-1} (n tokens), plus the bonus token p_n
    crop    verifier cache to the accepted positions; draft cache to the rows fed with verifier states

The output is the verifier's greedy output, token for token (verification only ever emits verifier argmaxes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..datagen.hf_backend import capture_layer_inputs
from ..utils import get_logger

logger = get_logger(__name__)


@dataclass
class SpecDecodeResult:
    """Counters of a speculative decoding run (the same meaning as vLLM's `spec_decode` metrics).

    Args:
        engine (`str`): `"transformers"` or `"vllm"`.
        num_speculative_tokens (`int`): K, draft tokens per step (chain drafting, greedy).
        num_drafts (`int`): verification steps. num_draft_tokens (`int`): drafted tokens (K per step).
        accepted_per_position (`list[int]`): steps whose draft token i was accepted (i = 0..K-1).
        spec_seconds / baseline_seconds (`float`): wall-clock time of generation with / without the draft.
        output_ids / baseline_ids (`list[list[int]]`): generated ids per prompt (prompt excluded).
    """

    engine: str
    num_speculative_tokens: int
    num_prompts: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    spec_seconds: float | None = None
    baseline_seconds: float | None = None
    output_ids: list[list[int]] = field(default_factory=list)
    baseline_ids: list[list[int]] | None = None
    engine_version: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_accepted_tokens(self) -> int:
        return sum(self.accepted_per_position)

    @property
    def tau(self) -> float:
        """Mean accepted length: tokens emitted per verification step, `1 + accepted / drafts`."""
        return 1.0 + self.num_accepted_tokens / max(self.num_drafts, 1)

    @property
    def acceptance_per_position(self) -> list[float]:
        """Fraction of steps whose draft token i was accepted (cumulative: position i needs 0..i-1 too)."""
        return [a / max(self.num_drafts, 1) for a in self.accepted_per_position]

    @property
    def speedup(self) -> float | None:
        if not self.spec_seconds or self.baseline_seconds is None:
            return None
        return self.baseline_seconds / self.spec_seconds

    @property
    def matches_baseline(self) -> bool | None:
        return None if self.baseline_ids is None else self.output_ids == self.baseline_ids

    def summary(self) -> dict:
        """Numbers for the eval card (no token ids)."""
        return {
            "engine": self.engine,
            "engine_version": self.engine_version,
            "num_speculative_tokens": self.num_speculative_tokens,
            "num_prompts": self.num_prompts,
            "generated_tokens": sum(map(len, self.output_ids)),
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_per_position": [round(a, 4) for a in self.acceptance_per_position],
            "tau": round(self.tau, 4),
            "spec_seconds": self.spec_seconds,
            "baseline_seconds": self.baseline_seconds,
            "speedup": None if self.speedup is None else round(self.speedup, 3),
            "output_matches_verifier_greedy": self.matches_baseline,
            **self.extra,
        }


def _crop(cache: DynamicCache, keep: int) -> None:
    """Keep the first `keep` positions of a cache."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


class SpeculativeGenerator:
    """Greedy EAGLE-3 speculative decoding of one prompt at a time with a transformers verifier.

    Args:
        verifier: the causal LM (eval mode). draft: an `Eagle3DraftModel` for it.
        num_speculative_tokens (`int`): K, the chain length.
    """

    def __init__(self, verifier: nn.Module, draft: nn.Module, num_speculative_tokens: int = 3):
        self.verifier, self.draft = verifier.eval(), draft.eval()
        self.k = num_speculative_tokens
        self.layer_ids = list(draft.config.eagle_aux_hidden_state_layer_ids)
        self.device = next(verifier.parameters()).device

    def _verify(self, ids: list[int], cache: DynamicCache, captured: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Verifier forward over `ids` -> (greedy predictions `[T]`, fused aux states `[1, T, A * H]`)."""
        out = self.verifier(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True)
        aux = torch.cat([captured[i] for i in self.layer_ids], dim=-1)  # [1, T, A * H]
        return out.logits[0].argmax(-1), aux

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None
    ) -> tuple[list[int], list[int]]:
        """Returns `(generated ids, accepted count per verification step)`."""
        # Full-length layers (no config): sliding-window layers (gpt-oss, Gemma-3, windowed drafts) cannot be cropped
        vcache, dcache = DynamicCache(), DynamicCache()
        with capture_layer_inputs(self.verifier, self.layer_ids) as captured:
            preds, aux = self._verify(prompt_ids, vcache, captured)
            pending = int(preds[-1])
            out, steps = [pending], []
            draft_ids = prompt_ids[1:] + [pending]  # row t: (state of position t, token t + 1)
            while len(out) < max_new_tokens and eos_token_id not in out:  # an accepted draft may be the EOS too
                base = dcache.get_seq_length()
                drafted, dcache = self.draft.draft(torch.tensor([draft_ids], device=self.device), aux, self.k, dcache)
                _crop(dcache, base + len(draft_ids))  # keep the rows fed with verifier states only
                drafted = drafted[0].tolist()
                cached = vcache.get_seq_length()
                preds, aux = self._verify([pending, *drafted], vcache, captured)
                preds = preds.tolist()
                n = 0
                while n < self.k and drafted[n] == preds[n]:
                    n += 1
                _crop(vcache, cached + 1 + n)
                aux = aux[:, : n + 1]  # states of pending, d_1..d_n
                draft_ids = drafted[:n] + [preds[n]]
                out += draft_ids
                steps.append(n)
                pending = preds[n]
        if eos_token_id is not None and eos_token_id in out:
            out = out[: out.index(eos_token_id) + 1]
        return out[:max_new_tokens], steps


def evaluate_transformers(
    draft: nn.Module,
    verifier: nn.Module,
    prompts: list[list[int]],
    num_speculative_tokens: int = 3,
    max_new_tokens: int = 64,
    eos_token_id: int | None = None,
    baseline: bool = True,
) -> SpecDecodeResult:
    """Speculative decoding of every prompt (batch 1, greedy) and, with `baseline`, the verifier alone via `generate`.

    The speed-up is wall-clock generation time of `generate` over that of speculative decoding, same prompts.
    """
    import transformers

    gen = SpeculativeGenerator(verifier, draft, num_speculative_tokens)
    result = SpecDecodeResult(
        "transformers",
        num_speculative_tokens,
        len(prompts),
        accepted_per_position=[0] * num_speculative_tokens,
        engine_version=transformers.__version__,
        extra={"batch_size": 1},
    )
    start = time.perf_counter()
    for prompt in prompts:
        ids, steps = gen.generate(prompt, max_new_tokens, eos_token_id)
        result.output_ids.append(ids)
        result.num_drafts += len(steps)
        for n in steps:
            for i in range(n):
                result.accepted_per_position[i] += 1
    result.spec_seconds = time.perf_counter() - start
    result.num_draft_tokens = result.num_drafts * num_speculative_tokens
    if baseline:
        result.baseline_ids, result.baseline_seconds = greedy_baseline(verifier, prompts, max_new_tokens, eos_token_id)
    return result


@torch.no_grad()
def greedy_baseline(
    verifier: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None
) -> tuple[list[list[int]], float]:
    """The verifier alone: `generate` (greedy, KV cache), one prompt at a time. Returns `(ids, seconds)`."""
    from transformers import GenerationConfig

    device = next(verifier.parameters()).device
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id if eos_token_id is not None else 0,
    )
    outputs, start = [], time.perf_counter()
    for prompt in prompts:
        ids = verifier.generate(torch.tensor([prompt], device=device), generation_config=config)
        outputs.append(ids[0, len(prompt) :].tolist())
    return outputs, time.perf_counter() - start
