"""Offline acceptance of a trained draft on held-out datagen shards, with the training metrics themselves.

No verifier forward pass is needed: the shards hold its states. The metrics are `Eagle3Trainer`'s eval metrics on the
given samples (`acc_k`, `cond_acc_k`, `tau_sim`), so offline numbers and training logs are computed one way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..modeling import Eagle3DraftModel
from .arguments import Eagle3TrainingArguments
from .data import PackedDataset, detect_format, open_dataset, train_eval_split
from .trainer import Eagle3Trainer


def evaluate_shards(
    draft_dir: str | Path,
    shards_dir: str | Path,
    ttt_steps: int = 3,
    verifier: str | None = None,
    held_out_fraction: float | None = None,
    seed: int = 0,
    total_seq_len: int = 8192,
) -> dict:
    """`{"tau_sim", "acc_k", "cond_acc_k", "ttt_steps", "num_tokens", "num_samples"}` of a draft on shards.

    Args:
        draft_dir: a draft checkpoint (speculators format).
        shards_dir: datagen output (shards or the seed's `.pt` files).
        ttt_steps: draft steps K to score.
        verifier: verifier id or folder for the target head (default: the one recorded in the draft).
        held_out_fraction: score only the held-out split that training with `--eval-split held_out_fraction` and
            `--data-seed seed` set aside (default: every sample).
    """
    draft = Eagle3DraftModel.from_pretrained(draft_dir, dtype=torch.float32)
    draft.load_verifier_head(verifier)
    path = Path(shards_dir)
    dataset = open_dataset(path, detect_format(path))
    indices = list(range(len(dataset)))
    if held_out_fraction:
        indices = train_eval_split(len(dataset), held_out_fraction, seed)[1]
    row_len = max(total_seq_len, *(dataset.sample_length(i) - 1 for i in indices))  # every sample fits a row
    packed = PackedDataset(dataset, indices, row_len)
    with tempfile.TemporaryDirectory() as tmp:
        args = Eagle3TrainingArguments(
            output_dir=tmp,
            report_to="none",
            ttt_steps=ttt_steps,
            total_seq_len=row_len,
            log_dir=tmp,
            disable_tqdm=True,
            eval_split=0.0,
        )
        metrics = Eagle3Trainer(model=draft, args=args, eval_dataset=packed).evaluate()
    return {
        "tau_sim": metrics["eval_tau_sim"],
        "acc_k": [metrics[f"eval_acc_{k}"] for k in range(ttt_steps)],
        "cond_acc_k": [metrics[f"eval_cond_acc_{k}"] for k in range(ttt_steps)],
        "ttt_steps": ttt_steps,
        "num_tokens": packed.num_tokens,
        "num_samples": len(indices),
    }
