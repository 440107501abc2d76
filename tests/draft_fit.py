"""Test helpers: prompts from real chat text and a draft fitted in seconds to a verifier's greedy continuations.

The fitted draft is trained on step 0 only (cross-entropy on the verifier's greedy next-next token, teacher forcing),
a parallel draft on each of its K outputs (the training unroll with mask slots), on the very continuations it is then
evaluated on: it is a draft that *agrees often*, built to exercise the acceptance
paths of speculative decoding (accepted chains, bonus tokens, cache cropping), not a measure of training quality.
"""

from __future__ import annotations

import torch

from speculators_hf.datagen.hf_backend import capture_layer_inputs
from speculators_hf.evaluation.online import greedy_baseline
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.modeling.losses import ttt_attention_mask
from speculators_hf.tiny_kit import chitchat_conversations
from speculators_hf.training.trainer import ttt_unroll


def chat_prompts(tokenizer, n: int, offset: int = 0) -> list[list[int]]:
    convs = list(chitchat_conversations(n * 2, offset))[:n]
    return [
        tokenizer.apply_chat_template(c[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
        for c in convs
    ]


def fit_draft(
    draft: Eagle3DraftModel,
    verifier,
    prompts: list[list[int]],
    max_new_tokens: int = 32,
    steps: int = 150,
    lr: float = 3e-3,
    seed: int = 0,
) -> float:
    """Train `draft` (step 0) on the verifier's greedy continuations of `prompts`; returns the final accuracy."""
    torch.manual_seed(seed)
    continuations, _ = greedy_baseline(verifier, prompts, max_new_tokens, eos_token_id=None)
    layer_ids = draft.config.eagle_aux_hidden_state_layer_ids
    samples = []
    with torch.no_grad(), capture_layer_inputs(verifier, layer_ids) as captured:
        for prompt, cont in zip(prompts, continuations):
            ids = torch.tensor([prompt + cont])  # [1, T]
            verifier(input_ids=ids)
            aux = torch.cat([captured[i] for i in layer_ids], dim=-1)  # [1, T, 3H]
            # row t: (state t, token t+1) -> token t+2, where the target is the verifier's greedy token
            samples.append((ids[:, 1:-1], aux[:, :-2], ids[0, 2:]))
    t2d = draft.t2d
    draft.train()
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    acc = 0.0
    for step in range(steps):
        input_ids, aux, target = samples[step % len(samples)]
        if draft.config.parallel_drafting:  # output k of row t predicts the token after target t + k
            T, K = input_ids.shape[1], draft.config.speculative_tokens
            docs = torch.zeros(1, T, dtype=torch.long)
            masks = [ttt_attention_mask(docs, k) for k in range(K)]
            states = ttt_unroll(draft, input_ids, aux, torch.arange(T)[None], masks, parallel=True)
            logits = torch.cat([draft.lm_head(s[0, : T - k]) for k, s in enumerate(states)])  # [sum_k T - k, Vd]
            target = torch.cat([target[k:] for k in range(K)])
        else:
            logits = draft(input_ids, aux_hidden_states=aux).logits[0]  # [T, Vd]
        if t2d is not None:
            keep = t2d[target]
            target_draft = torch.cumsum(t2d.long(), 0)[target] - 1  # verifier id -> draft index
            logits, target = logits[keep], target_draft[keep]
        loss = torch.nn.functional.cross_entropy(logits, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        acc = (logits.argmax(-1) == target).float().mean().item()
    draft.eval()
    return acc
