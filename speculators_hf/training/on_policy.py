"""The on-policy stage (`train --stage on-policy`): a trained draft continues on its own chained proposals, scored by
the verifier, with a loss that follows the verifier's accept/reject outcome.

Why: the TTT objective feeds step k the data's token x_{t+1+k}, whatever the draft proposed at step k-1, and counts
every step. Served, the draft reads its own proposals, and nothing after the first rejected one matters. On the
verifier's own greedy responses at T = 0 both see the same states wherever it counts; on human responses, or when
sampling at T > 0, the states the served draft reaches leave the data: the verifier accepts a proposal that is not
the data's token, and the next target is a distribution the shards do not hold (DistillSpec, arXiv 2310.08461;
Draft-OPD, arXiv 2605.29343).

One batch (row t: verifier state g_t and token x_{t+1}, as in `losses`; K = `--ttt-steps`):

    step 0        input (g_t, x_{t+1})           proposes d^0_t   target p^0_t = p( . | x_{<=t+1})   (the shards)
    step k >= 1   input (h^{k-1}_t, d^{k-1}_t)   proposes d^k_t   target p^k_t = p( . | x_{<=t+1}, d^0_t .. d^{k-1}_t)

`d^k_t` is the draft's argmax (vLLM's default `draft_sample_method` greedy, and T = 0), or a sample of `q_T` with
`--on-policy-draft-sample-method probabilistic` at T > 0. Where `d^0 .. d^{k-1}` are the
data's tokens (the data path) `p^k_t` is the shards' row t + k, exactly what TTT uses; elsewhere the verifier
(transformers, in this process) scores the continuations in one extra forward per batch: the packed rows once more,
then block j (1 <= j < K) holding token `d^{j-1}_t` of every continued row t at position t + 1 + j, attending to the
row's context (tokens <= t + 1 of its document) and to its own earlier blocks (`continuation_mask`). Only rows the
served draft can reach are continued. `--on-policy-targets shards` skips that pass: rows off the data path drop out.

The rule (`OnPolicyObjective.step`): proposal `d^k_t` is accepted as vLLM's rejection sampler would accept it: at
T = 0 when it is the verifier's argmax; at T > 0 with probability `min(1, p_T(d) / q_T(d))`, `q_T(d) = 1` for a
greedy draft (vLLM treats its proposal as one-hot), one seeded uniform per proposal. Step k of row t counts while
`d^0 .. d^{k-1}` were all accepted (a state the served draft reaches), with the run's `--loss` (forward KL by default)
where `d^k` is accepted and, with `--on-policy-rejected-loss reverse_kl` (the default), the reverse KL `KL(q || p)`
where it is rejected: mass the draft put where the verifier puts little is what made the proposal fail, and the
reverse KL is what penalises it (Draft-OPD's rule: forward KL on accepted, reverse KL on rejected tokens).
Acceptance is judged over the draft vocabulary, as `tau_sim` is.

Cost: one verifier forward over `S + (K - 1) * R` tokens per packed row (`R` its most continued rows), reported as
`on_policy_verifier_tokens` and seconds in the training record; none where the draft stays on the data path.
"""

from __future__ import annotations

import time

import torch

from ..datagen.hf_backend import HFHiddenStatesBackend, capture_layer_inputs
from ..modeling.losses import shift_for_step, ttt_valid_rows
from ..validation import pretrained_config
from .collator import VERIFIER_IDS

# Rows of the draft head per chunk when proposing (`[rows, Vd]` logits at a time).
_PROPOSE_ROWS = 4096


