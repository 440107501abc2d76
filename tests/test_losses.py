"""The TTT objective's pure functions on hand-built inputs with known answers."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from speculators_hf.training import losses
from speculators_hf.training.collator import DataCollatorForEagle3, align_sample
from speculators_hf.training.losses import (
    metrics_from_stats,
    shifted_forward_kl,
    step_statistics,
    ttt_attention_mask,
    ttt_block_mask,
)


def forward_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """The plain per-row KL(p_target || q_draft), `[..., V] -> [...]`: the reference for `shifted_forward_kl`."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


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


def test_dense_mask_reuses_step0():
    doc = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    step0 = ttt_attention_mask(doc, 0)
    for step in range(4):
        assert torch.equal(ttt_attention_mask(doc, step, step0), ttt_attention_mask(doc, step))


def flex_blocks(mask) -> dict[str, torch.Tensor]:
    """A BlockMask's partial and full block sets, as dense block-level matrices (order of the lists is free)."""
    from torch.nn.attention.flex_attention import _ordered_to_dense

    out = {}
    for side, n in (("kv", mask.kv_indices.shape[-1]), ("q", mask.q_indices.shape[-1])):
        for kind in ("", "full_"):
            num, idx = getattr(mask, f"{kind}{side}_num_blocks"), getattr(mask, f"{kind}{side}_indices")
            out[kind + side] = _ordered_to_dense(num, idx, n)
    return out


@pytest.mark.parametrize("T", [512, 384])
def test_extended_block_mask_equals_a_fresh_one_and_the_dense_mask(T):
    """Step k's BlockMask extended from step 0 equals `create_block_mask` over all (k+1)T keys, block for block, and
    FlexAttention with it (CPU forward) equals sdpa with the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    first = [0] * 100 + [1] * 200 + [2] * 150 if T == 512 else [0] * 130 + [1] * 200
    doc = torch.tensor([first + [-1] * (T - len(first)), [0] * T])
    step0 = ttt_block_mask(doc, 0)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        extended, fresh = ttt_block_mask(doc, step, step0), ttt_block_mask(doc, step)
        assert extended.seq_lengths == fresh.seq_lengths == (T, (step + 1) * T)
        blocks_e, blocks_f = flex_blocks(extended), flex_blocks(fresh)
        for key in blocks_f:
            assert torch.equal(blocks_e[key], blocks_f[key]), (step, key)
        q = torch.randn(2, 2, T, 16, generator=g)
        k, v = (torch.randn(2, 2, (step + 1) * T, 16, generator=g) for _ in range(2))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
            flex = flex_attention(q, k, v, block_mask=extended)  # eager CPU reference: reads the mask_mod
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=ttt_attention_mask(doc, step))
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_extended_block_mask_writes_one_diagonal_block_per_later_step():
    doc = torch.zeros(1, 256, dtype=torch.long)  # one document, 2 blocks of 128
    step0 = ttt_block_mask(doc, 0)
    mask = ttt_block_mask(doc, 2, step0)
    # q block 0: step-0 diagonal block (partial), then blocks 2 and 4 (the diagonals of steps 1 and 2)
    assert mask.kv_num_blocks[0, 0].tolist() == [3, 3]
    assert sorted(mask.kv_indices[0, 0, 0, :3].tolist()) == [0, 2, 4]
    assert sorted(mask.kv_indices[0, 0, 1, :3].tolist()) == [1, 3, 5]
    assert mask.full_kv_num_blocks[0, 0].tolist() == [0, 1]  # q block 1 sees all of kv block 0


def reference_step_kl(logits, targets, shift):
    """The unfused KL of row t against row t + shift, zero on the last `shift` rows."""
    T = logits.shape[1]
    kl = forward_kl(logits[:, : T - shift], targets[:, shift:])
    return torch.cat([kl, kl.new_zeros(kl.shape[0], shift)], dim=1)


@pytest.mark.parametrize("shift", [0, 1, 3])
def test_shifted_kl_matches_the_unfused_kl_and_its_gradient(shift, monkeypatch):
    monkeypatch.setattr(losses, "_KL_CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk: several chunks and a ragged one
    g = torch.Generator().manual_seed(shift)
    logits = (3 * torch.randn(2, 11, 50, generator=g, dtype=torch.float64)).requires_grad_()
    targets = 3 * torch.randn(2, 11, 50, generator=g, dtype=torch.float64)
    weights = torch.rand(2, 11, generator=g, dtype=torch.float64)

    kl = shifted_forward_kl(logits, targets, shift)
    expected = reference_step_kl(logits, targets, shift)
    torch.testing.assert_close(kl, expected.float(), atol=1e-6, rtol=1e-5)
    (grad,) = torch.autograd.grad((kl.double() * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)
    assert grad[:, 11 - shift :].abs().sum() == 0  # rows without a target get no gradient
    loss = shifted_forward_kl(logits, targets, shift).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):  # the saved gradient was scaled in place
        loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(shifted_forward_kl(logits, targets, shift), kl.detach())


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while `fn()` runs (parameters/leaves counted too)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shifted_kl_keeps_one_logits_sized_tensor_for_backward(dtype):
    """The memory claim: one `[B, T, V]` tensor in the logits' dtype, vs two fp32 ones for the unfused KL."""
    logits = torch.randn(2, 64, 512, dtype=dtype, requires_grad=True)
    targets = torch.randn(2, 64, 512, dtype=dtype)
    size = logits.numel() * logits.element_size()
    ours = saved_bytes(lambda: shifted_forward_kl(logits, targets, 1))
    unfused = saved_bytes(lambda: reference_step_kl(logits, targets, 1))
    assert ours == size
    assert unfused >= 2 * logits.numel() * 4 * 63 / 64  # log-softmax output and target probabilities, fp32
    kl = shifted_forward_kl(logits, targets, 1)
    (grad,) = torch.autograd.grad(kl.sum(), logits)
    assert grad.dtype == dtype
    torch.testing.assert_close(kl, reference_step_kl(logits.float(), targets.float(), 1), atol=1e-4, rtol=1e-4)


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
    p = torch.tensor([[[math.log(0.5), math.log(0.5)]]])
    q = torch.tensor([[[math.log(0.25), math.log(0.75)]]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert shifted_forward_kl(q, p).item() == pytest.approx(expected, rel=1e-5)
    assert forward_kl(q, p).item() == pytest.approx(expected, rel=1e-5)
