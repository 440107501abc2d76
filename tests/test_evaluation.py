"""Online speculative decoding in transformers: output equals the verifier's greedy output; counters; eval card."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speculators_hf.evaluation import (
    build_eval_card,
    evaluate_transformers,
    greedy_baseline,
    load_prompts,
    render_eval_card,
    write_eval_card,
)
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.tiny_kit import write_chat_jsonl
from tests.draft_fit import chat_prompts, fit_draft

MAX_NEW = 24


@pytest.fixture(scope="module")
def setup(tiny_verifier_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # tiny models: one thread is several times faster on a shared 2-core box
    verifier = AutoModelForCausalLM.from_pretrained(tiny_verifier_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_verifier_path)
    prompts = chat_prompts(tokenizer, 4) + [[5, 17, 300, 41, 1000, 7]]
    reference, _ = greedy_baseline(verifier, prompts, MAX_NEW, tokenizer.eos_token_id)
    torch.manual_seed(0)
    random_draft = Eagle3DraftModel.from_verifier(str(tiny_verifier_path), hub_id="org/v", aux_layer_ids=[1, 2, 3])
    torch.manual_seed(0)
    fitted = Eagle3DraftModel.from_verifier(str(tiny_verifier_path), hub_id="org/v", aux_layer_ids=[1, 2, 3])
    fit_draft(fitted, verifier, prompts, MAX_NEW, steps=100)
    return dict(
        verifier=verifier,
        tokenizer=tokenizer,
        prompts=prompts,
        reference=reference,
        random=random_draft,
        fitted=fitted,
    )


def _check_counters(result, k):
    assert result.num_draft_tokens == k * result.num_drafts
    assert len(result.accepted_per_position) == k
    assert all(a >= b for a, b in zip(result.accepted_per_position, result.accepted_per_position[1:]))  # chain
    # the prefill emits one token per prompt, then each step its accepted tokens + 1 (the last step may overshoot)
    emitted = result.num_prompts + result.num_drafts + result.num_accepted_tokens
    assert 0 <= emitted - sum(map(len, result.output_ids)) <= k * result.num_prompts


def test_random_draft_output_equals_verifier_greedy(setup):
    result = evaluate_transformers(
        setup["random"], setup["verifier"], setup["prompts"], 3, MAX_NEW, setup["tokenizer"].eos_token_id
    )
    assert result.output_ids == setup["reference"] == result.baseline_ids
    assert result.matches_baseline
    _check_counters(result, 3)
    assert result.tau < 1.2  # a random draft is (almost) never accepted


@pytest.mark.parametrize("k", [1, 3, 5])
def test_agreeing_draft_output_equals_verifier_greedy(setup, k):
    result = evaluate_transformers(
        setup["fitted"],
        setup["verifier"],
        setup["prompts"],
        k,
        MAX_NEW,
        setup["tokenizer"].eos_token_id,
        baseline=False,
    )
    print(f"K={k}: tau {result.tau:.3f}, acceptance {result.acceptance_per_position}")
    assert result.output_ids == setup["reference"]
    _check_counters(result, k)
    assert result.tau > 1.5  # whole chains, bonus tokens and cache cropping are all exercised
    if k > 1:
        assert result.accepted_per_position[-1] > 0


def test_stops_at_eos_like_generate(setup):
    eos = setup["reference"][0][6]  # a token the verifier emits: pretend it is EOS
    prompts = setup["prompts"][:2]
    reference, _ = greedy_baseline(setup["verifier"], prompts, MAX_NEW, eos)
    result = evaluate_transformers(setup["fitted"], setup["verifier"], prompts, 3, MAX_NEW, eos, baseline=False)
    assert result.output_ids == reference
    assert result.output_ids[0][-1] == eos and len(result.output_ids[0]) <= 7


def test_eval_card_has_every_field(setup, tmp_path):
    result = evaluate_transformers(
        setup["fitted"], setup["verifier"], setup["prompts"], 3, MAX_NEW, setup["tokenizer"].eos_token_id
    )
    dataset = {"path": "chat.jsonl", "num_prompts": 5, "offset": 0, "max_new_tokens": MAX_NEW}
    card = build_eval_card(
        [result],
        draft="d",
        verifier="v",
        dataset=dataset,
        offline={"tau_sim": 2.5, "cond_acc_k": [0.9, 0.5, 0.3], "ttt_steps": 3},
    )
    json_path, md_path = write_eval_card(card, tmp_path)
    saved = json.loads(json_path.read_text())
    run = saved["runs"][0]
    for key in (
        "engine",
        "engine_version",
        "num_speculative_tokens",
        "temperature",
        "proposal",
        "tau",
        "acceptance_per_position",
        "speedup",
        "spec_seconds",
        "baseline_seconds",
        "batch_size",
    ):
        assert run[key] is not None, key
    assert run["proposal"] == "chain" and run["temperature"] == 0.0 and run["output_matches_verifier_greedy"]
    assert saved["hardware"]["cpu_cores"] >= 1 and saved["dataset"]["path"] == "chat.jsonl"
    md = md_path.read_text()
    assert (
        f"{run['tau']:.3f}" in md
        and abs(run["tau"] - result.tau) < 1e-3
        and "2.500" in md
        and "| transformers |" in md
    )
    assert md == render_eval_card(saved)


def test_load_prompts_formats(setup, tmp_path):
    path = write_chat_jsonl(tmp_path / "chat.jsonl", 6)
    with open(path, "a") as f:
        f.write(json.dumps({"prompt_token_ids": [1, 2, 3]}) + "\n")
    tok = setup["tokenizer"]
    prompts = load_prompts(path, tok, num_prompts=100)
    assert prompts[-1] == [1, 2, 3]
    first = json.loads(path.read_text().splitlines()[0])["messages"][:1]
    assert prompts[0] == tok.apply_chat_template(first, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert load_prompts(path, tok, num_prompts=2, offset=1)[0] == prompts[1]


def test_cli_prints_table_and_writes_card(setup, tiny_verifier_path, tmp_path):
    setup["fitted"].save_pretrained(tmp_path / "draft")
    chat = write_chat_jsonl(tmp_path / "chat.jsonl", 8)
    cli = str(Path(sys.executable).with_name("speculators-hf"))
    done = subprocess.run(
        [
            cli,
            "evaluate",
            "--draft",
            str(tmp_path / "draft"),
            "--verifier",
            str(tiny_verifier_path),
            "--prompts",
            str(chat),
            "--num-prompts",
            "3",
            "--max-new-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| transformers |" in done.stdout and "tau" in done.stdout
    card = json.loads((tmp_path / "draft" / "eval_card.json").read_text())
    assert card["runs"][0]["num_prompts"] == 3 and card["runs"][0]["output_matches_verifier_greedy"] is True
    assert (tmp_path / "draft" / "eval_card.md").is_file()


@pytest.mark.parametrize(
    ("config_dtype", "dtype", "device", "cuda", "expected"),
    [
        (torch.bfloat16, "auto", "auto", True, ("cuda", "bfloat16")),  # GPU: the verifier's own dtype
        ("float16", "auto", "auto", True, ("cuda", "float16")),  # config.dtype may be a string
        (None, "auto", "auto", True, ("cuda", "float32")),  # a config that names none
        (torch.bfloat16, "auto", "auto", False, ("cpu", "float32")),  # CPU keeps float32
        (torch.bfloat16, "auto", "cpu", True, ("cpu", "float32")),
        (torch.bfloat16, "float32", "auto", True, ("cuda", "float32")),  # --dtype wins
        (torch.float32, "bfloat16", "auto", False, ("cpu", "bfloat16")),
    ],
)
def test_device_and_dtype_resolution(config_dtype, dtype, device, cuda, expected):
    from speculators_hf.evaluation.stage import resolve_placement

    assert resolve_placement(config_dtype, dtype, device, cuda_available=cuda) == expected


def test_cuda_device_without_cuda_is_one_line_error():
    from speculators_hf.evaluation.stage import resolve_placement
    from speculators_hf.utils import UserError

    with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
        resolve_placement(torch.bfloat16, "auto", "cuda", cuda_available=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_transformers_engine_runs_on_the_gpu(setup, tiny_verifier_path, tmp_path, dtype):
    """On CUDA the verifier and the draft are placed on the GPU, in the verifier's dtype (auto) or --dtype."""
    from speculators_hf.evaluation import EvaluateArguments, evaluate

    setup["fitted"].save_pretrained(tmp_path / "draft")
    chat = write_chat_jsonl(tmp_path / "chat.jsonl", 4)
    args = EvaluateArguments(
        draft=str(tmp_path / "draft"),
        prompts=str(chat),
        verifier=str(tiny_verifier_path),
        num_prompts=2,
        max_new_tokens=8,
        dtype=dtype,
    )
    (run,) = evaluate(args)["runs"]
    expected = "float32" if dtype == "auto" else dtype  # the tiny verifier's config says float32
    assert run["device"] == "cuda" and run["dtype"] == expected and run["tau"] >= 1.0