class ContinuationScorer:
    """The verifier in the training process, scoring the draft's continuations of packed rows (module docstring).

    Args:
        backend: a transformers verifier (`datagen.hf_backend.HFHiddenStatesBackend`) capturing its last layer's
            pre-norm output (the training targets' layer).
    """

    def __init__(self, backend: HFHiddenStatesBackend):
        self.backend = backend
        self.tokens = 0  # verifier tokens run (padding included)
        self.seconds = 0.0

    @classmethod
    def from_pretrained(cls, path: str, device, trust_remote_code: bool = False) -> ContinuationScorer:
        n = pretrained_config(path, "verifier", trust_remote_code=trust_remote_code).get_text_config()
        backend = HFHiddenStatesBackend.from_pretrained(
            path, [n.num_hidden_layers], device=str(device), trust_remote_code=trust_remote_code
        )
        for p in backend.model.parameters():
            p.requires_grad_(False)
        return cls(backend)

    @torch.no_grad()
    def continuations(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        document_ids: torch.Tensor,
        proposals: list[torch.Tensor],
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """The verifier's pre-norm last states after each continued row's proposals.

        Args:
            tokens (`[B, S]`): `x_t` at row t (`verifier_input_ids`).
            position_ids, document_ids (`[B, S]`): the batch's.
            proposals: J tensors `[B, S]` of verifier ids, `d^0 .. d^{J-1}` of every row.
            rows (`[B, S]` bool): the rows to continue (not a document's last row: its x_{t+1} is not in the batch).

        Returns:
            `[J, B, S, Ht]`: entry `j` of row t is the state after `x_{<=t+1}, d^0_t .. d^j_t` (zeros where not
            continued): the target of step `j + 1`.
        """
        start = time.perf_counter()
        model = self.backend.model
        B, S = tokens.shape
        J = len(proposals)
        counts = rows.sum(1)  # [B]
        R = int(counts.max()) if B else 0
        device = tokens.device
        hidden = model.get_input_embeddings().weight.shape[1]
        out = torch.zeros(J, B, S, hidden, dtype=model.dtype, device=device)
        if R == 0 or J == 0:
            return out
        order = torch.sort((~rows).to(torch.int8), dim=1, stable=True).indices[:, :R]  # continued rows first
        chosen = torch.arange(R, device=device)[None, :] < counts[:, None]  # [B, R]
        ids = torch.cat([tokens] + [p.gather(1, order) for p in proposals], dim=1)  # [B, S + J R]
        base = position_ids.gather(1, order)  # [B, R]
        positions = torch.cat([position_ids] + [base + 2 + j for j in range(J)], dim=1)
        mask = continuation_mask(document_ids, order, chosen, J)  # [B, 1, L, L]
        if model.config._attn_implementation == "eager":  # additive for eager attention; sdpa takes the bools
            zero = torch.zeros((), dtype=model.dtype, device=device)
            mask = torch.where(mask, zero, torch.finfo(model.dtype).min)
        layer = self.backend.layer_ids[0]
        with capture_layer_inputs(model, [layer]) as captured:
            self.backend.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        states = captured[layer][:, S:].view(B, J, R, hidden)  # [B, J, R, Ht]
        b = torch.arange(B, device=device)[:, None].expand(B, R)
        for j in range(J):
            out[j, b[chosen], order[chosen]] = states[:, j][chosen]
        self.tokens += B * ids.shape[1]
        self.seconds += time.perf_counter() - start
        return out


def continuation_mask(
    document_ids: torch.Tensor, order: torch.Tensor, chosen: torch.Tensor, blocks: int
) -> torch.Tensor:
    """The verifier's attention over `[packed rows (S) | block 1 (R) | ... | block J (R)]`, True = attend.

    Packed rows: causal within their document (padding sees itself). Block j's entry r (row `t = order[b, r]`): the
    packed rows `s <= t + 1` of row t's document, and entry r of blocks 1..j. Entries not `chosen` see themselves.
    Returns `[B, 1, S + J R, S + J R]` bool.
    """
    B, S = document_ids.shape
    R = order.shape[1]
    device = document_ids.device
    L = S + blocks * R
    pos = torch.arange(S, device=device)
    same = (document_ids[:, :, None] == document_ids[:, None, :]) & (document_ids[:, :, None] >= 0)
    mask = torch.zeros(B, L, L, dtype=torch.bool, device=device)
    mask[:, :S, :S] = same & (pos[:, None] >= pos[None, :])
    doc = document_ids.gather(1, order)  # [B, R]
    context = (document_ids[:, None, :] == doc[:, :, None]) & (pos[None, None, :] <= order[:, :, None] + 1)
    context &= chosen[:, :, None]  # [B, R, S]
    own = torch.eye(R, dtype=torch.bool, device=device).expand(B, R, R) & chosen[:, :, None]
    for j in range(blocks):
        q = slice(S + j * R, S + (j + 1) * R)
        mask[:, q, :S] = context
        for i in range(j + 1):
            mask[:, q, S + i * R : S + (i + 1) * R] = own
    diagonal = torch.arange(L, device=device)
    mask[:, diagonal, diagonal] = True  # padding and unchosen entries see themselves: no empty row
    return mask[:, None]


class OnPolicyObjective:
    """What `Eagle3Trainer.compute_loss` needs for one on-policy batch (module docstring), and the stage's statistics.

    Args:
        temperature: `--on-policy-temperature`. rejected_loss: `--on-policy-rejected-loss`.
        sample: draft by sampling `q_T` (`--on-policy-draft-sample-method probabilistic`, T > 0), else argmax.
        scorer: the verifier scoring continuations (`--on-policy-targets verifier`), or None (`shards`).
        seed: seeds the proposals' samples and the acceptance draws (with the step and micro-batch).
    """

    def __init__(
        self,
        temperature: float,
        rejected_loss: str,
        scorer: ContinuationScorer | None,
        seed: int,
        sample: bool = False,
    ):
        self.temperature, self.rejected_loss, self.scorer, self.seed = temperature, rejected_loss, scorer, seed
        self.sample = sample and temperature > 0
        self.calls = 0
        self.sums: torch.Tensor | None = None  # per step: reached, accepted; then rows continued (since the last log)
        self.total: torch.Tensor | None = None  # the same over the run

    def start(self, draft, device, global_step: int):
        """Begin a batch: returns the `propose` callback of the chained unroll (`trainer.ttt_unroll`), which keeps
        each step's proposals (draft indices) and their `q_T` here and returns them as the next step's token ids."""
        self.calls += 1
        seed = hash((self.seed, global_step, self.calls)) % 2**63
        self.rng = torch.Generator(device=device).manual_seed(seed) if self.temperature else None  # draws at T > 0
        self.proposals, self.q_probs = [], []

        def propose(states: torch.Tensor) -> torch.Tensor:
            ids, q = self.propose(draft.lm_head.weight, states.detach(), self.rng)
            self.proposals.append(ids)
            self.q_probs.append(q)
            return draft.draft_to_target_ids(ids)

        return propose

    @torch.no_grad()
    def propose(self, head: torch.Tensor, states: torch.Tensor, generator: torch.Generator | None):
        """Draft indices `[B, S]` proposed from final-norm states `[B, S, H]` with the draft head `[Vd, H]`, and
        `q_T` of each as the rejection sampler sees it (None at T = 0; 1 for a greedy draft), chunk by chunk."""
        flat = states.reshape(-1, states.shape[-1])
        ids = torch.empty(len(flat), dtype=torch.long, device=flat.device)
        probs = None if self.temperature == 0 else torch.ones(len(flat), dtype=torch.float32, device=flat.device)
        for a in range(0, len(flat), _PROPOSE_ROWS):
            logits = (flat[a : a + _PROPOSE_ROWS] @ head.T.to(flat.dtype)).float()  # [n, Vd]
            if not self.sample:
                ids[a : a + len(logits)] = logits.argmax(-1)
                continue
            q = torch.softmax(logits / self.temperature, dim=-1)
            pick = torch.multinomial(q, 1, generator=generator).squeeze(1)
            ids[a : a + len(logits)] = pick
            probs[a : a + len(logits)] = q.gather(1, pick[:, None]).squeeze(1)
        shape = states.shape[:-1]
        return ids.view(shape), (None if probs is None else probs.view(shape))

    @torch.no_grad()
    def outcome(self, verifier_logits, targets: torch.Tensor, proposal: torch.Tensor, q_prob, uniform):
        """Whether each proposal (draft index `[n]`) is accepted against targets (verifier states `[n, Ht]`)."""
        accepted = torch.empty(len(proposal), dtype=torch.bool, device=proposal.device)
        for a in range(0, len(proposal), _PROPOSE_ROWS):
            z = verifier_logits(targets[a : a + _PROPOSE_ROWS]).float()  # [n, Vd]
            d = proposal[a : a + len(z)]
            if self.temperature == 0:
                accepted[a : a + len(z)] = z.argmax(-1) == d
            else:
                p = torch.softmax(z / self.temperature, dim=-1).gather(1, d[:, None]).squeeze(1)
                accepted[a : a + len(z)] = uniform[a : a + len(z)] * q_prob[a : a + len(z)] < p
        return accepted

    def step(self, draft, inputs: dict, last: torch.Tensor, valid: torch.Tensor):
        """The loss inputs of one batch after the chained unroll (`start`): `(valid [K, B, S], targets [M, Ht],
        target_index [K, B, S], reverse [K, B, S] or None)`.

        Args:
            draft: the unwrapped draft (its verifier head and vocabulary mapping).
            inputs: the batch. last (`[B, S, Ht]`): the shards' verifier states. valid (`[K, B, S]`): TTT's rows.
        """
        proposals, q_probs = self.proposals, self.q_probs  # K x [B, S] draft indices d^k, and q_T(d^k) (T > 0)
        K, B, S = valid.shape
        device = valid.device
        input_ids, document_ids = inputs["input_ids"], inputs["document_ids"]
        verifier_ids = [draft.draft_to_target_ids(d) for d in proposals]  # K x [B, S]
        # on_path[k]: d^0 .. d^{k-1} are the data's tokens (x_{t+2} ..), so step k's target is the shards' row t + k
        on_path = torch.ones(K, B, S, dtype=torch.bool, device=device)
        for k in range(1, K):
            on_path[k] = on_path[k - 1] & (verifier_ids[k - 1] == shift_for_step(input_ids, k, fill=-1))
        inside = ttt_valid_rows(torch.ones_like(input_ids), document_ids, K)  # [K, B, S]: the target is a real row
        rows = torch.arange(B * S, device=device).view(B, S)
        index = torch.stack([rows + k for k in range(K)])  # [K, B, S]: flat rows of the shards' states
        flat = last.reshape(B * S, -1)
        uniform = torch.rand(K, B, S, generator=self.rng, device=device) if self.temperature else None
        known = inside & on_path
        reached, accepted = self._accept(draft, flat, index, known, proposals, q_probs, uniform)
        targets, continued = flat, torch.zeros(B, S, dtype=torch.bool, device=device)
        if self.scorer is not None and K > 1:
            # rows whose first step off the data path the served draft reaches, with a later step that counts
            off = ~on_path
            first_off = off.float().argmax(0, keepdim=True).clamp(min=1)  # [1, B, S]
            continued = off.any(0) & reached.gather(0, first_off)[0] & (valid & off).any(0)
            if continued.any():
                states = self.scorer.continuations(
                    inputs[VERIFIER_IDS], inputs["position_ids"], document_ids, verifier_ids[: K - 1], continued
                )  # [K-1, B, S, Ht]
                targets = torch.cat([flat, states.reshape(-1, flat.shape[-1]).to(flat.dtype)])
                for k in range(1, K):
                    index[k] = torch.where(off[k] & continued, B * S * k + rows, index[k])
                known = inside & (on_path | continued[None])
                # only the continued rows' verdicts change: judge those again (rows are independent)
                again = self._accept(draft, targets, index, known & continued[None], proposals, q_probs, uniform)
                reached, accepted = (
                    torch.where(continued[None], new, old) for new, old in zip(again, (reached, accepted))
                )
        count = valid & known & reached  # [K, B, S]
        reverse = count & ~accepted if self.rejected_loss == "reverse_kl" else None
        self._add(count, accepted, continued)
        return count, targets, index, reverse

    def _accept(self, draft, targets, index, candidates, proposals, q_probs, uniform):
        """`(reached, accepted)` `[K, B, S]`: step k's state is reached (every earlier proposal accepted) and its
        proposal is accepted, judged where `candidates` (the target is known); unknown rows are neither."""
        K = len(proposals)
        reached = torch.zeros_like(candidates)
        accepted = torch.zeros_like(candidates)
        reached[0] = True
        for k in range(K):
            judge = candidates[k] & reached[k]
            if judge.any():
                flat = judge.reshape(-1)
                q = None if q_probs[k] is None else q_probs[k].reshape(-1)[flat]
                u = None if uniform is None else uniform[k].reshape(-1)[flat]
                verdict = self.outcome(
                    draft.verifier_logits, targets[index[k].reshape(-1)[flat]], proposals[k].reshape(-1)[flat], q, u
                )
                accepted[k].view(-1)[flat] = verdict
            if k + 1 < K:
                reached[k + 1] = reached[k] & accepted[k]
        return reached, accepted

    def _add(self, count: torch.Tensor, accepted: torch.Tensor, continued: torch.Tensor) -> None:
        stats = torch.cat([count.sum((1, 2)), (count & accepted).sum((1, 2)), continued.sum().view(1)]).double()
        self.sums = stats if self.sums is None else self.sums + stats
        self.total = stats if self.total is None else self.total + stats

    def interval_logs(self, accelerator) -> dict[str, float]:
        """`on_policy_accept_k` (accepted / reached at step k), `on_policy_tau` (1 + sum of the chained products)
        and `on_policy_continued` (rows the verifier continued) since the last log, all processes."""
        if self.sums is None:
            return {}
        logs = _rates(accelerator.reduce(self.sums, "sum").cpu().tolist())
        self.sums = None
        return logs

    def summary(self, accelerator) -> dict:
        """The run's acceptance per step, tau and rows continued (all processes), and this process's verifier cost."""
        if self.total is None:
            return {}
        rates = _rates(accelerator.reduce(self.total, "sum").cpu().tolist())
        accept = [rates[key] for key in rates if key.startswith("on_policy_accept_")]
        return {
            "accept": accept,
            "tau": rates["on_policy_tau"],
            "continued_rows": int(rates["on_policy_continued"]),
            **(self.cost() or {}),
        }

    def cost(self) -> dict | None:
        """The verifier passes this process ran (None with `--on-policy-targets shards`)."""
        if self.scorer is None:
            return None
        return {"verifier_tokens": self.scorer.tokens, "verifier_seconds": round(self.scorer.seconds, 2)}


def _rates(sums: list[float]) -> dict[str, float]:
    """Summed `[reached x K, accepted x K, continued]` -> acceptance per step, tau and rows continued."""
    K = (len(sums) - 1) // 2
    logs, tau, run = {}, 1.0, 1.0
    for k in range(K):
        rate = sums[K + k] / max(sums[k], 1.0)
        logs[f"on_policy_accept_{k}"] = rate
        run *= rate
        tau += run
    logs["on_policy_tau"] = tau
    logs["on_policy_continued"] = sums[-1]
    return logs
