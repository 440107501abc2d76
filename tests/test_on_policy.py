"""The on-policy stage (`train --stage on-policy`): the verifier's scores of the draft's own continuations, the
accept/reject rule against a row-by-row simulation of the served draft, and the stage as a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from speculators_hf.formats.shards import ShardDataset
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.modeling.losses import ttt_valid_rows
from speculators_hf.runstate import STATE_DIR
from speculators_hf.training.cli import main
from speculators_hf.training.collator import DataCollatorForEagle3
from speculators_hf.training.on_policy import ContinuationScorer, OnPolicyObjective
from speculators_hf.vocab import load_vocab_mapping
from tests.training_data import make_training_data, train_argv


@pytest.fixture(scope="module")
def scorer(peaked_verifier_path):
    return ContinuationScorer.from_pretrained(str(peaked_verifier_path), "cpu")


@pytest.fixture(scope="module")
def data(peaked_verifier_path, tmp_path_factory):
    return make_training_data(peaked_verifier_path, tmp_path_factory.mktemp("data"), num_samples=16, max_len=48)


def last_states(scorer: ContinuationScorer, sequence: list[int]) -> torch.Tensor:
    """The verifier's pre-norm last-layer states `[T, Ht]` of one sequence, run alone."""
    return scorer.backend.extract([sequence])[0][:, 0]


def test_continuations_are_what_the_verifier_computes_on_each_sequence(scorer):
    """Packed rows (two documents and padding in row 0) with continued rows in both: entry j of row t equals the
    verifier's state at the end of `x_0 .. x_{t+1}, d^0 .. d^j` run alone; rows not continued stay zero."""
    g = torch.Generator().manual_seed(0)
    docs = [[torch.randint(3, 2000, (n,), generator=g) for n in (9, 7)], [torch.randint(3, 2000, (12,), generator=g)]]
    S, J = 18, 2
    tokens, positions = torch.zeros(2, S, dtype=torch.long), torch.zeros(2, S, dtype=torch.long)
    document_ids = torch.full((2, S), -1)
    for b, row in enumerate(docs):
        start = 0
        for d, x in enumerate(row):  # aligned rows: x_t at row t, positions 0 .. T-2
            n = len(x) - 1
            tokens[b, start : start + n], positions[b, start : start + n] = x[:-1], torch.arange(n)
            document_ids[b, start : start + n] = d
            start += n
    proposals = [torch.randint(3, 2000, (2, S), generator=g) for _ in range(J)]
    rows = torch.zeros(2, S, dtype=torch.bool)
    rows[0, [0, 3, 6, 9, 12]] = True  # both documents of row 0 (row 6: its first document's last row but one)
    rows[1, [2, 5, 9]] = True  # (a document's last row has no x_{t+1} here: never continued)
    ran = scorer.tokens
    out = scorer.continuations(tokens, positions, document_ids, proposals, rows)
    assert out.shape == (J, 2, S, 64) and (out[:, ~rows] == 0).all()
    for b, t in rows.nonzero().tolist():
        d, p = int(document_ids[b, t]), int(positions[b, t])
        x = docs[b][d]
        sequence = x[: p + 2].tolist() + [int(proposals[j][b, t]) for j in range(J)]
        reference = last_states(scorer, sequence)
        for j in range(J):
            torch.testing.assert_close(out[j, b, t], reference[p + 2 + j], atol=1e-5, rtol=1e-4)
    assert scorer.tokens - ran == 2 * (
        S + J * 5
    )  # the packed rows once more, then J blocks of the most continued rows


