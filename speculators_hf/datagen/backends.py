"""The small interface both hidden-state backends implement, layer-id defaults, and backend selection."""

from __future__ import annotations

from typing import Protocol

import torch

from ..modeling.configuration_eagle3 import AUX_LAYER_ORDER, default_aux_layer_ids
from ..utils import UserError, get_logger, vllm_is_available
from .hf_backend import HFHiddenStatesBackend, check_layer_ids
from .vllm_backend import VLLMHiddenStatesBackend

logger = get_logger(__name__)

# Recorded in data_config.json as "<name>: <meaning>"; training reads the name before the colon.
LAYER_ID_CONVENTION = (
    "vllm: id i < n is the input to decoder layer i (hidden + residual, 0 = embeddings); id n is the output of the "
    "last decoder layer before the final norm. The aux ids are the ones vLLM captures at serve time, stored ascending."
)
# vllm-project/speculators 0.3.0 (the seed's data_*.pt with its data_config.json) captured the *output* of layer i.
SEED_LAYER_ID_CONVENTION = "speculators-0.3.0: id i is the output of decoder layer i (= vLLM id i + 1)."


class HiddenStatesBackend(Protocol):
    name: str
    layer_ids: list[int]

    def extract(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """Token id lists -> one `[T_i, len(layer_ids), H]` tensor per sample."""

    def close(self) -> None: ...


def resolve_layer_ids(layer_ids: list[int] | None, num_hidden_layers: int) -> list[int]:
    """`--layer-ids` (sorted ascending, see `aux_layer_ids_problem`), or the default `[2, n//2, n-3, n]`; checked
    against the verifier's layer count. The last id is `n` (the training targets)."""
    n = num_hidden_layers
    if not layer_ids:
        return default_aux_layer_ids(n) + [n]
    check_layer_ids(layer_ids, n)
    if len(set(layer_ids)) != len(layer_ids):
        raise UserError(f"--layer-ids {layer_ids} repeats an id.")
    ordered = sorted(layer_ids)
    if ordered[-1] != n or len(ordered) < 2:
        raise UserError(
            f"--layer-ids {layer_ids}: give the aux ids then {n} (the last layer, pre-norm: the training targets); "
            f"the verifier has {n} decoder layers."
        )
    if ordered != list(layer_ids):
        logger.warning(
            "--layer-ids %s stored as %s: %s, so datagen stores them ascending too.",
            layer_ids,
            ordered,
            AUX_LAYER_ORDER,
        )
    return ordered


def resolve_backend_name(backend: str) -> str:
    if backend != "auto":
        return backend
    return "vllm" if vllm_is_available() else "transformers"


def make_backend(
    name: str,
    model_path: str,
    layer_ids: list[int],
    dtype: str,
    max_model_len: int,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    seed: int = 0,
    storage_dir: str | None = None,
    trust_remote_code: bool = False,
) -> HiddenStatesBackend:
    """The backend `name` (`vllm` or `transformers`) with the verifier loaded (its own code runs only with
    `trust_remote_code`, the user's `--trust-remote-code`)."""
    if name == "vllm":
        return VLLMHiddenStatesBackend(
            model_path,
            layer_ids,
            max_model_len=max_model_len,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            storage_dir=storage_dir,
            trust_remote_code=trust_remote_code,
        )
    if tensor_parallel_size > 1:
        raise UserError("--tensor-parallel-size > 1 needs --backend vllm (the transformers backend uses one device).")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return HFHiddenStatesBackend.from_pretrained(
        model_path, layer_ids, dtype=getattr(torch, dtype), device=device, trust_remote_code=trust_remote_code
    )
