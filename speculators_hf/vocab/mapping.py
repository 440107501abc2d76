"""The draft vocabulary's mapping: built from token frequencies, saved and loaded as `d2t.npy` / `t2d.npy`, checked.

`d2t[j]` is an int64 *offset*: draft index `j` is verifier token `j + d2t[j]` (vLLM's convention); `t2d` is a bool mask
over the verifier vocabulary, True on the `Vd` selected ids. The selection is the `Vd` most frequent loss-masked tokens
(ties to the lower id), padded with the lowest unused ids when fewer were seen, sorted ascending.

"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..utils import UserError, atomic_path, get_logger
from ..validation import bad_file, np_load, torch_load

logger = get_logger(__name__)

D2T_FILE, T2D_FILE = "d2t.npy", "t2d.npy"


def load_token_freq(path: str | Path) -> dict[int, int]:
    """Read `token_freq.pt`: a `{token_id: count}` dict (the seed's layout) or a dense count tensor `[V]`."""
    path = Path(path)
    label = f"--token-freq-path {path}"
    fix = "pass the token_freq.pt that datagen writes into its output dir"
    obj = torch_load(path, label, fix)
    if isinstance(obj, torch.Tensor):
        if obj.dim() != 1 or obj.is_complex() or obj.dtype == torch.bool:
            problem = f"holds {str(obj.dtype).replace('torch.', '')} values of shape {list(obj.shape)}"
            raise bad_file(label, f"{problem}, expected counts [V]", fix)
        if not torch.isfinite(obj.double()).all() or (obj < 0).any():
            raise bad_file(label, "holds negative or non-finite counts", fix)
        counts = obj.long()
        return {int(i): int(counts[i]) for i in torch.nonzero(counts).flatten()}
    if isinstance(obj, Mapping):
        freq = {}
        for k, v in obj.items():
            k, v = _plain_int(k), _plain_int(v)
            if k is None or v is None or k < 0 or v < 0:
                raise bad_file(label, "holds a key or count that is not a non-negative integer", fix)
            freq[k] = v
        return freq
    kind = type(obj).__name__
    raise bad_file(label, f"holds a {kind}, expected a dict token_id -> count or a count tensor", fix)


def _plain_int(value) -> int | None:
    """An integer key or count (a Python int or a one-element integer tensor), else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def build_vocab_mapping(
    token_freq: Mapping[int, int], draft_vocab_size: int, target_vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(d2t, t2d)`: int64 offsets `[Vd]` and a bool mask `[V]`."""
    if draft_vocab_size < 1:
        raise UserError(f"--draft-vocab-size must be at least 1, got {draft_vocab_size}.")
    if draft_vocab_size > target_vocab_size:
        raise UserError(
            f"--draft-vocab-size {draft_vocab_size} is larger than the target vocabulary ({target_vocab_size})."
        )
    too_big = [t for t in token_freq if not 0 <= t < target_vocab_size]
    if too_big:
        raise UserError(
            f"token_freq has ids up to {max(too_big)} but the target vocabulary has {target_vocab_size} tokens: "
            "pass the verifier the data was generated with (--target-model-path) or the right --target-vocab-size."
        )
    seen = [t for t, c in token_freq.items() if c > 0]
    ranked = sorted(seen, key=lambda t: (-token_freq[t], t))[:draft_vocab_size]
    if len(ranked) < draft_vocab_size:
        logger.warning(
            "Only %d distinct tokens were seen for a draft vocabulary of %d; padding with the lowest unused ids.",
            len(ranked),
            draft_vocab_size,
        )
        chosen = set(ranked)
        pad = (t for t in range(target_vocab_size) if t not in chosen)
        ranked += [next(pad) for _ in range(draft_vocab_size - len(ranked))]
    selected = np.sort(np.asarray(ranked, dtype=np.int64))
    d2t = selected - np.arange(draft_vocab_size, dtype=np.int64)
    t2d = np.zeros(target_vocab_size, dtype=bool)
    t2d[selected] = True
    return d2t, t2d


def validate_vocab_mapping(d2t, t2d, draft_vocab_size: int, target_vocab_size: int) -> None:
    """Check that `d2t`/`t2d` agree with each other and with the two vocabulary sizes; one-line errors."""
    d2t = torch.as_tensor(np.asarray(d2t)).long()
    t2d = torch.as_tensor(np.asarray(t2d)).bool()
    if d2t.numel() != draft_vocab_size:
        raise UserError(f"d2t has {d2t.numel()} entries but the draft vocabulary has {draft_vocab_size}.")
    if t2d.numel() != target_vocab_size:
        raise UserError(
            f"t2d has {t2d.numel()} entries but the verifier vocabulary has {target_vocab_size}: the mapping was "
            "built for another tokenizer; rebuild it with `python -m speculators_hf.vocab`."
        )
    if int(t2d.sum()) != draft_vocab_size:
        raise UserError(f"t2d marks {int(t2d.sum())} tokens but the draft vocabulary has {draft_vocab_size}.")
    target = torch.arange(draft_vocab_size) + d2t
    if (
        target.min() < 0
        or target.max() >= target_vocab_size
        or not torch.equal(torch.sort(target).values, torch.nonzero(t2d).flatten())
    ):
        raise UserError("d2t and t2d disagree: {j + d2t[j]} must be exactly the ids where t2d is True.")


def save_vocab_mapping(output_dir: str | Path, d2t: np.ndarray, t2d: np.ndarray) -> tuple[Path, Path]:
    """`<output_dir>/d2t.npy` and `t2d.npy`, each written atomically."""
    output_dir = Path(output_dir)
    paths = output_dir / D2T_FILE, output_dir / T2D_FILE
    for path, arr in zip(paths, (d2t, t2d)):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
    return paths


def load_vocab_mapping(
    d2t_path: str | Path, t2d_path: str | Path, flags: tuple[str | None, str | None] = ("--d2t-path", "--t2d-path")
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(d2t int64 [Vd], t2d bool [V])` from `.npy` files, checked for dtype and shape (one line naming the file)."""
    fix = "rebuild it with `python -m speculators_hf.vocab`"
    arrays = []
    for flag, path, kinds, what in (
        (flags[0], d2t_path, "iu", "int64 offsets [Vd]"),
        (flags[1], t2d_path, "bui", "a bool mask [V]"),
    ):
        label = f"{flag} {path}" if flag else str(path)
        arr = np_load(path, label, fix)
        if arr.ndim != 1 or arr.dtype.kind not in kinds:
            raise bad_file(label, f"holds {arr.dtype} values of shape {list(arr.shape)}, expected {what}", fix)
        if arr.size == 0:
            raise bad_file(label, f"holds no entries, expected {what} with at least one", fix)
        if kinds == "bui" and arr.dtype.kind != "b" and not np.isin(arr, (0, 1)).all():
            raise bad_file(label, "holds values other than 0/1, expected a bool mask [V]", fix)
        arrays.append(arr)
    return torch.from_numpy(arrays[0].astype(np.int64)), torch.from_numpy(arrays[1].astype(bool))
