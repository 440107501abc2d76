"""The training-time-test (TTT) objective: step masks, the fused draft head + loss (KL, TV, LK) of all steps, and the
step metrics.

Notation (one packed row of `T` positions; `k` = TTT step, `0 <= k < K`):

    row t, step 0     input (g_t, x_{t+1})         predicts x_{t+2}    target row t       (verifier state y_{t+1})
    row t, step k     input (h^{k-1}_t, x_{t+1+k}) predicts x_{t+2+k}  target row t + k

Step k's logits at row `t` are compared with the targets at row `t + k`; the last `k` rows drop out, and so does any
row whose row `t + k` lies in another document (packing) or in padding (`document_ids == -1`).

Attention at step k (`ttt_attention_mask`): row t sees the step-0 keys `s <= t` of its own document plus its own
position's key in every later step `1..k` (one diagonal per step). Padding rows see only themselves.

Loss (`fused_ttt_kl`): `sum_k w_k * mean over counted rows t of D(p_{t+k}, q^k_t)`, with `p` the verifier head's
softmax over the draft vocabulary and `q^k` the draft head's at step k, both at the loss temperature `T`
(`p = softmax(z_p / T)`, `q = softmax(z / T)`; `T = 1` by default). The per-row objective `D` (`--loss`, `LOSSES`):

    kl      KL(p || q) = sum_i p_i log(p_i / q_i)                         (the default: EAGLE-3's objective)
    tv      TV(p, q) = 1/2 sum_i |p_i - q_i|           acceptance at temperature T is alpha = 1 - TV(p_T, q_T)
    lk      -log alpha = -log(1 - TV(p, q))            LK's negative log-acceptance (arXiv 2602.23881)
    kl_tv   lambda KL(p || q) + (1 - lambda) TV(p, q),  lambda = exp(-eta * alpha), no gradient through lambda
            (after LK's adaptive hybrid: KL while the row's acceptance is low, TV as it grows; `eta` = `--loss-eta`;
            this per-row lambda schedule is ours: the summaries of the paper we could read name the form, not it)

Their gradients w.r.t. the draft logits `z` (`q = softmax(z / T)`, `s = sign(q - p)`), formed in the chunk:

    d KL / d z_j = (q_j - p_j) / T
    d TV / d z_j = 1/2 q_j (s_j - sum_i s_i q_i) / T
    d(-log alpha) / d z_j = (d TV / d z_j) / alpha,   alpha = sum_i min(p_i, q_i) (= 1 - TV, summed directly)
    d kl_tv / d z_j = lambda d KL / d z_j + (1 - lambda) d TV / d z_j

The on-policy stage (`training/on_policy.py`) passes each row's target explicitly (`target_index`: a row of the
data path or a continuation the verifier scored) and marks rejected proposals, whose objective is the reverse KL
`KL(q || p) = sum_i q_i log(q_i / p_i)`, `d / d z_j = q_j (log(q_j / p_j) - KL(q || p)) / T`.

The loss takes the K steps' final-norm states, never `[T, Vd]` logits: target rows are visited chunk by chunk, each
chunk's verifier logits serve all K steps, and the gradients are formed in the same pass, so backward keeps only
`[T, H]`- and `[Vd, H]`-sized tensors.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from ..utils import get_logger

logger = get_logger(__name__)

# Per-step statistics summed over the masked rows of each packed row (see `step_statistics`).
STEP_STATS = ("loss_sum", "count", "correct", "cond_correct", "cond_count")

LOSSES = ("kl", "tv", "lk", "kl_tv")  # the per-row objectives (module docstring)
DEFAULT_LOSS_ETA = 3.0  # kl_tv's eta: lambda = exp(-eta * alpha)


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


def ttt_valid_rows(loss_mask: torch.Tensor, document_ids: torch.Tensor, ttt_steps: int) -> torch.Tensor:
    """`step_valid_rows` of every step, padded with False to `T` rows: `torch.BoolTensor` of shape `[K, B, T]`."""
    B, T = loss_mask.shape
    valid = torch.zeros(ttt_steps, B, T, dtype=torch.bool, device=loss_mask.device)
    for k in range(min(ttt_steps, T)):
        valid[k, :, : T - k] = step_valid_rows(loss_mask, document_ids, k)
    return valid


# ------------------------------------------------------------------------------------- the fused head + KL

# Target rows per chunk: a chunk's `[rows, Vd]` fp32 temporaries stay near `_CHUNK_ELEMENTS` values each (32 MiB;
# 128 MiB on CUDA, where larger matmuls pay off and memory is less tight than the launch count).
_CHUNK_ELEMENTS = {"cpu": 2**23, "cuda": 2**25}


@dataclass
class _Plan:
    """Which rows the fused loss visits, chunk by chunk (built once per batch; one host sync).

    `targets` are the flat verifier rows some step compares with (sorted); chunk `c` covers `targets[c0:c1]`. For
    step `k`, `rows[k]` are its valid flat draft rows (sorted) and `tpos[k]` the positions of their targets
    (`rows[k] + k`) in `targets`; `spans[k][c] = (lo, hi, first)` selects `rows[k][lo:hi]`, the rows whose targets
    fall in chunk `c`, with `first` their first row when they are consecutive (a slice instead of a gather), else -1,
    and `tfirst` the first one's target position.
    """

    targets: torch.Tensor  # [M] long
    chunks: list[tuple[int, int]]
    rows: list[torch.Tensor]  # K x [n_k] long
    tpos: list[torch.Tensor]  # K x [n_k] long
    spans: list[list[tuple[int, int, int, int]]]  # K x chunks x (lo, hi, first, tfirst)
    counts: list[int]  # valid rows per step


def _chunk_rows(vocab_size: int, device: torch.device) -> int:
    return max(1, _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cpu"]) // vocab_size)


def _plan(valid: torch.Tensor, vocab_size: int, target_index: torch.Tensor | None = None) -> _Plan:
    K, N = valid.shape  # [K, B * T]
    rows = [valid[k].nonzero().squeeze(1) for k in range(K)]
    # the target row of each counted row: row + k (the data path), or where `target_index` points
    wanted = [r + k if target_index is None else target_index[k][r] for k, r in enumerate(rows)]
    targets = torch.cat(wanted).unique()  # sorted
    tpos = [torch.searchsorted(targets, w) for w in wanted]
    if target_index is not None:  # chunks select rows by target: each step's rows in the order of their targets
        order = [torch.argsort(t, stable=True) for t in tpos]
        rows, tpos = [r[o] for r, o in zip(rows, order)], [t[o] for t, o in zip(tpos, order)]
    size = _chunk_rows(vocab_size, valid.device)
    edges = list(range(0, len(targets), size)) + [len(targets)]  # [C + 1]
    chunks = list(zip(edges[:-1], edges[1:]))
    if not chunks:
        return _Plan(targets, [], rows, tpos, [[] for _ in range(K)], [0] * K)
    edges_t = torch.tensor(edges, device=valid.device)
    table = []  # per step and chunk: lo, hi, first row, last row, first and last target position
    for k in range(K):
        bounds = torch.searchsorted(tpos[k], edges_t)  # [C + 1]
        lo, hi = bounds[:-1], bounds[1:]
        if len(rows[k]):
            at_lo, at_last = lo.clamp(max=len(rows[k]) - 1), (hi - 1).clamp(min=0)
            first, last = rows[k][at_lo], rows[k][at_last]
            tfirst, tlast = tpos[k][at_lo], tpos[k][at_last]
        else:
            first = last = tfirst = tlast = torch.zeros_like(lo)
        table.append(torch.stack([lo, hi, first, last, tfirst, tlast], 1))  # [C, 6]
    host = torch.stack(table).tolist()  # [K, C, 6]: the one host sync of the table
    consecutive = target_index is None  # rows ascending and unique: equal ends mean a run (not so when reordered)
    spans = [
        [
            (lo, hi, first if consecutive and last - first == tlast - tfirst == hi - lo - 1 else -1, tfirst)
            for lo, hi, first, last, tfirst, tlast in t
        ]
        for t in host
    ]
    return _Plan(targets, chunks, rows, tpos, spans, [len(r) for r in rows])


_ADDMM_OUT_DTYPE = {"cuda": True}  # devices where `addmm(out_dtype=float32)` accumulates bf16 products in fp32


def _add_weight_grad(d_weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """`d_weight += g^T @ h` in place (BLAS beta = 1), with fp32 accumulation of bf16/fp16 products where supported."""
    if g.dtype == d_weight.dtype:
        d_weight.addmm_(g.T, h)
        return
    device = d_weight.device.type
    if _ADDMM_OUT_DTYPE.get(device):
        try:
            torch.addmm(d_weight, g.T, h, out_dtype=d_weight.dtype, out=d_weight)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[device] = False  # this build lacks it: fall back to a product and an add
    d_weight += g.T @ h


def _matmul_dtype(states: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the draft head runs in: autocast's (as `nn.Linear` would) or the promoted input dtype."""
    device = states.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(states.dtype, weight.dtype)


