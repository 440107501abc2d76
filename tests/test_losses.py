"""The TTT objective: masks and metrics on hand-built inputs with known answers; the fused head + KL against the
unfused reference (values, gradients, statistics, saved tensors, bf16, compile fallback), in a real training run, and
under FSDP2/DDP."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from speculators_hf.modeling import losses
from speculators_hf.modeling.losses import (
    fused_ttt_kl,
    metrics_from_stats,
    step_statistics,
    ttt_attention_mask,
    ttt_block_mask,
    ttt_valid_rows,
)
from speculators_hf.training.collator import DataCollatorForEagle3, align_sample


def forward_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """The plain per-row KL(p_target || q_draft), `[..., V] -> [...]`, in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_q = F.log_softmax(logits.to(dtype), dim=-1)
    log_p = F.log_softmax(target_logits.to(dtype), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def reference_from_logits(step_logits, target_logits, valid, step_weights):
    """The unfused TTT objective: full `[B, T, Vd]` draft logits of each step against the verifier's `[B, T, Vd]`
    logits, row t against target row t + k, plain KL, masked means; the reference for `fused_ttt_kl`.

    Returns `(loss, kl [K, B, T], agree [K, B, T])`, zero/False on rows that do not count.
    """
    K, B, T = valid.shape
    loss, kls, agrees = 0.0, [], []
    for k, logits in enumerate(step_logits):
        kl = forward_kl(logits[:, : T - k], target_logits[:, k:])  # [B, T - k]
        kl = torch.cat([kl, kl.new_zeros(B, k)], dim=1) * valid[k]
        agree = logits[:, : T - k].argmax(-1) == target_logits[:, k:].argmax(-1)
        agree = torch.cat([agree, agree.new_zeros(B, k)], dim=1) & valid[k]
        loss = loss + step_weights[k] * kl.sum() / valid[k].sum().clamp(min=1)
        kls.append(kl)
        agrees.append(agree)
    return loss, torch.stack(kls), torch.stack(agrees)


def reference_ttt_loss(states, weight, verifier_rows, verifier_logits, valid, step_weights=None):
    """`fused_ttt_kl`'s signature over `reference_from_logits`: logits `states[k] @ weight.T`, targets all at once."""
    step_weights = [1.0] * len(states) if step_weights is None else step_weights
    logits = [s @ weight.T for s in states]
    return reference_from_logits(logits, verifier_logits(verifier_rows), valid, step_weights)


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


def soft_capped_head(weight: torch.Tensor, cap: float = 4.0):
    """A verifier head that is not `Linear(RMSNorm(y))`: `(1 + w)`-style norm, then soft-capped logits."""
    norm = 1.0 + 0.1 * torch.arange(weight.shape[1], dtype=weight.dtype, device=weight.device)

    def head(rows: torch.Tensor) -> torch.Tensor:
        normed = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6) * norm
        return cap * torch.tanh(normed @ weight.T / cap)

    return head


