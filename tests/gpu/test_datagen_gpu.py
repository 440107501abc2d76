"""GPU check of datagen's transformers backend at a real model size (skipped without CUDA).

The GPU machines here have no vLLM (its wheel is too large to bring), so this runs the transformers backend: a
Llama-3.1-8B-shaped verifier with random weights (no hub access), bf16, on one GPU. It checks the vLLM layer-id
convention at that size (id i == output_hidden_states[i], id n pre-norm), batch-of-1 vs batch-of-N parity, and reports
tokens/s and memory.

    SPECULATORS_HF_GPU_LAYERS=32 pytest tests/gpu/test_datagen_gpu.py -q -s
"""

import os
import time

import pytest
import torch

from speculators_hf.datagen import HFHiddenStatesBackend
from speculators_hf.modeling.configuration_eagle3 import default_aux_layer_ids

pytestmark = pytest.mark.gpu


def llama8b_shaped(num_layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def test_transformers_backend_at_8b_size():
    n = int(os.environ.get("SPECULATORS_HF_GPU_LAYERS", "32"))
    model = llama8b_shaped(n)
    layer_ids = default_aux_layer_ids(n) + [n]
    backend = HFHiddenStatesBackend(model, layer_ids)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 128000, (length,), generator=g).tolist() for length in (2048, 1500, 900, 64) * 2]
    backend.extract(batch[:2])  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    states = backend.extract(batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(map(len, batch))
    print(
        f"\n{n} layers, bf16, batch {len(batch)}: {tokens / seconds:.0f} tokens/s, "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB on {torch.cuda.get_device_name()}"
    )
    assert [s.shape for s in states] == [(len(b), 4, 4096) for b in batch]
    assert all(s.dtype == torch.bfloat16 for s in states)

    ids = torch.tensor([batch[3]], device="cuda")
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    alone = backend.extract([batch[3]])[0]
    for k, layer_id in enumerate(layer_ids[:-1]):
        torch.testing.assert_close(alone[:, k], hidden[layer_id][0].cpu())
    torch.testing.assert_close(model.model.norm(alone[:, -1].cuda()).cpu(), hidden[n][0].cpu())
    # Right-padded batching must not change a sample's states beyond bf16 kernel noise.
    diff = (alone.float() - states[3].float()).abs().max().item()
    assert diff < 0.1, diff
