"""Verifier families end to end, each a tiny random config (`tiny_kit.TINY_FAMILIES`, no hub): datagen with
transformers -> vocab -> a short training run -> export, and the training targets equal the verifier's own logits.

The pipeline itself is `tests/families.py`; the vLLM cells (datagen parity, serving the draft) are in
`test_families_vllm.py`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speculators_hf.datagen import ShardDataset
from speculators_hf.export import vllm_serves_eagle3
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.tiny_kit import tiny_family_model_class
from tests.families import DRAFT_VOCAB, FAMILIES, OPTIONS, family_runs_fixture  # noqa: F401 - the fixture


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, family_runs):
    return family_runs.get(request.param)


def test_datagen_with_transformers(run):
    dataset = ShardDataset(run["data"])
    assert run["summary"]["complete"] and len(dataset) == run["summary"]["samples"] > 0
    assert dataset.hidden_shape == (4, 64)  # aux [1, 2, 3] + the last layer, H = 64
    config = json.loads((run["data"] / "data_config.json").read_text())
    assert config["layer_ids"] == [1, 2, 3, 4]


def test_targets_are_the_verifiers_own_logits(run):
    """The draft's targets from datagen's pre-norm last states == the verifier's logits over the draft vocabulary."""
    from transformers import AutoConfig

    model_class = tiny_family_model_class(AutoConfig.from_pretrained(run["verifier"]))
    verifier = model_class.from_pretrained(run["verifier"], dtype=torch.float32).eval()
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


@pytest.mark.parametrize("name", list(OPTIONS))
def test_draft_options_train_and_export(family_runs, name):
    """Eagle-3.1 norms, a Qwen3-style draft layer, a draft narrower than the verifier, windowed attention: trained by
    `speculators-hf train` and exported (served by vLLM in test_families_vllm.py)."""
    run = family_runs.option(name)
    assert run["export_error"] is None, run["export_error"]
    history = [h for h in run["trainer"].state.log_history if "loss" in h]
    assert history and np.isfinite(history[-1]["loss"])
    config = json.loads((run["exported"] / "config.json").read_text())
    expected = {
        "eagle-3.1-norms": lambda c: c["fc_norm"] is True and c["norm_before_fc"] is True,
        "qwen3-layer": lambda c: c["transformer_layer_config"]["model_type"] == "qwen3",
        "narrow-draft": lambda c: c["target_hidden_size"] == 64 and c["transformer_layer_config"]["hidden_size"] == 32,
        "sliding-window": lambda c: (
            c["transformer_layer_config"]["sliding_window"] == 8
            and c["transformer_layer_config"]["layer_types"] == ["sliding_attention"]
        ),
    }[name]
    assert expected(config), config