def ttt_case(K=4, B=2, T=13, H=6, Ht=5, Vd=37, dtype=torch.float64, seed=0):
    """Draft states that depend on an upstream leaf, a draft head, verifier rows and a non-linear verifier head,
    with packing (two documents and padding in row 0), a sparse loss mask and every step's valid rows."""
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(K, B, T, H, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(Vd, H, generator=g, dtype=dtype)
    verifier_rows = torch.randn(B, T, Ht, generator=g, dtype=dtype)
    head = soft_capped_head(torch.randn(Vd, Ht, generator=g, dtype=dtype))
    loss_mask = (torch.rand(B, T, generator=g) < 0.7).long()
    document_ids = torch.tensor([[0] * 5 + [1] * (T - 7) + [-1] * 2, [0] * T])
    return upstream, weight, verifier_rows, head, ttt_valid_rows(loss_mask, document_ids, K)


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])  # one row per chunk; several with a ragged last; one chunk
@pytest.mark.parametrize("train_head", [True, False])
def test_fused_loss_equals_the_unfused_reference(chunk_rows, train_head, monkeypatch):
    """Values, per-row KL and agreement, and gradients (draft head, draft states and what feeds them) of every step,
    with step decay, masks and packing, equal the unfused objective's in fp64."""
    upstream, weight, verifier_rows, head, valid = ttt_case()
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", {"cpu": chunk_rows * weight.shape[0]})
    weight.requires_grad_(train_head)
    decay = [0.8**k for k in range(len(valid))]

    def run(fn):
        states = [torch.tanh(u) for u in upstream]  # [B, T, H] each, differentiable back to `upstream`
        loss, kl, agree = fn(states, weight, verifier_rows, head, valid, decay)
        grads = torch.autograd.grad(loss, [upstream, weight] if train_head else [upstream])
        return loss, kl, agree, grads

    loss, kl, agree, grads = run(fused_ttt_kl)
    ref_loss, ref_kl, ref_agree, ref_grads = run(reference_ttt_loss)
    assert loss.dtype == torch.float64 and valid.sum() > 0 and 0 < agree.sum() < valid.sum()
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(kl, ref_kl, atol=1e-12, rtol=1e-12)
    assert torch.equal(agree, ref_agree)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=1e-12, rtol=1e-12)
    assert grads[0].abs().sum() > 0 and (grads[0].sum(-1)[~valid] == 0).all()  # rows that do not count: no gradient
    assert torch.equal(step_statistics(kl, agree, valid), step_statistics(ref_kl, ref_agree, valid))
    with torch.no_grad():  # evaluation: the same values, no graph
        again = fused_ttt_kl([torch.tanh(u) for u in upstream], weight, verifier_rows, head, valid, decay)
    assert not again[0].requires_grad and torch.equal(again[0], loss.detach()) and torch.equal(again[1], kl)