# ----------------------------------------------------------------------------------- sampling (temperature > 0)


def _chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against expected counts (cells expected below 5 are pooled)."""
    keep = expected >= 5
    obs, exp = observed[keep], expected[keep]
    if not keep.all():
        obs = torch.cat([obs, observed[~keep].sum().reshape(1)])
        exp = torch.cat([exp, expected[~keep].sum().reshape(1)])
    statistic = ((obs - exp) ** 2 / exp).sum()
    df = torch.tensor((len(obs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, statistic / 2))  # the chi-square survival function


@pytest.fixture(scope="module")
def four_token_verifier(tmp_path_factory):
    """A random Llama over a 4-token vocabulary with peaked next-token distributions, and a random draft for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.3,  # logits of a few units: peaked, not one-hot
    )
    path = tmp_path_factory.mktemp("v4")
    LlamaForCausalLM(config).save_pretrained(path)
    verifier = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    draft = Eagle3DraftModel.from_verifier(str(path), hub_id="org/v4", aux_layer_ids=[1, 2, 3]).eval()
    return verifier, draft


def test_sampled_output_follows_the_verifier_distribution(four_token_verifier):
    """Speculative sampling at T = 0.7 (K = 2) emits 3-token continuations distributed exactly as sampling from the
    verifier: a chi-square test of 500 seeds against the exact distribution over all 4^3 continuations. (Sampling
    from p instead of p without the rejected draft, or ignoring the temperature, gives p < 1e-14 here.)"""
    import itertools

    from speculators_hf.evaluation import SpeculativeGenerator

    torch.set_num_threads(1)
    verifier, draft = four_token_verifier
    temperature, k, new, seeds, prompt = 0.7, 2, 3, 500, [1, 2, 3, 0, 2]
    heads = list(itertools.product(range(4), repeat=new - 1))
    with torch.no_grad():
        logits = verifier(torch.tensor([prompt + list(h) for h in heads])).logits.float()  # [16, L + 2, 4]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    n = len(prompt)
    exact = {
        (*h, x): float((logp[i, n - 1, h[0]] + logp[i, n, h[1]] + logp[i, n + 1, x]).exp())
        for i, h in enumerate(heads)
        for x in range(4)
    }
    gen = SpeculativeGenerator(verifier, draft, k, temperature)
    counts, steps = dict.fromkeys(exact, 0), []
    for seed in range(seeds):
        out, accepted = gen.generate(prompt, new, generator=torch.Generator().manual_seed(seed))
        counts[tuple(out)] += 1
        steps += accepted
    assert {0, 1, 2} <= set(steps)  # rejections, a partial chain and whole chains (bonus token) all happened
    observed = torch.tensor(list(counts.values()), dtype=torch.float64)
    expected = torch.tensor(list(exact.values()), dtype=torch.float64) * seeds
    assert _chi_square_p_value(observed, expected) > 1e-3


