"""The TTT objective's pure functions on hand-built inputs with known answers."""

import math

import pytest
import torch

from speculators_hf.training.collator import DataCollatorForEagle3, align_sample
from speculators_hf.training.losses import (
    forward_kl,
    metrics_from_stats,
    step_statistics,
    ttt_attention_mask,
    ttt_block_mask,
)


def brute_force_mask(doc: list[int], step: int) -> torch.Tensor:
    T = len(doc)
    m = torch.zeros(T, (step + 1) * T, dtype=torch.bool)
    for q in range(T):
        for j in range(step + 1):
            for s in range(T):
                if j == 0:
                    m[q, s] = s == q or (doc[q] >= 0 and doc[q] == doc[s] and s <= q)
                else:
                    m[q, j * T + s] = s == q
    return m


@pytest.mark.parametrize("step", [0, 1, 3])
def test_ttt_mask_matches_brute_force(step):
    docs = [[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]]
    mask = ttt_attention_mask(torch.tensor(docs), step)
    assert mask.shape == (2, 1, 8, (step + 1) * 8)
    for b, doc in enumerate(docs):
        assert torch.equal(mask[b, 0], brute_force_mask(doc, step))


@pytest.mark.gpu
def test_block_mask_matches_dense():
    doc = torch.tensor([[0] * 100 + [1] * 120 + [-1] * 36], device="cuda")
    for step in range(3):
        dense = ttt_attention_mask(doc, step)[0, 0]
        block = ttt_block_mask(doc, step).to_dense()  # block-level only: check the mask_mod instead
        assert block.shape[-1] * 128 >= dense.shape[-1]
        mod = ttt_block_mask(doc, step).mask_mod
        q, kv = torch.meshgrid(
            torch.arange(256, device="cuda"), torch.arange(dense.shape[-1], device="cuda"), indexing="ij"
        )
        zero = torch.zeros((), dtype=torch.long, device="cuda")
        assert torch.equal(mod(zero, zero, q, kv), dense)


def test_alignment_of_a_hand_built_sample():
    # tokens x0..x5; assistant tokens x3, x4 (l = 0 0 0 1 1 0); hidden state of token t = [g_t (3 values), y_t]
    T, H = 6, 1
    hs = torch.arange(T * 4, dtype=torch.float).view(T, 4, H)
    sample = {"input_ids": torch.arange(10, 16), "loss_mask": torch.tensor([0, 0, 0, 1, 1, 0]), "hidden_states": hs}
    row = align_sample(sample, "predicted")
    assert row["input_ids"].tolist() == [11, 12, 13, 14, 15]  # x_{t+1}
    assert torch.equal(row["aux_hidden_states"], hs[:-1, :3].reshape(5, 3))  # g_t
    assert torch.equal(row["verifier_last_hidden_states"], hs[1:, 3])  # y_{t+1}
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 4]
    # row t predicts x_{t+2}: rows 1 and 2 predict the assistant tokens x3 and x4
    assert row["loss_mask"].tolist() == [0, 1, 1, 0, 0]
    # speculators' choice: row t counts when its input x_{t+1} is an assistant token
    assert align_sample(sample, "input")["loss_mask"].tolist() == [0, 0, 1, 1, 0]


def test_collator_packs_documents_with_ids_and_positions():
    def sample(n):
        return {
            "input_ids": torch.arange(n),
            "loss_mask": torch.ones(n, dtype=torch.long),
            "hidden_states": torch.randn(n, 4, 2),
        }

    batch = DataCollatorForEagle3(total_seq_len=10)([[sample(4), sample(5)]])
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, -1, -1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0, 0]]
    assert batch["aux_hidden_states"].shape == (1, 10, 6)
    assert batch["verifier_last_hidden_states"].shape == (1, 10, 2)


def test_loss_and_metrics_on_a_hand_built_batch():
    # Vd = 2, one row of T = 4 positions, one document, all rows masked.
    big = 10.0
    targets = torch.tensor([[[big, 0], [0, big], [big, 0], [0, big]]])  # verifier argmax: 0 1 0 1
    step0 = torch.tensor([[[big, 0], [big, 0], [big, 0], [0, big]]])  # draft argmax: 0 0 0 1 -> rows 0, 2, 3 right
    step1 = torch.tensor([[[0, big], [0, big], [0, big], [0, big]]])  # step 1 row t vs target t+1: 1 1 1 (0, 1, 0, 1)
    mask = torch.ones(1, 4, dtype=torch.long)
    doc = torch.zeros(1, 4, dtype=torch.long)

    loss0, stats0, correct0 = step_statistics(step0, targets, mask, doc, 0, None)
    expected_kl = forward_kl(step0, targets)
    assert torch.allclose(loss0, expected_kl.mean())
    kl_wrong = forward_kl(torch.tensor([big, 0]), torch.tensor([0, big]))  # one wrong row
    assert torch.allclose(loss0, kl_wrong / 4, rtol=1e-4)
    assert correct0.tolist() == [[True, False, True, True]]

    loss1, stats1, correct1 = step_statistics(step1, targets, mask, doc, 1, correct0)
    # step 1: rows 0..2 compared with target rows 1..3 (argmax 1, 0, 1): row 0 right, row 1 wrong, row 2 right
    assert stats1[0, 1].item() == 3  # the last row drops out
    assert stats1[0, 2].item() == 2  # acc_1 = 2/3
    assert stats1[0, 4].item() == 2  # rows 0 and 2 had step 0 right
    assert stats1[0, 3].item() == 2  # both of them right at step 1 -> cond_acc_1 = 1
    assert correct1.tolist() == [[True, False, True, False]]

    m = metrics_from_stats(torch.stack([stats0[0], stats1[0]]))
    assert m["acc_0"] == pytest.approx(0.75) and m["cond_acc_0"] == pytest.approx(0.75)
    assert m["acc_1"] == pytest.approx(2 / 3) and m["cond_acc_1"] == pytest.approx(1.0)
    assert m["tau_sim"] == pytest.approx(1 + 0.75 + 0.75 * 1.0)
    assert m["loss_0"] == pytest.approx(loss0.item(), rel=1e-5)
    assert m["loss_1"] == pytest.approx(loss1.item(), rel=1e-5)


def test_masked_rows_and_other_documents_drop_out():
    targets = torch.randn(1, 5, 3)
    logits = torch.randn(1, 5, 3)
    mask = torch.tensor([[1, 0, 1, 1, 1]])
    doc = torch.tensor([[0, 0, 0, 1, 1]])
    loss, stats, _ = step_statistics(logits, targets, mask, doc, 1, None)
    # step 1 rows t=0..3 use mask[t+1] = 0 1 1 1 and need doc[t+1] == doc[t]: rows 1 and 3 count
    kl = forward_kl(logits[:, [1, 3]], targets[:, [2, 4]])
    assert stats[0, 1].item() == 2
    assert torch.allclose(loss, kl.mean())


def test_forward_kl_known_value():
    p = torch.tensor([math.log(0.5), math.log(0.5)])
    q = torch.tensor([math.log(0.25), math.log(0.75)])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert forward_kl(q, p).item() == pytest.approx(expected, rel=1e-5)