def _kl_terms(
    logits: torch.Tensor,
    p_rows: torch.Tensor,
    neg_entropy: torch.Tensor,
    scale: torch.Tensor,
    grad: bool,
    inv_t: float = 1.0,
    eta: float = 0.0,
):
    """Per-row KL and `d loss / d logits = scale * (softmax(logits / T) - p) / T` of one chunk of rows.

    Args:
        logits (`[n, Vd]`): draft logits. p_rows (`[n, Vd]`): target probabilities (fp32/fp64), at temperature T.
        neg_entropy (`[n]`): `sum p log p` of the targets. scale: 0-d, the rows' loss weight. inv_t: `1 / T`.

    Returns:
        `(kl [n], grad [n, Vd] in the logits' dtype or None)`.
    """
    z = logits.to(p_rows.dtype)
    if inv_t != 1.0:
        z = z * inv_t
    log_q = torch.log_softmax(z, dim=-1)  # [n, Vd]
    kl = neg_entropy - (p_rows * log_q).sum(-1)  # KL(p || q) = sum p log p - sum p log q   [n]
    if not grad:
        return kl, None
    if inv_t != 1.0:
        scale = scale * inv_t
    return kl, log_q.exp_().sub_(p_rows).mul_(scale).to(logits.dtype)  # in place: no second [n, Vd] fp32


