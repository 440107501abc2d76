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


def ttt_attention_mask(document_ids: torch.Tensor, step: int) -> torch.Tensor:
    """Dense step-`step` attention mask (True = attend) for sdpa/eager.

    Args:
        document_ids (`torch.LongTensor` of shape `[B, T]`): document index per position, -1 on padding.
        step (`int`): the TTT step `k`; the keys are the `k + 1` cached steps, `(k + 1) * T` in all.

    Returns:
        `torch.BoolTensor` of shape `[B, 1, T, (k + 1) * T]`.
    """
    T = document_ids.shape[1]
    pos = torch.arange(T, device=document_ids.device)
    same_doc = (document_ids[:, :, None] == document_ids[:, None, :]) & (document_ids[:, :, None] >= 0)  # [B, T, T]
    diagonal = (pos[:, None] == pos[None, :]).expand_as(same_doc)  # [B, T, T]
    step0 = (same_doc & (pos[:, None] >= pos[None, :])) | diagonal  # causal within the document
    return torch.cat([step0] + [diagonal] * step, dim=-1)[:, None]  # [B, 1, T, (k + 1) T]


def ttt_block_mask(document_ids: torch.Tensor, step: int):
    """The same mask as `ttt_attention_mask`, as a FlexAttention `BlockMask` (CUDA; flex has no CPU backward)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = document_ids.shape

    def mask_mod(b, h, q, kv):
        s = kv % T
        same_doc = (document_ids[b, q] == document_ids[b, s]) & (document_ids[b, q] >= 0)
        return ((kv < T) & same_doc & (q >= s)) | (s == q)

    return create_block_mask(mask_mod, B, None, T, (step + 1) * T, device=document_ids.device)


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


def forward_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Per-row forward KL(p_target || q_draft) over the last dimension, in fp32. `[..., V] -> [...]`."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and metric sums of one TTT step.

    Args:
        logits (`[B, T, Vd]`): the draft's logits at step `step`.
        target_logits (`[B, T, Vd]`): verifier logits over the draft vocabulary (rows of step 0).
        loss_mask (`[B, T]`), document_ids (`[B, T]`): aligned loss mask and document ids of the packed rows.
        prev_correct (`[B, T]` bool or None): rows whose steps `< step` were all correct (None at step 0).

    Returns:
        `(loss, stats, correct)`: the masked-mean KL (scalar, differentiable); `stats` `[B, len(STEP_STATS)]` per-row
        sums (KL sum, rows, correct rows, correct rows among those with all previous steps correct, rows with all
        previous steps correct); `correct` `[B, T]` bool (draft argmax == verifier argmax, False on dropped rows).
    """
    B, T, _ = logits.shape
    n = T - step
    valid = step_valid_rows(loss_mask, document_ids, step)  # [B, T - k]
    logits, targets = logits[:, :n], target_logits[:, step:]  # [B, T - k, Vd]
    kl = forward_kl(logits, targets)  # [B, T - k]
    loss = masked_mean(kl, valid)

    with torch.no_grad():
        hit = (logits.argmax(-1) == targets.argmax(-1)) & valid  # [B, T - k]
        prev = valid if prev_correct is None else prev_correct[:, :n] & valid
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
        correct = torch.zeros(B, T, dtype=torch.bool, device=logits.device)
        correct[:, :n] = hit
        if prev_correct is not None:
            correct &= prev_correct
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
