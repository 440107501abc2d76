"""Online speculative decoding in transformers: chain drafting, then greedy or sampled verification, KV caches on both
sides.

One step, with `pending` the last accepted token (not yet in the verifier cache):

    draft   d_1..d_K      from the draft (greedy), fed the verifier's aux states of every accepted position
    verify  [pending, d_1..d_K] in one verifier forward -> distributions p_0..p_K
    accept  temperature 0: the longest prefix with d_i == argmax p_{i-1} (n tokens), plus the bonus token argmax p_n;
            temperature T > 0: the speculative-sampling rule (`speculative_sample`) on p = softmax(logits / T)
    crop    verifier cache to the accepted positions; draft cache to the rows fed with verifier states

At temperature 0 the output is the verifier's greedy output, token for token (verification only ever emits verifier
argmaxes); at T > 0 it is distributed exactly as sampling from the verifier at T (not the same tokens as a seeded
`generate`: the random numbers are used differently).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache

from ..datagen.hf_backend import capture_layer_inputs
from ..utils import get_logger

logger = get_logger(__name__)


@dataclass
class SpecDecodeResult:
    """Counters of a speculative decoding run (the same meaning as vLLM's `spec_decode` metrics).

    Args:
        engine (`str`): `"transformers"` or `"vllm"`.
        num_speculative_tokens (`int`): K, draft tokens per step (chain drafting, greedy drafts).
        temperature (`float`): 0 for greedy verification, else the verifier's sampling temperature.
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
    temperature: float = 0.0
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
        """Output tokens/s with the draft over the verifier alone (the time ratio when both emit the same tokens)."""
        if not self.spec_seconds or not self.baseline_seconds:
            return None
        if self.baseline_ids is None:
            return self.baseline_seconds / self.spec_seconds
        spec_tokens, base_tokens = sum(map(len, self.output_ids)), sum(map(len, self.baseline_ids))
        if not spec_tokens or not base_tokens:
            return None
        return (spec_tokens / self.spec_seconds) / (base_tokens / self.baseline_seconds)

    @property
    def matches_baseline(self) -> bool | None:
        """Same ids as the verifier alone: checked at temperature 0 only (sampled outputs differ by design)."""
        if self.baseline_ids is None or self.temperature > 0:
            return None
        return self.output_ids == self.baseline_ids

    def summary(self) -> dict:
        """Numbers for the eval card (no token ids)."""
        return {
            "engine": self.engine,
            "engine_version": self.engine_version,
            "num_speculative_tokens": self.num_speculative_tokens,
            "temperature": self.temperature,
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


def speculative_sample(
    target_probs: torch.Tensor,
    drafted: list[int],
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """The speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023) for one chain of drafts.

    Draft token `d_i` is accepted with probability `min(1, p_i(d_i) / q_i(d_i))`; at the first rejection the next token
    is sampled from `norm(max(p_i - q_i, 0))`, and when all K are accepted the bonus token is sampled from `p_K`. The
    emitted tokens are then distributed exactly as sampling from the verifier. Greedy drafting (`draft_probs=None`)
    is the case `q_i = one-hot(d_i)`: accept with probability `p_i(d_i)`, else sample from `p_i` without `d_i`.

    Args:
        target_probs (`torch.Tensor` `[K + 1, V]`): the verifier's distributions at `pending, d_1..d_K`.
        drafted (`list[int]`): the K drafted token ids.
        draft_probs (`torch.Tensor` `[K, V]`, *optional*): the draft's distributions the drafts were sampled from.
    Returns:
        `(n, token)`: the number of accepted drafts and the token emitted after them.
    """
    k = len(drafted)
    device = target_probs.device
    uniform = torch.rand(k, generator=generator, device=device)  # [K]
    for i, d in enumerate(drafted):
        p = target_probs[i, d]
        q = draft_probs[i, d] if draft_probs is not None else 1.0
        if uniform[i] * q < p:  # u < p / q
            continue
        if draft_probs is None:
            residual = target_probs[i].clone()  # [V]
            residual[d] = 0.0
        else:
            residual = (target_probs[i] - draft_probs[i]).clamp_min(0.0)  # [V]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return k, int(torch.multinomial(target_probs[k], 1, generator=generator))


class SpeculativeGenerator:
    """EAGLE-3 speculative decoding of one prompt at a time with a transformers verifier: greedy, or sampled at a
    temperature with the speculative-sampling rule.

    Args:
        verifier: the causal LM (eval mode). draft: an `Eagle3DraftModel` for it.
        num_speculative_tokens (`int`): K, the chain length.
        temperature (`float`): 0 (greedy verification) or the sampling temperature of the verifier.
    """

    def __init__(
        self, verifier: nn.Module, draft: nn.Module, num_speculative_tokens: int = 3, temperature: float = 0.0
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.verifier, self.draft = verifier.eval(), draft.eval()
        self.k = num_speculative_tokens
        self.temperature = temperature
        self.layer_ids = list(draft.config.eagle_aux_hidden_state_layer_ids)
        self.device = next(verifier.parameters()).device

    def _verify(self, ids: list[int], cache: DynamicCache, captured: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Verifier forward over `ids` -> (logits `[T, V]`, fused aux states `[1, T, A * H]`)."""
        out = self.verifier(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True)
        aux = torch.cat([captured[i] for i in self.layer_ids], dim=-1)  # [1, T, A * H]
        return out.logits[0], aux

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)  # [T, V]

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[int], list[int]]:
        """Returns `(generated ids, accepted count per verification step)`; `generator` seeds sampling (T > 0)."""
        greedy = self.temperature == 0
        # Full-length layers (no config): sliding-window layers (gpt-oss, Gemma-3, windowed drafts) cannot be cropped
        vcache, dcache = DynamicCache(), DynamicCache()
        with capture_layer_inputs(self.verifier, self.layer_ids) as captured:
            logits, aux = self._verify(prompt_ids, vcache, captured)
            if greedy:
                pending = int(logits[-1].argmax())
            else:
                pending = int(torch.multinomial(self._probs(logits[-1:])[0], 1, generator=generator))
            out, steps = [pending], []
            draft_ids = prompt_ids[1:] + [pending]  # row t: (state of position t, token t + 1)
            while len(out) < max_new_tokens and eos_token_id not in out:  # an accepted draft may be the EOS too
                base = dcache.get_seq_length()
                drafted, dcache = self.draft.draft(torch.tensor([draft_ids], device=self.device), aux, self.k, dcache)
                _crop(dcache, base + len(draft_ids))  # keep the rows fed with verifier states only
                drafted = drafted[0].tolist()
                cached = vcache.get_seq_length()
                logits, aux = self._verify([pending, *drafted], vcache, captured)  # logits [K + 1, V]
                if greedy:
                    preds = logits.argmax(-1).tolist()
                    n = 0
                    while n < self.k and drafted[n] == preds[n]:
                        n += 1
                    pending = preds[n]
                else:
                    n, pending = speculative_sample(self._probs(logits), drafted, generator=generator)
                _crop(vcache, cached + 1 + n)
                aux = aux[:, : n + 1]  # states of pending, d_1..d_n
                draft_ids = drafted[:n] + [pending]
                out += draft_ids
                steps.append(n)
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
    temperature: float = 0.0,
    seed: int = 0,
) -> SpecDecodeResult:
    """Speculative decoding of every prompt (batch 1) and, with `baseline`, the verifier alone via `generate`.

    At `temperature > 0` prompt i is sampled with a generator seeded `seed + i` (both runs). The speed-up is output
    tokens/s of speculative decoding over that of `generate`, same prompts.
    """
    gen = SpeculativeGenerator(verifier, draft, num_speculative_tokens, temperature)
    result = SpecDecodeResult(
        "transformers",
        num_speculative_tokens,
        len(prompts),
        accepted_per_position=[0] * num_speculative_tokens,
        engine_version=transformers.__version__,
        temperature=temperature,
        extra={"batch_size": 1, **({"seed": seed} if temperature > 0 else {})},
    )
    gen.generate(prompts[0], 4, eos_token_id)  # warm-up (first-call costs are no part of either timing)
    if baseline:
        verifier_baseline(verifier, prompts[:1], 4, eos_token_id)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=gen.device).manual_seed(seed + i)
        ids, steps = gen.generate(prompt, max_new_tokens, eos_token_id, generator)
        result.output_ids.append(ids)
        result.num_drafts += len(steps)
        for n in steps:
            for j in range(n):
                result.accepted_per_position[j] += 1
    result.spec_seconds = time.perf_counter() - start
    result.num_draft_tokens = result.num_drafts * num_speculative_tokens
    if baseline:
        result.baseline_ids, result.baseline_seconds = verifier_baseline(
            verifier, prompts, max_new_tokens, eos_token_id, temperature, seed
        )
    return result


@torch.no_grad()
def verifier_baseline(
    verifier: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> tuple[list[list[int]], float]:
    """The verifier alone: `generate` (KV cache), one prompt at a time; greedy at temperature 0, else pure sampling at
    `temperature` (no top-k/top-p), prompt i seeded `seed + i`. Returns `(ids, seconds)`."""
    device = next(verifier.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else {}
    config = GenerationConfig(
        **(sampling or {"do_sample": False}),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id if eos_token_id is not None else 0,
    )
    outputs, start = [], time.perf_counter()
    for i, prompt in enumerate(prompts):
        if temperature > 0:
            torch.manual_seed(seed + i)
        ids = verifier.generate(torch.tensor([prompt], device=device), generation_config=config)
        outputs.append(ids[0, len(prompt) :].tolist())
    return outputs, time.perf_counter() - start


def greedy_baseline(
    verifier: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None
) -> tuple[list[list[int]], float]:
    """The verifier alone, greedy (`verifier_baseline` at temperature 0). Returns `(ids, seconds)`."""
    return verifier_baseline(verifier, prompts, max_new_tokens, eos_token_id)
