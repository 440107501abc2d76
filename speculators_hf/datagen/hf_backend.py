"""Hidden-state extraction with transformers: any causal LM, CPU or GPU, in vLLM's layer-id convention.

Layer id `i < n` is the input to decoder layer `i` (a forward pre-hook on that layer); id `n` is the last layer's
output *before* the final norm (a pre-hook on the norm). `output_hidden_states[n]` would be post-norm: not used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from ..utils import UserError
from ..validation import pretrained_config


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """The decoder stack of a causal LM: `(decoder, layers, final_norm)`."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = next((m for m in (getattr(decoder, n, None) for n in ("layers", "h")) if m is not None), None)
    norm = next(
        (m for m in (getattr(decoder, n, None) for n in ("norm", "ln_f", "final_layernorm")) if m is not None), None
    )
    if layers is None or norm is None:
        raise UserError(f"Cannot find the decoder layers and final norm of {type(model).__name__}.")
    return decoder, layers, norm


@contextmanager
def capture_layer_inputs(model: nn.Module, layer_ids: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """While open, every forward of `model` stores state id `i` in the yielded dict (vLLM's convention: the input of
    decoder layer `i`; id `n` the input of the final norm, i.e. the last layer's pre-norm output)."""
    _, layers, norm = decoder_parts(model)
    captured: dict[int, torch.Tensor] = {}

    def hook(layer_id):
        def fn(module, args, kwargs):
            captured[layer_id] = (args[0] if args else kwargs["hidden_states"]).detach()

        return fn

    modules = {i: (layers[i] if i < len(layers) else norm) for i in layer_ids}
    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in modules.items()]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def check_layer_ids(layer_ids: list[int], num_hidden_layers: int) -> None:
    bad = [i for i in layer_ids if not 0 <= i <= num_hidden_layers]
    if bad:
        raise UserError(
            f"--layer-ids {layer_ids}: {bad} out of range; the verifier has {num_hidden_layers} decoder layers, so "
            f"ids run from 0 (embeddings) to {num_hidden_layers} (last layer, pre-norm); id i is the input to layer i."
        )


class HFHiddenStatesBackend:
    """Extract `[T, len(layer_ids), H]` hidden states per sample with a transformers forward pass.

    Args:
        model: a loaded causal LM (its dtype is the dtype of the states).
        layer_ids: ids in vLLM's convention, aux ids then the last layer `n`.
    """

    name = "transformers"

    def __init__(self, model: nn.Module, layer_ids: list[int]):
        self.model = model.eval()
        self.decoder, layers, _ = decoder_parts(model)
        self.num_hidden_layers = len(layers)
        check_layer_ids(layer_ids, self.num_hidden_layers)
        self.layer_ids = list(layer_ids)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        layer_ids: list[int],
        dtype: torch.dtype | str = "auto",
        device: str = "cpu",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ) -> HFHiddenStatesBackend:
        """Load the verifier; `attn_implementation` defaults to transformers' choice for it (sdpa where supported;
        eager for e.g. gpt-oss, whose attention sinks sdpa does not take). The verifier's own code (`auto_map`) runs
        only with `trust_remote_code=True`."""
        config = pretrained_config(path, "verifier", trust_remote_code=trust_remote_code)
        # Multimodal verifiers without a causal-LM class (Qwen2.5-VL): the whole model; only its text path runs
        causal = type(config) in AutoModelForCausalLM._model_mapping or "AutoModelForCausalLM" in (
            getattr(config, "auto_map", None) or {}
        )
        auto = AutoModelForCausalLM if causal else AutoModelForImageTextToText
        model = auto.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
        return cls(model.to(device), layer_ids)

    @torch.no_grad()
    def extract(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """Token id lists -> one `[T_i, L, H]` tensor per sample (right-padded forward, padding dropped)."""
        device = next(self.model.parameters()).device
        lengths = [len(ids) for ids in batch]
        T = max(lengths)
        input_ids = torch.zeros(len(batch), T, dtype=torch.long, device=device)
        attention_mask = torch.zeros(len(batch), T, dtype=torch.long, device=device)
        for b, ids in enumerate(batch):
            input_ids[b, : len(ids)] = torch.as_tensor(ids)
            attention_mask[b, : len(ids)] = 1

        with capture_layer_inputs(self.model, self.layer_ids) as captured:
            self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        stacked = torch.stack([captured[i] for i in self.layer_ids], dim=2)  # [B, T, L, H]
        return [stacked[b, :n].cpu() for b, n in enumerate(lengths)]

    def close(self) -> None:
        """Nothing to release: the model is freed with the backend."""