def _tv_terms(
    logits: torch.Tensor,
    p_rows: torch.Tensor,
    neg_entropy: torch.Tensor | None,
    scale: torch.Tensor,
    grad: bool,
    inv_t: float,
    eta: float,
    loss: str,
):
    """Per-row `tv`, `lk` or `kl_tv` (module docstring) and its gradient w.r.t. the logits, of one chunk of rows.

    Same arguments as `_kl_terms` (`neg_entropy` only for `kl_tv`), plus `loss`. Returns `(value [n], grad or None)`.
    """
    z = logits.to(p_rows.dtype)
    if inv_t != 1.0:
        z = z * inv_t
    log_q = torch.log_softmax(z, dim=-1)  # [n, Vd]
    del z
    kl = neg_entropy - (p_rows * log_q).sum(-1) if loss == "kl_tv" else None  # [n]
    q = log_q.exp_()  # [n, Vd]
    alpha = torch.minimum(q, p_rows).sum(-1) if loss != "tv" else None  # sum_i min(p_i, q_i) = 1 - TV   [n]
    s = q - p_rows  # [n, Vd]
    tv = 0.5 * s.abs().sum(-1)  # [n]
    if loss == "tv":
        value, coef = tv, None
    elif loss == "lk":
        alpha = alpha.clamp(min=torch.finfo(alpha.dtype).tiny)
        value, coef = -torch.log(alpha), 1.0 / alpha  # d(-log alpha) = dTV / alpha
    else:  # kl_tv
        lam = torch.exp(-eta * alpha)  # [n], a weight: no gradient through it
        value, coef = lam * kl + (1 - lam) * tv, 1 - lam
    if not grad:
        return value, None
    s.sign_()
    # dTV/dz_j = 1/2 q_j (s_j - sum_i s_i q_i) / T, per row times `coef` (lk: 1 / alpha; kl_tv: 1 - lambda)
    row = 0.5 * inv_t * scale * (coef if coef is not None else 1.0)  # [n] or 0-d
    row = row.reshape(-1, 1) if row.dim() else row
    g = s.sub_((s * q).sum(-1, keepdim=True)).mul_(q).mul_(row)  # [n, Vd]
    if loss == "kl_tv":  # + lambda dKL/dz = lambda (q - p) / T
        g.add_((q - p_rows).mul_((lam * (inv_t * scale)).unsqueeze(1)))
    return value, g.to(logits.dtype)