def test_the_rule_follows_the_served_draft_row_by_row(peaked_verifier_path, data, scorer):
    """`OnPolicyObjective.step` against a simulation of each row alone: the served draft proposes d^0, d^1, d^2;
    step k counts while d^0 .. d^{k-1} were the verifier's argmax (T = 0), with the target the verifier computes
    after them (the shards' row on the data path, a continuation off it), reverse KL where d^k is rejected. The
    proposals mix the verifier's own choices (accepted, often not the data's tokens) and other tokens."""
    d2t, t2d = load_vocab_mapping(data / "d2t.npy", data / "t2d.npy")
    draft = Eagle3DraftModel.from_verifier(str(peaked_verifier_path), d2t, t2d, aux_layer_ids=[1, 2, 3])
    dataset = ShardDataset(data)
    samples = [dataset[i] for i in range(2)]
    batch = DataCollatorForEagle3(total_seq_len=100, verifier_ids=True)([samples])
    K, (B, S) = 3, batch["input_ids"].shape
    valid = ttt_valid_rows(batch["loss_mask"], batch["document_ids"], K)
    last = batch["verifier_last_hidden_states"]

    def argmax_index(state: torch.Tensor) -> int:
        return int(draft.verifier_logits(state[None]).argmax(-1))

    # each row alone: its context, then proposals that are the verifier's argmax at rows t % 3 != 2 of every step
    g = torch.Generator().manual_seed(0)
    proposals = [torch.randint(0, 512, (B, S), generator=g) for _ in range(K)]
    reference = {}  # (t, k) -> (target state, accepted)
    for t in range(S):
        d, p = int(batch["document_ids"][0, t]), int(batch["position_ids"][0, t])
        if d < 0 or not valid[:, 0, t].any():
            continue
        context = samples[d]["input_ids"][: p + 2].tolist()
        for k in range(K):
            state = last_states(scorer, context)[-1]
            best = argmax_index(state)
            if t % 3 != 2:
                proposals[k][0, t] = best
            accepted = int(proposals[k][0, t]) == best
            reference[t, k] = state, accepted
            if not accepted:
                break
            context.append(int(draft.draft_to_target_ids(proposals[k][0, t])))
    objective = OnPolicyObjective(0.0, "reverse_kl", scorer, seed=0)
    objective.proposals, objective.q_probs = proposals, [None] * K
    count, targets, index, reverse = objective.step(draft, batch, last, valid)
    expected = torch.zeros(K, B, S, dtype=torch.bool)
    for (t, k), (state, accepted) in reference.items():
        expected[k, 0, t] = bool(valid[k, 0, t])
        if valid[k, 0, t]:
            torch.testing.assert_close(targets[index[k, 0, t]], state, atol=1e-4, rtol=1e-4)
            assert bool(reverse[k, 0, t]) is (not accepted)
    assert torch.equal(count, expected)
    assert (reverse & ~count).sum() == 0 and 0 < reverse.sum() < count.sum()
    on_path = {
        (t, k)
        for (t, k) in reference
        if k
        and all(
            int(draft.draft_to_target_ids(proposals[j][0, t])) == int(batch["input_ids"][0, t + j + 1])
            for j in range(k)
        )
    }
    off = [(t, k) for (t, k) in reference if k and (t, k) not in on_path and valid[k, 0, t]]
    assert off and all(index[k, 0, t] >= B * S for t, k in off)  # scored by the verifier, not the shards


@pytest.fixture(scope="module")
def trained(peaked_verifier_path, data, tmp_path_factory):
    save = tmp_path_factory.mktemp("ttt") / "run"
    assert main(train_argv(peaked_verifier_path, data, save, "--epochs", "4", "--lr", "3e-3")) == 0
    return Path(json.loads((save / STATE_DIR / "train.json").read_text())["result"]["draft"])


@pytest.mark.parametrize("targets", ["verifier", "shards"])
def test_the_stage_trains_records_its_cost_and_is_not_run_twice(
    peaked_verifier_path, data, trained, targets, tmp_path
):
    save = tmp_path / "op"
    argv = train_argv(peaked_verifier_path, data, save, "--stage", "on-policy", "--from-pretrained", str(trained))
    argv += ["--max-steps", "2", "--on-policy-targets", targets, "--save-strategy", "no"]
    assert main(argv) == 0
    before = Eagle3DraftModel.from_pretrained(trained).state_dict()
    after = Eagle3DraftModel.from_pretrained(save / "0").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # (2 steps: within the first epoch)
    result = json.loads((save / STATE_DIR / "train.json").read_text())["result"]["on_policy"]
    assert len(result["accept"]) == 3 and result["tau"] >= 1
    if targets == "verifier":  # human responses: the verifier's choices leave the data, so it scored some
        assert result["verifier_tokens"] > 0 and result["verifier_seconds"] >= 0
    else:
        assert "verifier_tokens" not in result
    record = json.loads((save / "0" / "training_config.json").read_text())
    assert record["stage"] == "on-policy" and record["on_policy_targets"] == targets
    written = {p: p.stat().st_mtime_ns for p in save.rglob("*")}
    assert main(argv) == 0  # finished: not run again
    assert {p: p.stat().st_mtime_ns for p in save.rglob("*")} == written


