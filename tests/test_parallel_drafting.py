"""Parallel drafting (P-EAGLE): the training forward equals vLLM's slot layout, the config and checkpoint vLLM 0.32
reads for `peagle`, and a trained parallel draft through export."""

import json

import pytest
import torch
from safetensors import safe_open

from speculators_hf import Eagle3Config, Eagle3DraftModel
from speculators_hf.export import check_checkpoint
from speculators_hf.modeling.losses import ttt_attention_mask
from speculators_hf.tiny_kit import tiny_llama_config
from speculators_hf.training.trainer import ttt_unroll
from speculators_hf.utils import UserError
from tests.test_modeling import VD, inputs, mapping

MASK = 7


def parallel_draft(**options):
    config = Eagle3Config.from_verifier(
        tiny_llama_config(), draft_vocab_size=VD, parallel_drafting=True, mask_token_id=MASK, **options
    )
    torch.manual_seed(0)
    model = Eagle3DraftModel(config)
    model.set_vocab_mapping(*mapping())
    return model.eval()


@pytest.mark.parametrize("options", [{}, {"num_hidden_layers": 2, "fc_norm": True, "sliding_window": 4}])
def test_parallel_training_steps_equal_vllm_slot_layout(options):
    """The training forward (`ttt_unroll` with mask slots, the trainer's masks) gives, at every row t and slot k, the
    logits of the serving forward: rows 0..t then K-1 mask slots (token `mask_token_id`, state `fuse(mask_hidden)`,
    positions t+1..t+K-1) under plain causal attention, output t+k predicting token k+1, as vLLM lays them out; in
    one pass from scratch and after a prefill of rows 0..t-1 (how our engine drafts), and `draft` takes its argmax."""
    model = parallel_draft(**options)
    T, K = 8, 3
    ids, aux = inputs(model.config, B=1, T=T)
    docs, positions = torch.zeros(1, T, dtype=torch.long), torch.arange(T)[None]
    window = model.config.sliding_window
    step0 = ttt_attention_mask(docs, 0, sliding_window=window)
    masks = [ttt_attention_mask(docs, k, step0, sliding_window=window) for k in range(K)]
    with torch.no_grad():
        states = ttt_unroll(model, ids, aux, positions, masks, parallel=True)  # K x [1, T, H]
        trained = [model.lm_head(s)[0] for s in states]  # K x [T, Vd]
        for t in range(T):
            served, _ = model.parallel_logits(ids[:, : t + 1], aux[:, : t + 1], K)  # [1, K, Vd]
            cache = None
            if t:
                prefill = model(ids[:, :t], aux_hidden_states=aux[:, :t], use_cache=True)
                cache = prefill.past_key_values
            extended, cache = model.parallel_logits(ids[:, t : t + 1], aux[:, t : t + 1], K, cache)
            assert cache.get_seq_length() == t + K  # the slots' keys after the rows': the caller crops them
            for k in range(K):
                torch.testing.assert_close(served[0, k], trained[k][t], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(extended[0, k], trained[k][t], atol=1e-5, rtol=1e-5)
        drafted, _ = model.draft(ids, aux, K)
        assert drafted[0].tolist() == model.draft_to_target_ids(served[0].argmax(-1)).tolist()
        # the mask slots read mask_hidden, not the chained state: a chained unroll gives other logits at k >= 1
        chained = ttt_unroll(model, ids, aux, positions, masks, parallel=False)
        assert torch.equal(chained[0], states[0]) and not torch.allclose(chained[1], states[1])


def test_parallel_loss_trains_mask_hidden(tiny_verifier_path):
    """The fused loss over a parallel unroll reaches `mask_hidden` (vLLM's one learned input of the mask slots)."""
    from speculators_hf.modeling.losses import ttt_valid_rows

    model = parallel_draft().train()
    model.load_verifier_head(str(tiny_verifier_path))
    T, K = 8, 3
    ids, aux = inputs(model.config, B=1, T=T)
    docs = torch.zeros(1, T, dtype=torch.long)
    step0 = ttt_attention_mask(docs, 0)
    states = ttt_unroll(model, ids, aux, torch.arange(T)[None], [ttt_attention_mask(docs, k, step0) for k in range(K)],
                        parallel=True)  # fmt: skip
    last = torch.randn(1, T, model.config.hidden_size)
    out = model(ttt_hidden_states=states, verifier_last_hidden_states=last, loss_mask=ttt_valid_rows(
        torch.ones(1, T), docs, K))  # fmt: skip
    out.loss.backward()
    assert model.mask_hidden.grad is not None and model.mask_hidden.grad.abs().sum() > 0


def saved_peagle_draft(folder, **options) -> tuple[Eagle3Config, Eagle3DraftModel, dict]:
    """A parallel-drafting draft of the tiny verifier saved in `folder`: its config, the model and the saved config."""
    config = Eagle3Config.from_verifier(
        tiny_llama_config(),
        draft_vocab_size=VD,
        parallel_drafting=True,
        mask_token_id=MASK,
        verifier_name_or_path="org/verifier",
        **options,
    )
    model = Eagle3DraftModel(config)
    model.set_vocab_mapping(*mapping())
    model.save_pretrained(folder)
    return config, model, json.loads((folder / "config.json").read_text())


def test_peagle_config_and_checkpoint_are_what_vllm_reads(tmp_path):
    config, model, saved = saved_peagle_draft(tmp_path, fc_norm=True)
    assert saved["speculators_model_type"] == "peagle" and saved["speculators_config"]["algorithm"] == "peagle"
    assert saved["mask_token_id"] == MASK and saved["architectures"] == ["PeagleLlamaForCausalLM"]
    assert saved["transformer_layer_config"]["fc_norm"] is True  # vLLM's peagle reader copies no fc_norm itself
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_slice("mask_hidden").get_shape() == [1, 3 * config.hidden_size]
    check_checkpoint(tmp_path)
    loaded = Eagle3DraftModel.from_pretrained(tmp_path)
    assert loaded.config.parallel_drafting and loaded.config.mask_token_id == MASK
    assert torch.equal(loaded.mask_hidden, model.mask_hidden)

    # a chained draft's config is unchanged: no parallel keys
    chained = Eagle3Config.from_verifier(tiny_llama_config(), draft_vocab_size=VD).to_dict()
    assert chained["speculators_model_type"] == "eagle3" and "mask_token_id" not in chained
    assert "parallel_drafting" not in json.dumps(chained)


def test_export_check_refuses_a_peagle_draft_without_mask_hidden_or_token(tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, saved = saved_peagle_draft(tmp_path)
    with pytest.raises(UserError, match="mask_token_id"):
        check_checkpoint(tmp_path, {k: v for k, v in saved.items() if k != "mask_token_id"})
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["mask_hidden"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing tensors \['mask_hidden'\]"):
        check_checkpoint(tmp_path)
    with pytest.raises(UserError, match="mask_token_id"):
        Eagle3Config.from_verifier(tiny_llama_config(), parallel_drafting=True)
