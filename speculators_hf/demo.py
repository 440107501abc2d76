"""`speculators-hf demo`: the foundation end to end on the tiny offline kit, in seconds on a CPU.

Builds the tiny verifier and its tokenizer, counts assistant tokens on real chat text, builds a draft vocabulary and a
draft from the verifier, saves it in the format vLLM serves, reloads it and checks that the logits are identical.
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from . import Eagle3DraftModel
    from .testing import chitchat_conversations, tiny_verifier
    from .vocab import build_vocab_mapping

    out = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="speculators-hf-demo-"))
    verifier = tiny_verifier("random")
    tokenizer = AutoTokenizer.from_pretrained(verifier)
    freq = Counter()
    for messages in chitchat_conversations(200):
        for m in messages:
            if m["role"] == "assistant":
                freq.update(tokenizer(m["content"])["input_ids"])
    d2t, t2d = build_vocab_mapping(freq, 1024, len(tokenizer))
    draft = Eagle3DraftModel.from_verifier(
        str(verifier), torch.from_numpy(d2t), torch.from_numpy(t2d), hub_id="speculators-hf/tiny-verifier"
    )
    draft.save_pretrained(out)
    reloaded = Eagle3DraftModel.from_pretrained(out)
    ids = torch.randint(0, len(tokenizer), (1, 16))
    aux = torch.randn(1, 16, 3 * draft.config.hidden_size)
    same = torch.equal(draft(ids, aux_hidden_states=aux).logits, reloaded(ids, aux_hidden_states=aux).logits)
    print(
        f"verifier: {verifier}\ndraft:    {out} ({sum(p.numel() for p in draft.parameters()):,} parameters, "
        f"draft vocab {draft.config.draft_vocab_size}/{draft.config.vocab_size})\nreload gives identical logits: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