def reference_objective(logits, target_logits, loss: str, temperature: float, eta: float) -> torch.Tensor:
    """The plain per-row objective `[..., V] -> [...]` of `--loss` at a temperature, from its definition (autograd
    differentiates it): KL, TV = 1/2 sum |p - q|, -log(1 - TV), lambda KL + (1 - lambda) TV with a constant lambda."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_q = F.log_softmax(logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(target_logits.to(dtype) / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    tv = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    lam = torch.exp(-eta * (1 - tv)).detach()
    return {"kl": kl, "tv": tv, "lk": -torch.log(1 - tv), "kl_tv": lam * kl + (1 - lam) * tv}[loss]


@pytest.mark.parametrize(("loss", "temperature"), [("kl", 0.7), ("tv", 1.0), ("tv", 0.7), ("lk", 1.5), ("kl_tv", 0.7)])
def test_each_loss_equals_its_reference(loss, temperature, monkeypatch):
    """`--loss` tv, lk, kl_tv (and kl at a temperature): the fused value, per-row values and gradients (draft head
    and states) of every step, with step decay, masked rows, packing and several chunks, equal the plain
    computation on full `[B, T, Vd]` logits differentiated by autograd, in fp64."""
    upstream, weight, verifier_rows, head, valid = ttt_case()
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", {"cpu": 3 * weight.shape[0]})  # 3 rows per chunk, a ragged last
    weight.requires_grad_(True)
    decay, eta = [0.8**k for k in range(len(valid))], 2.0
    K, B, T = valid.shape

    def reference(states):
        targets, total, values = head(verifier_rows), 0.0, []
        for k, state in enumerate(states):
            value = reference_objective((state @ weight.T)[:, : T - k], targets[:, k:], loss, temperature, eta)
            value = torch.cat([value, value.new_zeros(B, k)], dim=1) * valid[k]
            total = total + decay[k] * value.sum() / valid[k].sum().clamp(min=1)
            values.append(value)
        return total, torch.stack(values)

    def fused(states):
        return fused_ttt_kl(states, weight, verifier_rows, head, valid, decay, loss, temperature, eta)[:2]

    shapes = saved_for_backward(lambda: fused([torch.tanh(u) for u in upstream]))
    assert shapes and not [s for s in shapes if s.numel() >= T * weight.shape[0]]  # nothing of T x Vd kept
    results = []
    for fn in (fused, reference):
        value, per_row = fn([torch.tanh(u) for u in upstream])
        results.append((value, per_row, *torch.autograd.grad(value, [upstream, weight])))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
    d_upstream = results[0][2]
    assert d_upstream.abs().sum() > 0 and (d_upstream.sum(-1)[~valid] == 0).all()  # masked rows: no gradient
    kl = fused_ttt_kl([torch.tanh(u) for u in upstream], weight, verifier_rows, head, valid, decay)[0]
    assert not torch.allclose(results[0][0], kl)  # another objective than the default KL


def saved_for_backward(fn) -> list[torch.Size]:
    """Shapes of the tensors autograd keeps for backward while `fn()` runs."""
    shapes = []

    def pack(t):
        shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("train_head", [True, False])
def test_no_vocabulary_sized_tensor_is_kept_for_backward(train_head):
    """The memory claim: nothing of `T x Vd` elements is saved for backward (the unfused objective saves several)."""
    K, B, T, H, Vd = 3, 2, 64, 16, 512
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(B, T, H, generator=g, requires_grad=True) for _ in range(K)]
    weight = torch.randn(Vd, H, generator=g).requires_grad_(train_head)
    rows, head = torch.randn(B, T, H, generator=g), soft_capped_head(torch.randn(Vd, H, generator=g))
    valid = ttt_valid_rows(torch.ones(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long), K)

    def big(shapes):
        return [s for s in shapes if s.numel() >= T * Vd]

    ours = saved_for_backward(lambda: fused_ttt_kl(states, weight, rows, head, valid))
    unfused = saved_for_backward(lambda: reference_ttt_loss(states, weight, rows, head, valid, [1.0] * K))
    assert big(ours) == [] and len(big(unfused)) >= K
    assert (torch.Size([Vd, H]) in ours) == train_head  # the head gradient, saved only when the head trains


def test_bf16_autocast_is_close_to_fp32():
    upstream, weight, verifier_rows, head, valid = ttt_case(T=40, H=16, Ht=16, Vd=300, dtype=torch.float32)
    weight.requires_grad_()
    results = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            states = [torch.tanh(u).to(torch.bfloat16 if autocast else torch.float32) for u in upstream]
            loss, kl, agree = fused_ttt_kl(states, weight, verifier_rows, head, valid, [1.0] * len(valid))
        results.append((loss, *torch.autograd.grad(loss, [upstream, weight])))
    (loss32, up32, w32), (loss16, up16, w16) = results
    assert loss16.dtype == torch.float32 and w16.dtype == torch.float32  # fp32 KL; the head gradient in its dtype
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    for low, full in ((up16, up32), (w16, w32)):
        assert torch.isfinite(low).all()
        torch.testing.assert_close(low, full, rtol=0, atol=3e-2 * full.abs().max().item())


def test_second_backward_is_an_error():
    upstream, weight, verifier_rows, head, valid = ttt_case()
    loss = fused_ttt_kl([u * 1.0 for u in upstream], weight, verifier_rows, head, valid)[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):  # the saved gradients were scaled in place
        loss.backward()


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


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """With compilation asked for and the compiler failing (as speculators' fused loss did under torch.compile on
    torch 2.11), the loss falls back to the eager path, with the same values and gradients."""
    upstream, weight, verifier_rows, head, valid = ttt_case()

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor: simulated failure")

        return run

    def loss_and_grad():
        loss = fused_ttt_kl([torch.tanh(u) for u in upstream], weight, verifier_rows, head, valid)[0]
        return loss, torch.autograd.grad(loss, upstream)[0]

    eager = loss_and_grad()
    monkeypatch.setenv("SPECULATORS_HF_COMPILE_LOSS", "1")
    monkeypatch.setattr(losses, "_KL_TERMS", {})
    monkeypatch.setattr(losses.torch, "compile", broken_compile)
    fallback = loss_and_grad()
    assert losses._KL_TERMS["cpu"].compiled is None  # gave up compiling, for good
    assert torch.equal(fallback[0], eager[0]) and torch.equal(fallback[1], eager[1])


@pytest.mark.gpu
@pytest.mark.parametrize("compile_loss", ["0", "1"])
def test_fused_loss_on_cuda_matches_the_reference(compile_loss, monkeypatch):
    """CUDA: fp32 exact against the reference (eager and compiled), bf16 autocast close (fp32 head-gradient
    accumulation through `addmm(out_dtype=float32)` where the build has it)."""
    monkeypatch.setenv("SPECULATORS_HF_COMPILE_LOSS", compile_loss)
    monkeypatch.setattr(losses, "_KL_TERMS", {})
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", {"cpu": 2**23, "cuda": 128 * 5000})  # 128 rows: several chunks
    upstream, weight, verifier_rows, _, valid = ttt_case(T=300, H=64, Ht=64, Vd=5000, dtype=torch.float32)
    upstream, weight, verifier_rows, valid = (t.cuda() for t in (upstream.detach(), weight, verifier_rows, valid))
    upstream.requires_grad_()
    weight.requires_grad_()
    head = soft_capped_head(torch.randn(5000, 64, generator=torch.Generator().manual_seed(1)).cuda())
    results = {}
    for name, fn, autocast in (
        ("ref", reference_ttt_loss, False),
        ("fused", fused_ttt_kl, False),
        ("fused_bf16", fused_ttt_kl, True),
    ):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = fn([torch.tanh(u) for u in upstream], weight, verifier_rows, head, valid, [1.0, 0.8, 0.64, 0.5])[0]
        results[name] = (loss, *torch.autograd.grad(loss, [upstream, weight]))
    for got, ref in zip(results["fused"], results["ref"]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    for got, ref in zip(results["fused_bf16"], results["ref"]):
        torch.testing.assert_close(got.float(), ref, rtol=0, atol=3e-2 * ref.abs().max().item())


def identity_head_loss(step_logits: list[torch.Tensor], targets: torch.Tensor, valid: torch.Tensor):
    """`fused_ttt_kl` with the draft states as logits (identity draft head) and the verifier rows as target logits."""
    eye = torch.eye(targets.shape[-1])
    return fused_ttt_kl(step_logits, eye, targets, lambda rows: rows, valid)


def test_loss_and_metrics_on_a_hand_built_batch():
    # Vd = 2, one row of T = 4 positions, one document, all rows masked.
    big = 10.0
    targets = torch.tensor([[[big, 0], [0, big], [big, 0], [0, big]]])  # verifier argmax: 0 1 0 1
    step0 = torch.tensor([[[big, 0], [big, 0], [big, 0], [0, big]]])  # draft argmax: 0 0 0 1 -> rows 0, 2, 3 right
    step1 = torch.tensor([[[0, big], [0, big], [0, big], [0, big]]])  # step 1 row t vs target t+1: 1 1 1 (0, 1, 0, 1)
    valid = ttt_valid_rows(torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 2)

    _, kl, agree = identity_head_loss([step0, step1], targets, valid)
    stats = step_statistics(kl, agree, valid).view(1, 2, 5)
    stats0, stats1 = stats[:, 0], stats[:, 1]
    loss0 = stats0[0, 0] / stats0[0, 1]
    expected_kl = forward_kl(step0, targets)
    assert torch.allclose(loss0, expected_kl.mean())
    kl_wrong = forward_kl(torch.tensor([big, 0]), torch.tensor([0, big]))  # one wrong row
    assert torch.allclose(loss0, kl_wrong / 4, rtol=1e-4)
    assert agree[0].tolist() == [[True, False, True, True]]

    # step 1: rows 0..2 compared with target rows 1..3 (argmax 1, 0, 1): row 0 right, row 1 wrong, row 2 right
    assert stats1[0, 1].item() == 3  # the last row drops out
    assert stats1[0, 2].item() == 2  # acc_1 = 2/3
    assert stats1[0, 4].item() == 2  # rows 0 and 2 had step 0 right
    assert stats1[0, 3].item() == 2  # both of them right at step 1 -> cond_acc_1 = 1
    assert agree[1].tolist() == [[True, False, True, False]]

    m = metrics_from_stats(torch.stack([stats0[0], stats1[0]]))
    assert m["acc_0"] == pytest.approx(0.75) and m["cond_acc_0"] == pytest.approx(0.75)
    assert m["acc_1"] == pytest.approx(2 / 3) and m["cond_acc_1"] == pytest.approx(1.0)
    assert m["tau_sim"] == pytest.approx(1 + 0.75 + 0.75 * 1.0)
    assert m["loss_0"] == pytest.approx(loss0.item(), rel=1e-5)
    assert m["loss_1"] == pytest.approx((forward_kl(step1[:, :3], targets[:, 1:]).mean()).item(), rel=1e-5)


def test_masked_rows_and_other_documents_drop_out():
    targets = torch.randn(1, 5, 3)
    logits = torch.randn(1, 5, 3)
    valid = ttt_valid_rows(torch.tensor([[1, 0, 1, 1, 1]]), torch.tensor([[0, 0, 0, 1, 1]]), 2)
    loss, kl, _ = identity_head_loss([logits, logits], targets, valid)
    # step 1 rows t=0..3 use mask[t+1] = 0 1 1 1 and need doc[t+1] == doc[t]: rows 1 and 3 count
    assert valid[1].tolist() == [[False, True, False, True, False]]
    expected = forward_kl(logits[:, [1, 3]], targets[:, [2, 4]])
    assert torch.allclose(kl[1, :, [1, 3]], expected)
    step0 = forward_kl(logits[:, [0, 2, 3, 4]], targets[:, [0, 2, 3, 4]])  # step 0: the rows with mask[t] = 1
    assert torch.allclose(loss, step0.mean() + expected.mean())


def test_forward_kl_known_value():
    p = torch.tensor([[[math.log(0.5), math.log(0.5)]]])
    q = torch.tensor([[[math.log(0.25), math.log(0.75)]]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    valid = torch.ones(1, 1, 1, dtype=torch.bool)
    assert identity_head_loss([q], p, valid)[0].item() == pytest.approx(expected, rel=1e-5)
    assert forward_kl(q, p).item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------- in the trainer, end to end


@pytest.fixture(scope="module")
def small_data(peaked_verifier_path, tmp_path_factory):
    """8 samples of random tokens, loss masks and hidden states (layer ids [1, 2, 3, 4]) for the tiny verifier."""
    from collections import Counter

    from transformers import AutoConfig

    from speculators_hf.formats.shards import shard_name, write_index, write_shard
    from speculators_hf.vocab import build_vocab_mapping, save_vocab_mapping

    config = AutoConfig.from_pretrained(peaked_verifier_path)
    out, g = tmp_path_factory.mktemp("data"), torch.Generator().manual_seed(0)
    samples = [
        {
            "input_ids": torch.randint(0, config.vocab_size, (60,), generator=g),
            "loss_mask": (torch.rand(60, generator=g) < 0.6).long(),
            "hidden_states": torch.randn(60, 4, config.hidden_size, generator=g),
        }
        for _ in range(8)
    ]
    write_index(
        out, {"shards": [write_shard(out / shard_name(0), samples, list(range(8)))], "layer_ids": [1, 2, 3, 4]}
    )
    freq = Counter(int(t) for s in samples for t, m in zip(s["input_ids"], s["loss_mask"]) if m)
    save_vocab_mapping(out, *build_vocab_mapping(freq, 512, config.vocab_size))
    return out


def test_training_with_the_fused_loss_follows_the_reference_loss_curve(
    peaked_verifier_path, small_data, tmp_path, monkeypatch
):
    """A short real training run (trained draft head, decay 0.8) logs the same losses and metrics with the fused loss
    as with the unfused reference swapped in; and the trainer's step keeps nothing of `S x Vd` for backward."""
    from speculators_hf.commandline import make_parser, parse
    from speculators_hf.training import Eagle3ModelArguments, Eagle3Trainer, Eagle3TrainingArguments
    from speculators_hf.training.setup import build_datasets, build_draft
    from tests.training_data import train_argv

    extra = ["--total-seq-len", "128", "--max-steps", "4", "--lr", "3e-3", "--ttt-step-loss-decay", "0.8"]
    argv = train_argv(peaked_verifier_path, small_data, tmp_path, *extra)
    model_args, args = parse(make_parser((Eagle3ModelArguments, Eagle3TrainingArguments)), argv)[:2]
    train_ds, _, layer_ids = build_datasets(model_args, args)

    def train() -> tuple[list[dict], int]:
        trainer = Eagle3Trainer(
            model=build_draft(model_args, train_ds, layer_ids, seed=0), args=args, train_dataset=train_ds
        )
        assert trainer.model.lm_head.weight.requires_grad
        batch = trainer._prepare_inputs(trainer.data_collator([train_ds[0]]))
        S, Vd = batch["input_ids"].shape[1], trainer.model.config.draft_vocab_size
        shapes = saved_for_backward(lambda: trainer.compute_loss(trainer.model, batch))
        trainer._metrics["train"] = None
        big = [s for s in shapes if Vd in s and s.numel() >= S * Vd]
        trainer.train()
        logs = [
            {k: v for k, v in h.items() if k.startswith(("loss", "acc", "cond_acc"))}
            for h in trainer.state.log_history
        ]
        return [h for h in logs if h], len(big)

    fused, fused_big = train()
    monkeypatch.setattr(losses, "fused_ttt_kl", reference_ttt_loss)  # what the draft's forward calls
    reference, reference_big = train()
    assert fused_big == 0 and reference_big >= 1
    assert len(fused) == len(reference) == 4
    for ours, ref in zip(fused, reference):
        assert ours.keys() == ref.keys() and {"loss", "loss_2", "acc_0", "cond_acc_2"} <= set(ours)
        for key in ours:
            assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert fused[-1]["loss"] < fused[0]["loss"]