def test_the_stage_needs_a_chained_draft_to_continue(peaked_verifier_path, data, trained, tmp_path, capsys):
    cases = {
        "--stage on-policy continues a trained draft: pass --from-pretrained": [],
        "a --parallel-drafting draft proposes": ["--from-pretrained", str(trained), "--parallel-drafting"],
        "--on-policy-temperature -1": ["--from-pretrained", str(trained), "--on-policy-temperature", "-1"],
    }
    for message, extra in cases.items():
        capsys.readouterr()
        argv = train_argv(peaked_verifier_path, data, tmp_path / "x", "--stage", "on-policy", *extra)
        assert main(argv) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("sample", [False, True])
def test_acceptance_at_a_temperature_is_the_rejection_samplers(sample):
    """T > 0: a greedy draft proposes its argmax and is accepted with probability p_T(d) (vLLM treats it as
    one-hot); a probabilistic one samples q_T and is accepted with probability min(1, p_T(d) / q_T(d))."""
    g = torch.Generator().manual_seed(0)
    objective = OnPolicyObjective(0.7, "reverse_kl", None, seed=0, sample=sample)
    head, states = torch.randn(11, 4, generator=g), torch.randn(3, 50, 4, generator=g)
    ids, q = objective.propose(head, states, torch.Generator().manual_seed(1))
    draft_q = torch.softmax(states @ head.T / 0.7, dim=-1)
    if sample:
        assert torch.allclose(q, draft_q.gather(-1, ids[..., None])[..., 0]) and (ids != draft_q.argmax(-1)).any()
    else:
        assert torch.equal(ids, draft_q.argmax(-1)) and (q == 1).all()
    target_logits = torch.randn(150, 11, generator=g)
    uniform = torch.rand(150, generator=g)
    accepted = objective.outcome(lambda z: z, target_logits, ids.view(-1), q.view(-1), uniform)
    p = torch.softmax(target_logits / 0.7, dim=-1).gather(1, ids.view(-1, 1))[:, 0]
    assert torch.equal(accepted, uniform < p / q.view(-1)) and 0 < accepted.sum() < 150


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_a_warm_started_on_policy_draft_as_we_draft(peaked_verifier_path, data, trained, tmp_path):
    """The options of the recipe chained into one draft: `--from-pretrained` (warm start) with `--loss kl_tv`, then
    `--stage on-policy`; exported, vLLM serves it (auto mode) with the verifier's greedy output and our engine's
    acceptance per position (a strong draft's parity: tests/test_vllm_serving.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speculators_hf.evaluation.online import evaluate_transformers, greedy_baseline
    from speculators_hf.evaluation.vllm_engine import evaluate_vllm
    from speculators_hf.export import export_checkpoint
    from tests.draft_fit import chat_prompts

    warm, on_policy = tmp_path / "warm", tmp_path / "op"
    flags = ("--max-steps", "2", "--save-strategy", "no")
    argv = train_argv(peaked_verifier_path, data, warm, "--from-pretrained", str(trained), "--loss", "kl_tv", *flags)
    assert main(argv) == 0
    argv = train_argv(peaked_verifier_path, data, on_policy, "--stage", "on-policy", *flags)
    assert main([*argv, "--from-pretrained", str(warm / "0")]) == 0
    record = json.loads((on_policy / "0" / "training_config.json").read_text())
    assert record["stage"] == "on-policy"
    exported, _ = export_checkpoint(on_policy / "0", tmp_path / "served", verifier_hub_id=str(peaked_verifier_path))

    k, max_new = 3, 16
    verifier = AutoModelForCausalLM.from_pretrained(peaked_verifier_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(peaked_verifier_path)
    prompts = chat_prompts(tokenizer, 4, offset=500)
    reference, _ = greedy_baseline(verifier, prompts, max_new, tokenizer.eos_token_id)
    draft = Eagle3DraftModel.from_pretrained(on_policy / "0").eval()
    ours = evaluate_transformers(draft, verifier, prompts, k, max_new, tokenizer.eos_token_id, baseline=False)
    served = evaluate_vllm(exported, None, prompts, k, max_new, mode="auto", max_model_len=256)
    print(f"\ntau transformers {ours.tau:.3f} {ours.acceptance_per_position} | vllm {served.tau:.3f} "
          f"{served.acceptance_per_position}")  # fmt: skip
    assert ours.output_ids == reference and served.output_ids == reference
    assert served.num_drafts > 0 and served.num_draft_tokens == k * served.num_drafts
    assert abs(ours.tau - served.tau) < 0.35  # (a weak draft: 16 human-response chats; the parity is the point)
    assert all(abs(a - b) < 0.15 for a, b in zip(ours.acceptance_per_position, served.acceptance_per_position))
