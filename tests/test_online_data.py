"""Online training without servers: tokens-only datagen, the hidden-state spool transport, client failure modes."""

import json
from pathlib import Path

import pytest
import torch

from speculators_hf.datagen import DatagenArguments, ShardDataset, build_dataset
from speculators_hf.tiny_kit import write_chat_jsonl
from speculators_hf.training.data import PackedDataset

SEQ = 160


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", limit=24)


def datagen_args(model, data, out, cache, **kw):
    kw = {"seq_length": SEQ, "backend": "transformers", "shard_size_mb": 1, "batch_size": 8, **kw}
    return DatagenArguments(
        target_model_path=str(model), train_data_path=str(data), output_dir=str(out), cache_dir=str(cache), **kw
    )


@pytest.fixture(scope="module")
def full_and_tokens(tiny_verifier_path, chats, tmp_path_factory):
    root = tmp_path_factory.mktemp("datagen")
    full = build_dataset(datagen_args(tiny_verifier_path, chats, root / "full", root / "cache"))
    tokens = build_dataset(datagen_args(tiny_verifier_path, chats, root / "tokens", root / "cache", tokens_only=True))
    return root / "full", full, root / "tokens", tokens


def test_tokens_only_datagen_matches_full_datagen_without_states(full_and_tokens):
    full_dir, full, tokens_dir, tokens = full_and_tokens
    assert tokens["complete"] and tokens["samples"] == full["samples"] > 10 and tokens["tokens"] == full["tokens"]
    assert tokens["bytes"] * 100 < full["bytes"]  # 9 bytes a token instead of 4 x 64 fp32 states
    with_states, without = ShardDataset(full_dir), ShardDataset(tokens_dir)
    assert without.tokens_only and without.hidden_shape is None and with_states.hidden_shape == (4, 64)
    for i in range(len(with_states)):
        a, b = with_states[i], without[i]
        assert set(b) == {"input_ids", "loss_mask"}
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        assert with_states.sample_id(i) == without.sample_id(i)
    # vocab and packing read the same inputs as from full data
    freq = torch.load(tokens_dir / "token_freq.pt", weights_only=True)
    assert freq == torch.load(full_dir / "token_freq.pt", weights_only=True)
    assert (
        PackedDataset(without, list(range(len(without))), 512).packs
        == PackedDataset(with_states, list(range(len(with_states))), 512).packs
    )
    # data_config.json: what a producer must capture
    config = json.loads((tokens_dir / "data_config.json").read_text())
    assert config["tokens_only"] is True and config["layer_ids"] == [1, 2, 3, 4] and config["backend"] == "none"
    assert "hidden_states" not in config["hidden_states_layout"]["tensors"]
    assert "[1, 2, 3, 4]" in config["hidden_states_layout"]["hidden_states"]
    assert json.loads((full_dir / "data_config.json").read_text())["tokens_only"] is False


def test_tokens_only_resumes_and_refuses_offline_training(full_and_tokens, tiny_verifier_path, chats, tmp_path):
    from speculators_hf.training import Eagle3ModelArguments, Eagle3TrainingArguments, build_datasets
    from speculators_hf.utils import UserError

    _, _, tokens_dir, _ = full_and_tokens
    before = {p.name: p.read_bytes() for p in Path(tokens_dir).glob("data-*.safetensors")}
    again = build_dataset(
        datagen_args(tiny_verifier_path, chats, tokens_dir, Path(tokens_dir).parent / "cache", tokens_only=True)
    )
    assert again["this_run"]["samples"] == 0
    assert before == {p.name: p.read_bytes() for p in Path(tokens_dir).glob("data-*.safetensors")}
    model_args = Eagle3ModelArguments(verifier_name_or_path=str(tiny_verifier_path), data_path=str(tokens_dir))
    args = Eagle3TrainingArguments(output_dir=str(tmp_path / "ckpt"), report_to="none")
    with pytest.raises(UserError, match="tokens only.*--hidden-states-source online"):
        build_datasets(model_args, args)