# --------------------------------------------------------------------------------- under FSDP2 and DDP (CPU)


def _tiny_draft(verifier_path: str):
    """A 2-layer draft for the tiny verifier (its own frozen head loaded), with a trainable draft head and a draft
    vocabulary of 512 (the first 512 verifier ids), built the same way in every process."""
    from speculators_hf.modeling import Eagle3DraftModel

    torch.manual_seed(0)
    d2t, t2d = torch.zeros(512, dtype=torch.long), torch.zeros(2048, dtype=torch.bool)
    t2d[:512] = True
    model = Eagle3DraftModel.from_verifier(verifier_path, d2t, t2d, num_hidden_layers=2, aux_layer_ids=[1, 2, 3])
    model.lm_head.weight.requires_grad_(True)
    model.set_attn_implementation("sdpa")
    return model


def _ttt_loss_through_forward(model, config, K=3):
    """The trainer's loss (`Eagle3Trainer.compute_loss` without the Trainer): K draft steps, then the loss call."""
    from transformers.cache_utils import DynamicCache

    from speculators_hf.modeling.losses import shift_for_step

    g = torch.Generator().manual_seed(1)
    B, S, Ht = 2, 24, config.hidden_size
    documents = torch.tensor([[0] * 10 + [1] * 10 + [-1] * 4, [0] * S])
    input_ids = torch.randint(0, config.vocab_size, (B, S), generator=g)
    loss_mask = (torch.rand(B, S, generator=g) < 0.8).long()
    aux, verifier_rows = torch.randn(B, S, 3 * Ht, generator=g), torch.randn(B, S, Ht, generator=g)
    cache, hidden, states = DynamicCache(config=config), None, []
    step0 = ttt_attention_mask(documents, 0)
    for k in range(K):
        out = model(
            input_ids=shift_for_step(input_ids, k),
            aux_hidden_states=aux if k == 0 else None,
            hidden_states=hidden,
            position_ids=torch.arange(S).repeat(B, 1) + k,
            attention_mask=ttt_attention_mask(documents, k, step0),
            past_key_values=cache,
            use_cache=True,
            return_logits=False,
        )
        states.append(out.normed_hidden_states)
        hidden = out.hidden_states
    valid = ttt_valid_rows(loss_mask, documents, K)
    out = model(ttt_hidden_states=states, verifier_last_hidden_states=verifier_rows, loss_mask=valid)
    return out.loss, step_statistics(out.step_kl, out.step_agree, valid)


