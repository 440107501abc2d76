"""Verifier families end to end, each a tiny random config (`tiny_kit.TINY_FAMILIES`, no hub): datagen with
transformers -> vocab -> a short training run -> export, and the training targets equal the verifier's own logits.

The vLLM cells (datagen parity, serving the draft) run in `test_families_vllm.py`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speculators_hf.datagen import DatagenArguments, ShardDataset, build_dataset
from speculators_hf.export import export_checkpoint, vllm_serves_eagle3
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.tiny_kit import TINY_FAMILIES, tiny_family_verifier, write_chat_jsonl
from speculators_hf.utils import UserError
from speculators_hf.vocab import build_vocab_mapping, save_vocab_mapping

FAMILIES = list(TINY_FAMILIES)
SEQ, DRAFT_VOCAB = 96, 384


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", limit=10)


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, chats, tmp_path_factory):
    """One family through datagen (transformers) -> vocab -> 1 epoch of training -> export."""
    from speculators_hf.cli.parser import make_parser, parse
    from speculators_hf.training import Eagle3ModelArguments, Eagle3TrainingArguments
    from speculators_hf.training.cli import train
    from tests.training_data import train_argv

    family = request.param
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(family)
    verifier = tiny_family_verifier(family)
    data = root / "data"
    args = DatagenArguments(
        target_model_path=str(verifier),
        train_data_path=str(chats),
        output_dir=str(data),
        cache_dir=str(root / "cache"),
        seq_length=SEQ,
        backend="transformers",
        batch_size=4,
        dtype="float32",
    )
    summary = build_dataset(args)
    freq = torch.load(data / "token_freq.pt", weights_only=True)
    vocab_size = json.loads((verifier / "config.json").read_text())["vocab_size"]
    d2t, t2d = build_vocab_mapping(freq, DRAFT_VOCAB, vocab_size)
    save_vocab_mapping(data, d2t, t2d)
    model_args, train_args = parse(
        make_parser((Eagle3ModelArguments, Eagle3TrainingArguments)),
        train_argv(verifier, data, root / "ckpt", "--total-seq-len", "192", "--ttt-steps", "2"),
    )[:2]
    trainer = train(model_args, train_args)
    try:
        exported, error = (
            export_checkpoint(root / "ckpt" / "0", root / "draft", verifier_hub_id=str(verifier))[0],
            None,
        )
    except UserError as err:
        exported, error = None, str(err)
    return dict(
        family=family, verifier=verifier, data=data, summary=summary, d2t=d2t, t2d=t2d, trainer=trainer,
        exported=exported, export_error=error,
    )  # fmt: skip


def test_datagen_with_transformers(run):
    dataset = ShardDataset(run["data"])
    assert run["summary"]["complete"] and len(dataset) == run["summary"]["samples"] > 0
    assert dataset.hidden_shape == (4, 64)  # aux [1, 2, 3] + the last layer, H = 64
    config = json.loads((run["data"] / "data_config.json").read_text())
    assert config["layer_ids"] == [1, 2, 3, 4]


def test_targets_are_the_verifiers_own_logits(run):
    """The draft's targets from datagen's pre-norm last states == the verifier's logits over the draft vocabulary."""
    from transformers import AutoModelForCausalLM

    verifier = AutoModelForCausalLM.from_pretrained(run["verifier"], dtype=torch.float32).eval()
    d2t, t2d = torch.from_numpy(run["d2t"]), torch.from_numpy(run["t2d"])
    draft = Eagle3DraftModel.from_verifier(str(run["verifier"]), d2t, t2d)
    target_ids = torch.arange(DRAFT_VOCAB) + d2t
    dataset = ShardDataset(run["data"])
    worst = 0.0
    for i in range(min(3, len(dataset))):
        sample = dataset[i]
        with torch.no_grad():
            expected = verifier(input_ids=sample["input_ids"][None]).logits[0][:, target_ids]  # [T, Vd]
        got = draft.verifier_logits(sample["hidden_states"][:, -1])  # [T, Ht] -> [T, Vd]
        worst = max(worst, (got - expected).abs().max().item())
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert worst < 1e-5, f"{run['family']}: max |target - verifier logit| = {worst:.2e}"


def test_trains_and_exports_or_refuses_in_one_line(run):
    history = [h for h in run["trainer"].state.log_history if "loss" in h]
    assert history and np.isfinite(history[-1]["loss"])
    config = json.loads((run["verifier"] / "config.json").read_text())
    if vllm_serves_eagle3(config["architectures"]):
        assert run["export_error"] is None, run["export_error"]
        draft = json.loads((run["exported"] / "config.json").read_text())
        assert draft["speculators_config"]["verifier"]["architectures"] == config["architectures"]
        assert draft["transformer_layer_config"]["hidden_act"] == "silu"  # the only activation vLLM's draft runs
    else:
        assert "\n" not in run["export_error"] and "does not serve EAGLE-3 drafts" in run["export_error"]