def _rkl_terms(logits: torch.Tensor, log_p_rows: torch.Tensor, scale: torch.Tensor, grad: bool, inv_t: float):
    """Per-row reverse KL `KL(q || p) = sum_i q_i log(q_i / p_i)` and `d / d z_j = q_j (log(q_j / p_j) - KL) / T`
    (scaled by `scale`) of one chunk of rows; `log_p_rows` `[n, Vd]` at temperature T, floored at the log of the
    smallest normal number (a token the verifier rules out costs a large but finite amount)."""
    z = logits.to(log_p_rows.dtype)
    if inv_t != 1.0:
        z = z * inv_t
    log_q = torch.log_softmax(z, dim=-1)  # [n, Vd]
    del z
    ratio = log_q - log_p_rows  # log(q / p)   [n, Vd]
    q = log_q.exp_()
    rkl = (q * ratio).sum(-1)  # [n]
    if not grad:
        return rkl, None
    g = ratio.sub_(rkl.unsqueeze(1)).mul_(q).mul_(scale * inv_t)  # [n, Vd]
    return rkl, g.to(logits.dtype)


class _CompiledOrEager:
    """`torch.compile(fn)` (dynamic shapes), falling back to eager `fn` for good if compiling or running it fails."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # any compiler failure: the eager path computes the same thing
                logger.warning(f"torch.compile of the fused loss failed ({type(error).__name__}: {error}); eager.")
                self.compiled = None
        return self.fn(*args)


_KL_TERMS: dict[str, Callable] = {}


def _terms(loss: str) -> Callable:
    """The eager per-chunk terms of `loss`: `(logits, p_rows, neg_entropy, scale, grad, inv_t, eta) -> (value, g)`."""
    if loss == "kl":
        return _kl_terms
    return functools.partial(_tv_terms, loss=loss)


def _kl_terms_for(device: torch.device, loss: str = "kl") -> Callable:
    """`loss`'s terms (`_kl_terms`, `_tv_terms`), compiled where `SPECULATORS_HF_COMPILE_LOSS` says so: `auto`
    (default: CUDA only), `1`, `0`."""
    mode = os.environ.get("SPECULATORS_HF_COMPILE_LOSS", "auto")
    if mode == "0" or (mode == "auto" and device.type != "cuda"):
        return _terms(loss)
    key = device.type if loss == "kl" else f"{device.type}/{loss}"
    if key not in _KL_TERMS:
        _KL_TERMS[key] = _CompiledOrEager(_terms(loss))
    return _KL_TERMS[key]


def _fused_kl(
    states: list[torch.Tensor],
    weight: torch.Tensor,
    verifier_states: torch.Tensor,
    verifier_logits,
    plan: _Plan,
    scales: list[float],
    grad_states: bool,
    grad_weight: bool,
    loss_fn: str = "kl",
    temperature: float = 1.0,
    eta: float = DEFAULT_LOSS_ETA,
    reverse: torch.Tensor | None = None,
):
    """The loss, per-row loss values and argmax agreement, and (optionally) the gradients of the loss, chunk by chunk.

    Args:
        states: K x `[N, H]` draft final-norm states (flat rows). weight: `[Vd, H]` draft head.
        verifier_states: `[N, Ht]` verifier pre-norm last states. verifier_logits: `[..., Ht] -> [..., Vd]`.
        scales: the loss weight of one row of step k (`step_weight / valid rows`).
        loss_fn, temperature, eta: the per-row objective (`LOSSES`), its temperature T and kl_tv's eta.
        reverse: `[K, N]` bool, the rows whose objective is the reverse KL `KL(q || p)` instead (`None`: none).

    Returns:
        `(loss, per-row loss [K, N], agree [K, N], d_states (K x [N, H]) or None, d_weight [Vd, H] fp32 or None)`.
    """
    K, N = len(states), states[0].shape[0]
    device = verifier_states.device
    mm = _matmul_dtype(states[0], weight)
    acc = torch.promote_types(mm, torch.float32)  # fp32, or fp64 for fp64 inputs
    w = weight.to(mm)  # [Vd, H]
    loss = torch.zeros((), dtype=acc, device=device)
    kl_out = torch.zeros(K, N, dtype=acc, device=device)
    agree_out = torch.zeros(K, N, dtype=torch.bool, device=device)
    d_states = [torch.zeros_like(s) for s in states] if grad_states else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=device) if grad_weight else None
    terms = _kl_terms_for(device, loss_fn)
    inv_t = 1.0 / temperature
    scale = torch.tensor(scales, dtype=acc, device=device)  # [K]
    with_grad = d_states is not None or d_weight is not None

    for c, (t0, t1) in enumerate(plan.chunks):
        target_logits = verifier_logits(verifier_states[plan.targets[t0:t1]])  # [c, Vd]
        target_ids = target_logits.argmax(-1)  # [c]
        target_logits = target_logits.to(acc)
        if inv_t != 1.0:
            target_logits = target_logits * inv_t
        log_p = torch.log_softmax(target_logits, dim=-1)  # [c, Vd]
        del target_logits
        p = log_p.exp()
        neg_entropy = None
        if reverse is not None:  # kept for the reverse KL, floored: p = 0 gives a large finite log
            log_p = log_p.clamp(min=math.log(torch.finfo(acc).tiny))
        if loss_fn in ("kl", "kl_tv"):
            neg_entropy = (p * log_p.clamp_(min=torch.finfo(acc).min)).sum(-1)  # sum p log p; p = 0 -> 0   [c]
        if reverse is None:
            del log_p
        for k in range(K):
            lo, hi, first, tfirst = plan.spans[k][c]
            if lo == hi:
                continue
            if first >= 0:  # consecutive rows, consecutive targets: slices, no gathers
                rows = slice(first, first + hi - lo)
                at = slice(tfirst - t0, tfirst - t0 + hi - lo)
            else:
                rows = plan.rows[k][lo:hi]
                at = plan.tpos[k][lo:hi] - t0
            h = states[k][rows].to(mm)  # [n, H]
            logits = h @ w.T  # [n, Vd]
            agree_out[k, rows] = logits.argmax(-1) == target_ids[at]
            ne = neg_entropy[at] if neg_entropy is not None else None
            kl, g = terms(logits, p[at], ne, scale[k], with_grad, inv_t, eta)  # [n], [n, Vd]; p[at]: view/gather
            if reverse is not None:
                back = reverse[k, rows]  # [n]: these rows take KL(q || p) instead
                if back.any():
                    rkl, rg = _rkl_terms(logits, log_p[at], scale[k], with_grad, inv_t)
                    kl = torch.where(back, rkl, kl)
                    g = torch.where(back.unsqueeze(1), rg, g) if g is not None else None
            del logits
            loss = loss + kl.sum() * scale[k]
            kl_out[k, rows] = kl
            if d_states is not None:
                d_states[k][rows] = (g @ w).to(d_states[k].dtype)  # [n, H]
            if d_weight is not None:
                _add_weight_grad(d_weight, g, h)  # += g^T h   [Vd, H]
    return loss, kl_out, agree_out, d_states, d_weight


class _FusedTTTKL(torch.autograd.Function):
    """The fused loss as an autograd function: gradients are computed in forward, chunk by chunk, and scaled in
    backward. Saved for backward: the K `[N, H]` state gradients and the `[Vd, H]` head gradient (when it trains);
    nothing of `N x Vd` elements."""

    @staticmethod
    def forward(ctx, weight, verifier_states, verifier_logits, plan, scales, objective, *states):
        loss, kl, agree, d_states, d_weight = _fused_kl(
            list(states),
            weight,
            verifier_states,
            verifier_logits,
            plan,
            scales,
            grad_states=any(ctx.needs_input_grad[6:]),
            grad_weight=ctx.needs_input_grad[0],
            **objective,
        )
        ctx.mark_non_differentiable(kl, agree)
        ctx.has_states, ctx.has_weight, ctx.weight_dtype = d_states is not None, d_weight is not None, weight.dtype
        ctx.save_for_backward(*(d_states or []), *([d_weight] if d_weight is not None else []))
        return loss, kl, agree

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_agree):
        try:
            saved = list(ctx.saved_tensors)
        except RuntimeError as error:  # the first backward scaled them in place (version counter)
            raise RuntimeError("fused_ttt_kl supports one backward pass per forward (no retain_graph).") from error
        d_weight = saved.pop().mul_(grad_loss).to(ctx.weight_dtype) if ctx.has_weight else None
        K = len(ctx.needs_input_grad) - 6
        d_states = [d.mul_(grad_loss.to(d.dtype)) for d in saved] if ctx.has_states else [None] * K
        return (d_weight, None, None, None, None, None, *d_states)


def fused_ttt_kl(
    hidden_states: Sequence[torch.Tensor],
    lm_head_weight: torch.Tensor,
    verifier_hidden_states: torch.Tensor,
    verifier_logits: Callable[[torch.Tensor], torch.Tensor],
    valid: torch.Tensor,
    step_weights: Sequence[float] | None = None,
    loss: str = "kl",
    temperature: float = 1.0,
    eta: float = DEFAULT_LOSS_ETA,
    target_index: torch.Tensor | None = None,
    reverse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The TTT objective `sum_k w_k * masked_mean_t D(p_{t+k}, q^k_t)` without `[T, Vd]` logits kept anywhere (`D`:
    KL by default, or another of `LOSSES` at a temperature; the module docstring gives the formulas).

    Target rows are visited in chunks: each chunk's verifier logits are computed once and serve every step whose
    row `t` compares with them (row `t + k`), each step's draft logits for those rows are computed, and the per-row
    loss, the argmax agreement and the loss gradients (for KL `scale * (softmax(q) - p)`; the module docstring gives
    each loss's) pushed through the draft head are taken
    before the next chunk. Backward only scales the saved `[N, H]`/`[Vd, H]` gradients: no logits are kept or
    recomputed. Rows that do not count are skipped (neither head runs on them).

    Args:
        hidden_states: K tensors `[B, T, H]`, each TTT step's final-norm draft state (the draft head's input).
        lm_head_weight (`[Vd, H]`): the draft head (trained or frozen).
        verifier_hidden_states (`[B, T, Ht]`): the verifier's pre-norm last hidden states (no gradient).
        verifier_logits: the frozen verifier head, row-wise: `[n, Ht] -> [n, Vd]` (opaque; runs under no_grad).
        valid (`[K, B, T]` bool): row `t` of step `k` counts (`ttt_valid_rows`); its target is row `t + k`.
        step_weights: `w_k` (default 1.0 each; `decay**k` for a decayed objective).
        loss: the per-row objective `D`, one of `LOSSES` (default `kl`).
        temperature: `T` of both distributions (default 1.0). eta: `kl_tv`'s `lambda = exp(-eta * alpha)`.
        target_index (`[K, B, T]` long, *optional*): the target of row `t` of step `k` as a row of the flat
            `verifier_hidden_states` (then `[M, Ht]`: e.g. the data path's rows followed by continuations the verifier
            scored; `training.on_policy`); default row `t + k` of `[B, T, Ht]`.
        reverse (`[K, B, T]` bool, *optional*): rows whose objective is the reverse KL `KL(q || p)` instead of `loss`
            (the on-policy stage's rejected proposals).

    Returns:
        `(loss, kl, agree)`: the loss (scalar, differentiable), the per-row objective `[K, B, T]` (the KL with the
        default `loss`) and the per-row argmax agreement `[K, B, T]` (draft argmax == verifier argmax), both 0/False
        on rows that do not count.
    """
    K, (B, T) = len(hidden_states), valid.shape[1:]
    step_weights = [1.0] * K if step_weights is None else list(step_weights)
    with torch.no_grad():
        index = None if target_index is None else target_index.reshape(K, B * T)
        plan = _plan(valid.reshape(K, B * T), lm_head_weight.shape[0], index)
    scales = [w / max(n, 1) for w, n in zip(step_weights, plan.counts)]
    states = [h.reshape(B * T, -1) for h in hidden_states]
    rows = verifier_hidden_states.detach().reshape(-1, verifier_hidden_states.shape[-1])
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r}: expected one of {', '.join(LOSSES)}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature {temperature}: expected a finite number > 0.")
    objective = dict(loss_fn=loss, temperature=float(temperature), eta=float(eta))
    if reverse is not None:
        objective["reverse"] = reverse.reshape(K, B * T)
    if torch.is_grad_enabled() and (lm_head_weight.requires_grad or any(s.requires_grad for s in states)):
        loss, kl, agree = _FusedTTTKL.apply(lm_head_weight, rows, verifier_logits, plan, scales, objective, *states)
    else:
        with torch.no_grad():
            out = _fused_kl(states, lm_head_weight, rows, verifier_logits, plan, scales, False, False, **objective)
            loss, kl, agree = out[:3]
    return loss, kl.view(K, B, T), agree.view(K, B, T)


def step_statistics(kl: torch.Tensor, agree: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row sums of `STEP_STATS` for each step, `[B, K * len(STEP_STATS)]`, from `fused_ttt_kl`'s outputs.

    For each step k (row sums over the counted rows of each packed row): KL sum, rows, correct rows (draft argmax ==
    verifier argmax), correct rows among those whose steps `< k` were all correct, rows whose steps `< k` were all
    correct. Row `t` of step `k` is "all previous correct" when rows `t` of steps `0..k-1` were correct.
    """
    with torch.no_grad():
        stats, prev_correct = [], None
        for k in range(kl.shape[0]):
            hit = agree[k] & valid[k]  # [B, T]
            prev = valid[k] if prev_correct is None else prev_correct & valid[k]
            vf = valid[k].float()
            stats.append(
                torch.stack(
                    [
                        (kl[k].float() * vf).sum(-1),
                        vf.sum(-1),
                        hit.float().sum(-1),
                        (hit & prev).float().sum(-1),
                        prev.float().sum(-1),
                    ],
                    dim=-1,
                )
            )  # [B, 5]
            prev_correct = hit if prev_correct is None else hit & prev_correct
    return torch.cat(stats, dim=-1)  # [B, K * 5]


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