def _distributed_worker(rank: int, world: int, init_method: str, out_dir: str, verifier_path: str) -> None:
    import copy
    import json

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    base = _tiny_draft(verifier_path)
    reference = copy.deepcopy(base)
    ref_loss, ref_stats = _ttt_loss_through_forward(reference, reference.config)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    report = {}
    for mode in ("fsdp2", "ddp"):
        model = copy.deepcopy(base)
        if mode == "fsdp2":  # one unit per decoder layer + the root (lm_head, verifier head, fc, ...), as fsdp2.yaml
            for layer in model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        else:
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        loss, stats = _ttt_loss_through_forward(wrapped, model.config)
        loss.backward()  # both ranks see the same batch: the averaged gradients equal the single-process ones
        grads = {}
        for n, p in model.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        report[mode] = {
            "loss": abs(loss.item() - ref_loss.item()),
            "stats": bool(torch.equal(stats, ref_stats)),
            "names": sorted(grads) == sorted(ref_grads),
            "grad": max(((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item() for n in grads),
            "frozen": [n for n in grads if n.startswith("verifier")],  # the verifier head: no gradient
            "sharded": mode != "fsdp2"
            or all(
                hasattr(p, "full_tensor") for n, p in model.named_parameters() if n.startswith(("lm_head", "verifier"))
            ),
        }
        del wrapped
    dist.barrier()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_fused_loss_under_fsdp2_and_ddp_equals_one_process(tiny_verifier_path, tmp_path):
    """2 CPU processes (gloo): with the decoder layers and the root sharded by FSDP2 (the draft head and the frozen
    verifier head are gathered only inside the root's forward, where the loss runs), and under DDP, the loss, the
    statistics and every gradient equal one unsharded process's; the verifier head gets no gradient."""
    import json

    import torch.multiprocessing as mp

    rendezvous = f"file://{tmp_path / 'rendezvous'}"  # a file, not a TCP port another test could take meanwhile
    mp.spawn(_distributed_worker, args=(2, rendezvous, str(tmp_path), str(tiny_verifier_path)), nprocs=2, join=True)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for mode in ("fsdp2", "ddp"):
            r = report[mode]
            assert r["loss"] < 1e-6 and r["stats"] and r["names"] and r["grad"] < 1e-5, r
            assert r["frozen"] == [] and r["sharded"], r


@pytest.mark.parametrize(("loss", "temperature"), [("kl", 1.0), ("tv", 0.7)])
def test_targets_anywhere_and_reverse_rows_equal_their_reference(loss, temperature, monkeypatch):
    """The on-policy stage's form: each row's target is any row of a flat `[M, Ht]` (`target_index`) and some rows
    take the reverse KL `KL(q || p)`: values, per-row values and gradients equal autograd on full logits, in fp64
    (one target ruled out by the verifier's head included: its reverse KL stays finite)."""
    upstream, weight, _, head, valid = ttt_case()
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", {"cpu": 3 * weight.shape[0]})
    weight.requires_grad_(True)
    K, B, T = valid.shape
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(2 * B * T, 5, generator=g, dtype=torch.float64)
    index = torch.randint(0, len(flat), (K, B, T), generator=g)
    reverse = valid & (torch.rand(K, B, T, generator=g) < 0.5)

    def ruled_out(rows):  # the last draft token has probability 0 under the verifier
        logits = head(rows)
        return torch.cat([logits[:, :-1], torch.full_like(logits[:, -1:], float("-inf"))], dim=1)

    def reference(states):
        total, values = 0.0, []
        for k, state in enumerate(states):
            logits, target = state @ weight.T, ruled_out(flat)[index[k]].clamp(min=-1e4)  # [B, T, Vd]; p = 0 stays
            forward = reference_objective(logits, target, loss, temperature, 0.0)
            log_q = F.log_softmax(logits / temperature, dim=-1)
            log_p = F.log_softmax(target / temperature, dim=-1).clamp(min=math.log(torch.finfo(torch.float64).tiny))
            backward = (log_q.exp() * (log_q - log_p)).sum(-1)
            value = torch.where(reverse[k], backward, forward) * valid[k]
            total = total + value.sum() / valid[k].sum().clamp(min=1)
            values.append(value)
        return total, torch.stack(values)

    def fused(states):
        out = fused_ttt_kl(states, weight, flat, ruled_out, valid, None, loss, temperature, 0.0, index, reverse)
        return out[:2]

    results = []
    for fn in (fused, reference):
        value, per_row = fn([torch.tanh(u) for u in upstream])
        results.append((value, per_row, *torch.autograd.grad(value, [upstream, weight])))
    assert torch.isfinite(results[0][1]).all() and reverse.sum() > 0 and (valid & ~reverse).sum() > 0
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
