"""Small training data for the training tests: real chats -> tokens + assistant loss mask -> tiny-verifier states."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from speculators_hf.datagen.hf_backend import HFHiddenStatesBackend
from speculators_hf.formats.shards import shard_name, write_index, write_shard
from speculators_hf.tiny_kit import chitchat_conversations
from speculators_hf.vocab import build_vocab_mapping, save_vocab_mapping

LAYER_IDS = [1, 2, 3, 4]  # aux [1, 2, 3] + the last layer (pre-norm) of the 4-layer tiny verifier


def tokenize_chat(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 mask over the assistant turns' tokens (prefix-rendering approximation)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    mask = [0] * len(ids)
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(
            tokenizer.apply_chat_template(messages[:j], tokenize=True, return_dict=False, add_generation_prompt=True)
        )
        end = len(tokenizer.apply_chat_template(messages[: j + 1], tokenize=True, return_dict=False))
        mask[start:end] = [1] * (end - start)
    return ids[:max_len], mask[:max_len]


def make_training_data(
    verifier_path: str | Path,
    out_dir: str | Path,
    num_samples: int = 24,
    max_len: int = 96,
    offset: int = 0,
    samples_per_shard: int = 16,
    draft_vocab_size: int | None = 512,
) -> Path:
    """Write datagen-style shards (+ index.json with layer ids, + d2t.npy/t2d.npy when `draft_vocab_size`)."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(verifier_path)
    rows = [tokenize_chat(tokenizer, m, max_len) for m in chitchat_conversations(3 * num_samples, offset)]
    rows = [r for r in rows if sum(r[1]) > 0 and len(r[0]) > 8][:num_samples]
    backend = HFHiddenStatesBackend.from_pretrained(str(verifier_path), LAYER_IDS, dtype=torch.float32)
    shards, freq = [], Counter()
    for k, start in enumerate(range(0, len(rows), samples_per_shard)):
        chunk = rows[start : start + samples_per_shard]
        states = backend.extract([ids for ids, _ in chunk])
        samples = [
            {"input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask), "hidden_states": hs}
            for (ids, mask), hs in zip(chunk, states)
        ]
        for ids, mask in chunk:
            freq.update(t for t, m in zip(ids, mask) if m)
        shards.append(write_shard(out_dir / shard_name(k), samples, list(range(start, start + len(chunk)))))
    write_index(out_dir, {"shards": shards, "layer_ids": LAYER_IDS})
    if draft_vocab_size:
        d2t, t2d = build_vocab_mapping(freq, draft_vocab_size, len(tokenizer))
        save_vocab_mapping(out_dir, d2t, t2d)
    return out_dir


def train_argv(verifier: Path, data: Path, save: Path, *extra: str) -> list[str]:
    """CLI flags for a quick CPU run."""
    return [
        "--verifier-name-or-path",
        str(verifier),
        "--data-path",
        str(data),
        "--save-path",
        str(save),
        "--total-seq-len",
        "256",
        "--epochs",
        "1",
        "--logging-steps",
        "1",
        "--eval-split",
        "0",
        "--seed",
        "0",
        "--report-to",
        "none",
        "--disable-tqdm",
        "true",
        "--dataloader-num-workers",
        "0",
        *extra,
    ]


def loss_and_grads(trainer, batch: dict, attn_implementation: str, autocast_dtype=None):
    """One TTT loss + backward of `trainer.model` on `batch` with the given attention: (loss, gradients by name)."""
    model = trainer.model
    model.set_attn_implementation(attn_implementation)
    model.zero_grad(set_to_none=True)
    inputs = trainer._prepare_inputs(batch)
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float(), grads


def save_bad_vocab(out_dir: Path, vocab_size: int = 1000, draft_vocab_size: int = 512) -> Path:
    """A d2t/t2d pair built for another tokenizer's vocabulary size."""
    d2t, t2d = build_vocab_mapping({i: 1 for i in range(draft_vocab_size)}, draft_vocab_size, vocab_size)
    save_vocab_mapping(out_dir, d2t, t2d)
    return out_dir


__all__ = ["loss_and_grads", "make_training_data", "save_bad_vocab", "tokenize_chat", "train_argv", "np"]
