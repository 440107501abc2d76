"""Per-sample alignment and packing into `[B, total_seq_len]` rows with document ids and per-document positions.

Alignment of one sample (tokens `x`, aux states `g`, verifier last state `y`, loss mask `l`, `T` tokens):

    row t (t = 0 .. T-2)   input_ids = x_{t+1}   aux = g_t   verifier_last = y_{t+1}   position = t
                           predicts x_{t+2}; target distribution = softmax(verifier head(norm(y_{t+1})))

Loss mask of row t (`loss_mask_alignment`):
    "predicted" (default)  l_{t+2}: the predicted token is an assistant token. This supervises exactly the tokens the
                           draft proposes when serving: the first assistant token of a turn (predicted from the
                           template's header) is a target; the token after the turn's last one is not.
    "input"                l_{t+1}: the input token is an assistant token (vllm-project/speculators' choice).

fp8 samples (`hidden_states` float8 + `hidden_states_scale [T, L]`, from `ShardDataset(dequantize=False)`) stay fp8
in the batch, with `aux_hidden_states_scale [B, S, L-1]` and `verifier_last_hidden_states_scale [B, S, 1]` beside
them: `Eagle3Trainer` dequantizes after the batch reaches its device (half the bytes to pack, pin and copy; on CPU
the float8 -> float conversion is slower than the collation itself). `dtype=` dequantizes in the collator instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.shards import SCALE_KEY, dequantize

LOSS_MASK_ALIGNMENTS = ("predicted", "input")
HIDDEN_KEYS = ("aux_hidden_states", "verifier_last_hidden_states")
# Batch key of the per-sample statistics of online hidden-state fetches (`online.dataset.FETCH_STATS_COLUMNS`).
FETCH_STATS = "hidden_states_fetch_stats"
# Batch keys of the samples in each row (`PackedDataset`'s `index`, -1 after the last) and which were skipped.
SAMPLE_INDEX, SAMPLE_SKIPPED = "sample_index", "sample_skipped"
# Batch key of the tokens the verifier read at each row's position (x_t; `input_ids` holds x_{t+1}): the on-policy
# stage runs the verifier over the context again to score the draft's own continuations.
VERIFIER_IDS = "verifier_input_ids"


def align_sample(sample: dict[str, torch.Tensor], loss_mask_alignment: str = "predicted") -> dict[str, torch.Tensor]:
    """One sample `{input_ids [T], loss_mask [T], hidden_states [T, L, H]}` -> aligned rows of length `T - 1`."""
    x, lm, hs = sample["input_ids"], sample["loss_mask"], sample["hidden_states"]
    T = len(x)
    if loss_mask_alignment == "predicted":
        mask = torch.cat([lm[2:], lm.new_zeros(min(1, T - 1))])  # l_{t+2}; the last row predicts past the end
    elif loss_mask_alignment == "input":
        mask = lm[1:]  # l_{t+1}
    else:
        raise ValueError(f"loss_mask_alignment must be one of {LOSS_MASK_ALIGNMENTS}, got {loss_mask_alignment!r}")
    row = {
        "input_ids": x[1:],  # [T-1]
        "loss_mask": mask,  # [T-1]
        "position_ids": torch.arange(T - 1),  # [T-1]
    }
    if hs is not None:  # (None: the collator copies the states into the batch itself)
        row["aux_hidden_states"] = hs[:-1, :-1].reshape(T - 1, -1)  # [T-1, (L-1) H]
        row["verifier_last_hidden_states"] = hs[1:, -1]  # [T-1, H]
    if SCALE_KEY in sample:  # fp8: one scale per token and layer, aligned like the states
        scale = sample[SCALE_KEY]  # [T, L]
        row["aux_hidden_states_scale"] = scale[:-1, :-1]  # [T-1, L-1]
        row["verifier_last_hidden_states_scale"] = scale[1:, -1:]  # [T-1, 1]
    return row


@dataclass
class DataCollatorForEagle3:
    """Packs each group of samples (one item of `PackedDataset`) into one row of `total_seq_len` positions.

    Returns `input_ids`, `position_ids`, `loss_mask`, `document_ids` (`[B, S]`, -1 on padding), `aux_hidden_states`
    (`[B, S, (L-1) H]`) and `verifier_last_hidden_states` (`[B, S, H]`), where `S = total_seq_len`; for fp8 samples
    also their scales `aux_hidden_states_scale` (`[B, S, L-1]`) and `verifier_last_hidden_states_scale` (`[B, S, 1]`)
    unless `dtype` is set (then the states are dequantized here). Samples from `PackedDataset` also give
    `sample_index` and `sample_skipped` (`[B, D]`, D = the most samples in a row), which the trainer counts.
    With `verifier_ids`, also `verifier_input_ids` (`[B, S]`, `x_t` at row t, 0 on padding).
    """

    total_seq_len: int
    loss_mask_alignment: str = "predicted"
    dtype: torch.dtype | None = None  # the hidden states' dtype in the batch (None: as stored)
    verifier_ids: bool = False  # also `verifier_input_ids` [B, S]: x_t, the token the verifier read at row t

    def __post_init__(self):
        self.keys = (*self.KEYS, VERIFIER_IDS) if self.verifier_ids else self.KEYS

    def __call__(self, packs: list[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        batch = self._collate_states(packs)
        stats = [s["fetch_stats"] for pack in packs for s in pack if "fetch_stats" in s]
        if stats:  # online hidden states: what fetching this batch's samples cost, for the trainer's metrics
            batch[FETCH_STATS] = torch.stack(stats)  # [samples, len(FETCH_STATS_COLUMNS)]
        if all("index" in s for pack in packs for s in pack):  # which samples each row holds, for the trainer
            D = max(len(pack) for pack in packs)
            batch[SAMPLE_INDEX] = torch.tensor([[s["index"] for s in p] + [-1] * (D - len(p)) for p in packs])
            batch[SAMPLE_SKIPPED] = torch.tensor(
                [[s.get("skipped", False) for s in p] + [False] * (D - len(p)) for p in packs]
            )
        return batch

    def _collate_states(self, packs: list[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """Every row written straight into the batch: each hidden state is copied once, from the sample (a view of
        the memory-mapped shard) into its place, instead of aligned, concatenated per row and stacked."""
        first = next(s for pack in packs for s in pack)
        fp8 = SCALE_KEY in first
        if (fp8 and self.dtype is not None) or any(len(s["input_ids"]) < 2 for pack in packs for s in pack):
            rows = [self.pack_row(p) for p in packs]  # dequantized here, or one-token samples: the reference path
            keys = (*self.keys, *(key for key in rows[0] if key not in self.keys))  # + the fp8 scales
            return {key: torch.stack([row[key] for row in rows]) for key in keys}
        B, S = len(packs), self.total_seq_len
        states = first["hidden_states"]  # [T, L, H]
        L, H = states.shape[1], states.shape[2]
        dtype = states.dtype if self.dtype is None or fp8 else self.dtype
        batch = {
            "input_ids": torch.zeros(B, S, dtype=torch.long),
            "position_ids": torch.zeros(B, S, dtype=torch.long),
            "loss_mask": torch.zeros(B, S, dtype=torch.long),
            "document_ids": torch.full((B, S), -1, dtype=torch.long),
            "aux_hidden_states": torch.zeros(B, S, (L - 1) * H, dtype=dtype),
            "verifier_last_hidden_states": torch.zeros(B, S, H, dtype=dtype),
        }
        if self.verifier_ids:
            batch[VERIFIER_IDS] = torch.zeros(B, S, dtype=torch.long)
        if fp8:
            scale = first[SCALE_KEY]
            batch["aux_hidden_states_scale"] = torch.zeros(B, S, L - 1, dtype=scale.dtype)
            batch["verifier_last_hidden_states_scale"] = torch.zeros(B, S, 1, dtype=scale.dtype)
        for b, samples in enumerate(packs):
            used = sum(len(s["input_ids"]) - 1 for s in samples)
            if used > S:
                raise ValueError(f"a pack of {used} aligned tokens does not fit total_seq_len={S}")
            if any((SCALE_KEY in s) != fp8 for s in samples):
                raise ValueError(
                    "a pack mixes fp8 and unscaled hidden states (one data folder holds one storage dtype)"
                )
            start = 0
            for d, sample in enumerate(samples):
                row = align_sample({k: sample[k] for k in ("input_ids", "loss_mask")} | {"hidden_states": None},
                                   self.loss_mask_alignment)  # fmt: skip
                hs, n = sample["hidden_states"], len(sample["input_ids"]) - 1
                if hs.shape[1:] != (L, H):
                    raise ValueError(f"hidden states {list(hs.shape)} in a batch of [T, {L}, {H}] samples")
                end = start + n
                for key in ("input_ids", "position_ids", "loss_mask"):
                    batch[key][b, start:end] = row[key]
                if self.verifier_ids:
                    batch[VERIFIER_IDS][b, start:end] = sample["input_ids"][:-1]
                batch["document_ids"][b, start:end] = d
                batch["aux_hidden_states"][b, start:end].view(n, L - 1, H).copy_(hs[:-1, :-1])
                batch["verifier_last_hidden_states"][b, start:end].copy_(hs[1:, -1])
                if fp8:
                    batch["aux_hidden_states_scale"][b, start:end].copy_(sample[SCALE_KEY][:-1, :-1])
                    batch["verifier_last_hidden_states_scale"][b, start:end].copy_(sample[SCALE_KEY][1:, -1:])
                start = end
        return batch

    KEYS = (
        "input_ids",
        "position_ids",
        "loss_mask",
        "document_ids",
        "aux_hidden_states",
        "verifier_last_hidden_states",
    )

    def pack_row(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        S = self.total_seq_len
        rows = [align_sample(s, self.loss_mask_alignment) for s in samples]
        used = sum(len(r["input_ids"]) for r in rows)
        if used > S:
            raise ValueError(f"a pack of {used} aligned tokens does not fit total_seq_len={S}")
        pad = S - used
        doc = torch.cat([torch.full((len(r["input_ids"]),), d) for d, r in enumerate(rows)] + [torch.full((pad,), -1)])
        out = {"document_ids": doc.long()}  # [S]
        for key in ("input_ids", "position_ids", "loss_mask"):
            out[key] = torch.cat([r[key].long() for r in rows] + [torch.zeros(pad, dtype=torch.long)])  # [S]
        if self.verifier_ids:
            tokens = [s["input_ids"][:-1].long() for s in samples]
            out[VERIFIER_IDS] = torch.cat(tokens + [torch.zeros(pad, dtype=torch.long)])  # [S]
        fp8 = "aux_hidden_states_scale" in rows[0]
        if any(("aux_hidden_states_scale" in r) != fp8 for r in rows):
            raise ValueError("a pack mixes fp8 and unscaled hidden states (one data folder holds one storage dtype)")
        for key in HIDDEN_KEYS:
            if fp8 and self.dtype is not None:  # dequantize here rather than on the training device
                parts = {key: [dequantize(r[key], r[f"{key}_scale"], self.dtype) for r in rows]}
            elif fp8:
                parts = {name: [r[name] for r in rows] for name in (key, f"{key}_scale")}
            else:
                parts = {key: [r[key] if self.dtype is None else r[key].to(self.dtype) for r in rows]}
            for name, p in parts.items():
                out[name] = torch.cat(p + [p[0].new_zeros(pad, p[0].shape[-1])])  # [S, D]
        return out
