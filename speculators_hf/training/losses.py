"""Pure functions of the training-time-test (TTT) objective: step masks, the per-step KL, and the step metrics.

Notation (one packed row of `T` positions; `k` = TTT step, `0 <= k < K`):

    row t, step 0     input (g_t, x_{t+1})         predicts x_{t+2}    target row t       (verifier state y_{t+1})
    row t, step k     input (h^{k-1}_t, x_{t+1+k}) predicts x_{t+2+k}  target row t + k

Step k's logits at row `t` are compared with the targets at row `t + k`; the last `k` rows drop out, and so does any
row whose row `t + k` lies in another document (packing) or in padding (`document_ids == -1`).

Attention at step k (`ttt_attention_mask`): row t sees the step-0 keys `s <= t` of its own document plus its own
position's key in every later step `1..k` (one diagonal per step). Padding rows see only themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Per-step statistics summed over the masked rows of each packed row (see `step_statistics`).
STEP_STATS = ("loss_sum", "count", "correct", "cond_correct", "cond_count")


# ------------------------------------------------------------------------------------------------------- masks


def ttt_attention_mask(
    document_ids: torch.Tensor, step: int, step0: torch.Tensor | None = None, sliding_window: int | None = None
) -> torch.Tensor:
    """Dense step-`step` attention mask (True = attend) for sdpa/eager.

    Args:
        document_ids (`torch.LongTensor` of shape `[B, T]`): document index per position, -1 on padding.
        step (`int`): the TTT step `k`; the keys are the `k + 1` cached steps, `(k + 1) * T` in all.
        step0 (`torch.BoolTensor` of shape `[B, 1, T, T]`, *optional*): this batch's step-0 mask, reused.
        sliding_window (`int`, *optional*): a draft with windowed attention: row t's step-k query sits at position
            `t + k`, so it sees the step-0 keys `s` with `t + k - s < sliding_window` (as vLLM's window does).

    Returns:
        `torch.BoolTensor` of shape `[B, 1, T, (k + 1) * T]`.
    """
    if step0 is not None and step == 0:
        return step0
    B, T = document_ids.shape
    pos = torch.arange(T, device=document_ids.device)
    diagonal = (pos[:, None] == pos[None, :]).expand(B, 1, T, T)  # [B, 1, T, T]
    if step0 is None:
        same_doc = (document_ids[:, :, None] == document_ids[:, None, :]) & (document_ids[:, :, None] >= 0)
        causal = pos[:, None] >= pos[None, :]  # [T, T]
        if sliding_window is not None:
            causal = causal & (pos[:, None] - pos[None, :] < sliding_window)
        step0 = ((same_doc & causal)[:, None] | diagonal).contiguous()  # causal per document
    if step == 0:
        return step0
    first = step0
    if sliding_window is not None:  # step k's queries sit k positions later: the window drops k more old keys
        first = step0 & ((pos[:, None] + step - pos[None, :] < sliding_window) | diagonal)
    return torch.cat([first] + [diagonal] * step, dim=-1)  # [B, 1, T, (k + 1) T]


def ttt_block_mask(document_ids: torch.Tensor, step: int, step0=None, sliding_window: int | None = None):
    """The same mask as `ttt_attention_mask`, as a FlexAttention `BlockMask` (CUDA; flex has no CPU backward).

    With `step0` (this batch's step-0 `BlockMask`) and `T` a multiple of its block size, the step-`k` mask is the
    step-0 block lists plus one diagonal block per later step, written directly instead of re-evaluating the mask
    over all `T x (k + 1) T` positions (not with a sliding window, which drops more step-0 keys at every step).
    """
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    B, T = document_ids.shape
    window = sliding_window if sliding_window is not None else 2 * T + step + 1  # no window: every distance passes

    def mask_mod(b, h, q, kv):
        s = kv % T
        same_doc = (document_ids[b, q] == document_ids[b, s]) & (document_ids[b, q] >= 0)
        return ((kv < T) & same_doc & (q >= s) & (q + step - s < window)) | (s == q)

    if step0 is not None and step == 0:
        return step0
    if (
        step0 is None
        or sliding_window is not None
        or T % step0.BLOCK_SIZE[1]
        or step0.BLOCK_SIZE[0] != step0.BLOCK_SIZE[1]
    ):
        return create_block_mask(mask_mod, B, None, T, (step + 1) * T, device=document_ids.device)
    blocks = T // step0.BLOCK_SIZE[1]  # kv blocks per step (= q blocks)
    partial = step0.kv_num_blocks  # [B, 1, blocks]
    indices = step0.kv_indices.new_zeros(*step0.kv_indices.shape[:-1], (step + 1) * blocks)  # [B, 1, blocks, (k+1)b]
    indices[..., :blocks] = step0.kv_indices
    later = torch.arange(1, step + 1, device=partial.device, dtype=indices.dtype)  # steps 1..k
    diagonal = later * blocks + torch.arange(blocks, device=partial.device, dtype=indices.dtype)[:, None]  # [b, k]
    slots = partial.long()[..., None] + torch.arange(step, device=partial.device)  # [B, 1, blocks, k]
    indices.scatter_(-1, slots, diagonal.expand_as(slots).contiguous())  # appended after step 0's partial blocks
    full_num, full_indices = step0.full_kv_num_blocks, step0.full_kv_indices
    if full_indices is not None:  # step 0's full blocks stay full; the diagonal blocks are partial
        full_indices = torch.cat([full_indices, full_indices.new_zeros(*full_indices.shape[:-1], step * blocks)], -1)
    return BlockMask.from_kv_blocks(
        partial + step,
        indices,
        full_num,
        full_indices,
        BLOCK_SIZE=step0.BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=(T, (step + 1) * T),
    )


# ---------------------------------------------------------------------------------------------- per-step terms


def shift_for_step(x: torch.Tensor, step: int, fill: float | int = 0) -> torch.Tensor:
    """`x[:, step:]` padded with `fill` at the end back to length `T` (teacher-forced inputs of step `step`)."""
    if step == 0:
        return x
    pad = x.new_full((x.shape[0], step, *x.shape[2:]), fill)
    return torch.cat([x[:, step:], pad], dim=1)


def step_valid_rows(loss_mask: torch.Tensor, document_ids: torch.Tensor, step: int) -> torch.Tensor:
    """Rows of step `step` that count: `loss_mask[t + k]` and row `t + k` in the same document as row `t`.

    Returns `torch.BoolTensor` of shape `[B, T - k]` (rows `t = 0 .. T - k - 1`).
    """
    T = loss_mask.shape[1]
    same_doc = (document_ids[:, step:] == document_ids[:, : T - step]) & (document_ids[:, step:] >= 0)
    return loss_mask[:, step:].bool() & same_doc


# Rows per chunk of the KL: a chunk's fp32 temporaries stay near `_KL_CHUNK_ELEMENTS` values each.
_KL_CHUNK_ELEMENTS = 2**24


def _kl_rows(logits: torch.Tensor, targets: torch.Tensor, kl: torch.Tensor, grad: torch.Tensor | None) -> None:
    """KL(p || q) of matching rows `[N, V]` into `kl` `[N]`, and `softmax(logits) - p` (its gradient) into `grad`."""
    N, V = logits.shape
    rows = max(1, _KL_CHUNK_ELEMENTS // V)
    for start in range(0, N, rows):
        chunk = slice(start, start + rows)
        log_q = F.log_softmax(logits[chunk].float(), dim=-1)
        log_p = F.log_softmax(targets[chunk].float(), dim=-1)
        p = log_p.exp()
        kl[chunk] = log_p.sub_(log_q).mul_(p).sum(-1)  # sum p (log p - log q), in place: three temporaries
        if grad is not None:
            grad[chunk] = log_q.exp_().sub_(p)


def _shifted_kl(logits: torch.Tensor, targets: torch.Tensor, shift: int, with_grad: bool):
    B, T, _ = logits.shape
    kl = torch.zeros(B, T, dtype=torch.float32, device=logits.device)
    grad = torch.zeros_like(logits) if with_grad else None  # the last `shift` rows: no target, KL 0, gradient 0
    rows = slice(0, T - shift)
    for b in range(B):
        _kl_rows(logits[b, rows], targets[b, shift:], kl[b, rows], None if grad is None else grad[b, rows])
    return kl, grad


class _ShiftedForwardKL(torch.autograd.Function):
    """Per-row KL of `logits[:, t]` against `targets[:, t + shift]`, saving only `softmax(q) - p` for backward.

    The unfused `p * (log p - log_softmax(q))` keeps two fp32 `[B, T, V]` tensors per TTT step for backward (the
    draft's log-probabilities and the target probabilities); this keeps one in the logits' dtype (bf16 under
    autocast), computes the fp32 terms chunk by chunk, and reads the shifted targets without copying them.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, shift: int) -> torch.Tensor:
        kl, grad = _shifted_kl(logits, targets, shift, with_grad=True)
        ctx.save_for_backward(grad)
        ctx.used = False
        return kl  # [B, T]

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        if ctx.used:  # the saved gradient was scaled in place by the first backward
            raise RuntimeError("shifted_forward_kl supports one backward pass per forward (no retain_graph reuse).")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_kl.unsqueeze(-1).to(grad.dtype)), None, None  # in place: no second [B, T, V]


def shifted_forward_kl(logits: torch.Tensor, targets: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """Forward KL(p_target || q_draft) of row `t` of `logits` against row `t + shift` of `targets`, in fp32.

    Args:
        logits (`[B, T, V]`): the draft's logits (any float dtype; differentiable).
        targets (`[B, T, V]`): the verifier's logits (no gradient).
        shift (`int`): the TTT step `k`; the last `k` rows have no target and get KL 0.

    Returns:
        `torch.FloatTensor` of shape `[B, T]`.
    """
    if logits.requires_grad and torch.is_grad_enabled():
        return _ShiftedForwardKL.apply(logits, targets.detach(), shift)
    return _shifted_kl(logits, targets, shift, with_grad=False)[0]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over `mask` (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def step_statistics(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    document_ids: torch.Tensor,
    step: int,
    prev_correct: torch.Tensor | None,
    target_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and metric sums of one TTT step.

    Args:
        logits (`[B, T, Vd]`): the draft's logits at step `step`.
        target_logits (`[B, T, Vd]`): verifier logits over the draft vocabulary (rows of step 0).
        loss_mask (`[B, T]`), document_ids (`[B, T]`): aligned loss mask and document ids of the packed rows.
        prev_correct (`[B, T]` bool or None): rows whose steps `< step` were all correct (None at step 0).
        target_ids (`[B, T]`, *optional*): `target_logits.argmax(-1)`, computed once per batch by the caller.

    Returns:
        `(loss, stats, correct)`: the masked-mean KL (scalar, differentiable); `stats` `[B, len(STEP_STATS)]` per-row
        sums (KL sum, rows, correct rows, correct rows among those with all previous steps correct, rows with all
        previous steps correct); `correct` `[B, T]` bool (draft argmax == verifier argmax, False on dropped rows).
    """
    B, T, _ = logits.shape
    n = T - step
    valid = torch.zeros(B, T, dtype=torch.bool, device=logits.device)
    valid[:, :n] = step_valid_rows(loss_mask, document_ids, step)  # rows t < T - k can count
    kl = shifted_forward_kl(logits, target_logits, step)  # [B, T]
    loss = masked_mean(kl, valid)

    with torch.no_grad():
        if target_ids is None:
            target_ids = target_logits.argmax(-1)  # [B, T]
        hit = (logits.argmax(-1) == shift_for_step(target_ids, step, fill=-1)) & valid  # [B, T]
        prev = valid if prev_correct is None else prev_correct & valid
        vf = valid.float()
        stats = torch.stack(
            [
                (kl.detach() * vf).sum(-1),
                vf.sum(-1),
                hit.float().sum(-1),
                (hit & prev).float().sum(-1),
                prev.float().sum(-1),
            ],
            dim=-1,
        )  # [B, 5]
        correct = hit if prev_correct is None else hit & prev_correct
    return loss, stats, correct


def metrics_from_stats(stats: torch.Tensor) -> dict[str, float]:
    """Step metrics from summed statistics `[K, len(STEP_STATS)]` (summed over rows, batches and processes).

    `loss_k` = masked-mean KL, `acc_k` = P(argmax agrees), `cond_acc_k` = P(step k agrees | steps < k agreed),
    `tau_sim = 1 + sum_k prod_{i <= k} cond_acc_i` (the acceptance length a greedy chain of K drafts would reach).
    """
    stats = stats.double()
    out: dict[str, float] = {}
    tau, run = 1.0, 1.0
    for k, (loss_sum, count, correct, cond_correct, cond_count) in enumerate(stats.tolist()):
        out[f"loss_{k}"] = loss_sum / max(count, 1.0)
        out[f"acc_{k}"] = correct / max(count, 1.0)
        cond = cond_correct / max(cond_count, 1.0)
        out[f"cond_acc_{k}"] = cond
        run *= cond
        tau += run
    out["tau_sim"] = tau
    return out