def test_rejection_rule_with_draft_probabilities():
    """The rule with a sampled draft (q not one-hot): the first emitted token follows p_0, and after an accepted
    first draft the next one follows p_1 (chi-square, 10000 draws)."""
    from speculators_hf.evaluation.online import speculative_sample

    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]])
    first, second = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    drafts = torch.multinomial(q, 10000, replacement=True, generator=gen).T.tolist()  # [10000, 2], d_i ~ q_i
    for drafted in drafts:
        n, token = speculative_sample(p, drafted, q, gen)
        emitted = drafted[:n] + [token]
        first[emitted[0]] += 1
        if n >= 1:
            second[emitted[1]] += 1
    assert _chi_square_p_value(first, p[0].double() * first.sum()) > 1e-3
    assert _chi_square_p_value(second, p[1].double() * second.sum()) > 1e-3


def test_sampled_run_counters_and_seeds(setup):
    """T = 1 through evaluate_transformers: counters consistent, reproducible per seed, no identity claim."""
    args = (setup["fitted"], setup["verifier"], setup["prompts"][:3], 3, MAX_NEW, setup["tokenizer"].eos_token_id)
    result = evaluate_transformers(*args, temperature=1.0, seed=7)
    again = evaluate_transformers(*args, temperature=1.0, seed=7, baseline=False)
    _check_counters(result, 3)
    assert result.output_ids == again.output_ids and result.accepted_per_position == again.accepted_per_position
    assert result.output_ids != setup["reference"][:3]  # sampled, not greedy
    summary = result.summary()
    assert summary["temperature"] == 1.0 and summary["output_matches_verifier_greedy"] is None
    assert summary["seed"] == 7 and summary["speedup"] > 0
