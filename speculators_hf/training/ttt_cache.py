"""The KV cache of the TTT unroll, safe under gradient checkpointing.

Step k of the unroll attends to the keys/values of steps 0..k. A `DynamicCache` appends on every write, so the replay
of a layer's forward that gradient checkpointing runs in backward would append step k's keys a second time (and
transformers therefore drops the cache under checkpointing, which breaks step 1). Here each step writes its own slot:
`TTTCache.step(k)` is the `past_key_values` of step k; its `update` (re)places slot k and returns slots 0..k
concatenated, so a replay reads exactly what the first pass read. The gradient still flows from step k's attention
into the keys/values of earlier steps (non-reentrant checkpointing keeps the graph of the first pass).
"""

from __future__ import annotations

import torch


class TTTCache:
    """Per-layer, per-step keys and values of one TTT unroll (`[B, kv_heads, S, head_dim]` each)."""

    def __init__(self):
        self.slots: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def step(self, k: int) -> TTTStepCache:
        return TTTStepCache(self, k)


class TTTStepCache:
    """The view of a `TTTCache` that TTT step `k` passes to the draft as `past_key_values`."""

    replay_safe = True  # writes are idempotent: a checkpointed layer may keep it (see the module docstring)

    def __init__(self, cache: TTTCache, k: int):
        self.cache, self.k = cache, k

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        slots = self.cache.slots.setdefault(layer_idx, [])
        if len(slots) < self.k:
            raise RuntimeError(f"TTT step {self.k} of layer {layer_idx} ran before steps 0..{self.k - 1}.")
        if len(slots) == self.k:
            slots.append((key_states, value_states))
        else:  # a replay under gradient checkpointing: the same values again
            slots[self.k] = (key_states, value_states)
        keys, values = zip(*slots[: self.k + 1])
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)  # [B, kv_heads, (k + 1) S, head_dim]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached before this step (what a causal default mask would offset positions by)."""
        return sum(key.shape[-2] for key, _ in self.cache.slots.get(layer_idx, [])[: self.k])
