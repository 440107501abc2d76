"""Training data: datagen shards (and the seed's per-sample `.pt` files) as lazy `torch` datasets, packed into rows.

Every sample is `{"input_ids": [T], "loss_mask": [T], "hidden_states": [T, L, H]}` with `L` = the aux layers then the
verifier's last layer (pre-norm). Formats (`--data-format-version`):

    0    data_*.pt   {"input_ids", "loss_mask", "hidden_state": [T, 3H], "target": [T, H]}     (seed, v0)
    1    data_*.pt   {"input_ids", "loss_mask", "hidden_states": [[T, H] x 4]}                (seed, v1)
    2    data-*.safetensors + index.json (speculators_hf.formats.shards), memory-mapped       (ours)

`.pt` files are read one at a time with `torch.load(weights_only=True, mmap=True)`. fp8 hidden states exist only in
format 2 (with per-token scales); `.pt` files holding float8 tensors are refused.

Hidden states are checked where training reads them (`PackedDataset`): a sample whose states are non-finite (or were
not delivered, online) becomes a zero-loss placeholder (same tokens, loss mask 0, zero states: batch shapes and step
counts do not change) marked `skipped`; the trainer counts them and stops past `--max-skipped-fraction`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..datagen.backends import LAYER_ID_CONVENTION, SEED_LAYER_ID_CONVENTION
from ..formats.shards import SCALE_KEY, ShardDataset
from ..utils import UserError, get_logger
from ..validation import bad_file, describe, read_json_if_exists, torch_load

logger = get_logger(__name__)

# `--data-format-version` of datagen shards (0 and 1 are the seed's per-sample .pt layouts).
SHARDS_DATA_FORMAT = 2


def _natural_key(path: Path):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


_PT_FIX = "it is truncated or not a datagen .pt sample: delete it or regenerate the data"
# the keys of a sample file, by format version
_PT_KEYS = {0: ("input_ids", "loss_mask", "hidden_state", "target"), 1: ("input_ids", "loss_mask", "hidden_states")}


def load_pt_sample(path: Path, version: int | None = None) -> dict:
    """One `data_*.pt` sample, read with `weights_only=True` and checked: a dict with the format's keys, tensors of
    one length `T` (`hidden_state [T, 3H]` and `target [T, H]` in v0, `hidden_states` a list of `[T, H]` in v1)."""
    label = str(path)
    d = torch_load(path, label, _PT_FIX, mmap=True)
    if not isinstance(d, dict):
        raise bad_file(label, f"holds a {type(d).__name__}, expected a dict of tensors", _PT_FIX)
    if version is None:
        version = 0 if "hidden_state" in d else 1
    missing = [k for k in _PT_KEYS[version] if k not in d]
    if missing:
        raise bad_file(label, f"has no {missing} (format v{version} needs {list(_PT_KEYS[version])})", _PT_FIX)
    tensors = {"input_ids": d["input_ids"], "loss_mask": d["loss_mask"]}
    if version == 0:
        tensors |= {"hidden_state": d["hidden_state"], "target": d["target"]}
    elif isinstance(d["hidden_states"], (list, tuple)) and d["hidden_states"]:
        tensors |= {f"hidden_states[{i}]": t for i, t in enumerate(d["hidden_states"])}
    else:
        raise bad_file(label, "hidden_states is not a non-empty list of [T, H] tensors", _PT_FIX)
    for name, t in tensors.items():
        rank = 1 if name in ("input_ids", "loss_mask") else 2
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            what = f"a {t.dtype} tensor {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise bad_file(label, f"{name} is {what}, expected a rank-{rank} tensor", _PT_FIX)
    lengths = {name: len(t) for name, t in tensors.items()}
    if len(set(lengths.values())) != 1 or not lengths["input_ids"]:
        raise bad_file(label, f"its tensors have different or zero lengths {lengths}", _PT_FIX)
    if d["input_ids"].is_floating_point() or d["input_ids"].dtype == torch.bool:
        raise bad_file(label, f"input_ids are {d['input_ids'].dtype}, expected integers", _PT_FIX)
    if version == 0 and d["hidden_state"].shape[-1] % d["target"].shape[-1]:
        raise bad_file(
            label, "hidden_state's width is not a multiple of target's (expected [T, 3H] and [T, H])", _PT_FIX
        )
    return d


def detect_format(data_path: Path) -> int:
    if list(data_path.glob("data-*.safetensors")) or (data_path / "index.json").exists():
        return SHARDS_DATA_FORMAT
    files = sorted(data_path.rglob("*.pt"))
    files = [f for f in files if f.name != "token_freq.pt"]
    if not files:
        raise UserError(f"--data-path {data_path}: no datagen shards (data-*.safetensors) or data_*.pt files found.")
    keys = load_pt_sample(files[0]).keys()
    return 0 if "hidden_state" in keys else 1


class PtFileDataset(torch.utils.data.Dataset):
    """The seed's one-file-per-sample formats (v0 and v1), standardised to `hidden_states [T, L, H]`."""

    def __init__(self, files: list[Path], version: int):
        if not files:
            raise UserError("No data_*.pt files found.")
        self.files, self.version = files, version
        self.dtype = None
        first = self[0]["hidden_states"]
        self.hidden_shape = tuple(first.shape[1:])
        self.dtype = first.dtype

    def __len__(self) -> int:
        return len(self.files)

    def sample_length(self, i: int) -> int:
        return len(load_pt_sample(self.files[i], self.version)["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d = load_pt_sample(self.files[i], self.version)
        try:
            if self.version == 0:
                aux, last = d["hidden_state"], d["target"]  # [T, 3H], [T, H]
                hs = torch.cat([aux.view(len(aux), -1, last.shape[-1]), last[:, None]], dim=1)  # [T, 4, H]
            else:
                hs = torch.stack(list(d["hidden_states"]), dim=1)  # [T, L, H]
        except RuntimeError as err:  # layers of different widths or dtypes
            raise bad_file(
                str(self.files[i]), f"its hidden states do not stack ({describe(err, 80)})", _PT_FIX
            ) from err
        if hs.dtype.itemsize == 1:
            raise UserError(
                f"{self.files[i]}: {str(hs.dtype).replace('torch.', '')} hidden states without scales; the .pt "
                "formats hold float32/bfloat16/float16 only (fp8 data: datagen --storage-dtype fp8_e4m3, format 2)."
            )
        if self.dtype is not None and hs.dtype != self.dtype:
            raise UserError(
                f"{self.files[i]} stores hidden states as {hs.dtype} but {self.files[0].name} as {self.dtype}; one "
                "data folder holds one storage dtype."
            )
        return {"input_ids": d["input_ids"].long(), "loss_mask": d["loss_mask"].long(), "hidden_states": hs}


def open_dataset(
    data_path: str | Path, version: int | None = None, dequantize: bool = True
) -> torch.utils.data.Dataset:
    """The samples below `data_path` in format `version` (None: detected).

    `dequantize=False`: fp8 shards give their float8 values and `hidden_states_scale` (what `Eagle3Trainer` takes:
    it dequantizes on its device); otherwise hidden states are always floating point values.
    """
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise UserError(f"--data-path {data_path} is not a folder (run `speculators-hf datagen` first).")
    version = detect_format(data_path) if version is None else version
    if version == SHARDS_DATA_FORMAT:
        return ShardDataset(data_path, dequantize=dequantize)
    if version not in (0, 1):
        raise UserError(f"--data-format-version {version}: expected 0, 1 (seed .pt files) or 2 (datagen shards).")
    files = sorted((f for f in data_path.rglob("*.pt") if f.name != "token_freq.pt"), key=_natural_key)
    if not files:
        raise UserError(f"--data-path {data_path}: no data_*.pt files for --data-format-version {version}.")
    return PtFileDataset(files, version)


def data_layer_ids(data_path: str | Path, version: int | None) -> list[int] | None:
    """Layer ids (aux..., last) recorded with the data, converted to vLLM's convention; None when none are recorded.

    The convention is the name before the colon of `data_config.json`'s `layer_id_convention`: `vllm` (our datagen,
    every format) is used as is; `speculators-0.3.0` (id i = the *output* of layer i) is shifted by +1. A seed-format
    `data_config.json` (v0/v1 `.pt` data) that names no convention comes from speculators 0.3.0: shifted, with a
    warning. `index.json` of datagen shards is always in vLLM's convention.
    """
    vllm, seed = (c.split(":")[0] for c in (LAYER_ID_CONVENTION, SEED_LAYER_ID_CONVENTION))
    for name in ("data_config.json", "index.json"):
        path = Path(data_path) / name
        recorded = read_json_if_exists(path, fix="rerun datagen, or fix the file by hand") or {}
        ids = recorded.get("layer_ids")
        if not ids:
            continue
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise bad_file(str(path), f"layer_ids is {ids!r}, expected a list of integers", "rerun datagen")
        convention = recorded.get("layer_id_convention")
        if convention is not None and not isinstance(convention, str):
            raise bad_file(str(path), f"layer_id_convention is {convention!r}, expected a string", "rerun datagen")
        convention = str(recorded.get("layer_id_convention") or "").split(":")[0].strip()
        if not convention and (name == "index.json" or version == SHARDS_DATA_FORMAT):
            convention = vllm  # datagen shards exist only in our format
        if convention == vllm:
            return ids
        if convention == seed or (not convention and version in (0, 1)):
            if not convention:
                logger.warning(
                    "%s names no layer-id convention: read as speculators 0.3.0's (id i = output of layer i), so the "
                    'layer ids %s become %s in vLLM\'s convention (add "layer_id_convention": "vllm" to it if they '
                    "already are).",
                    path,
                    ids,
                    [i + 1 for i in ids],
                )
            return [i + 1 for i in ids]  # the output of layer i is the input of layer i + 1
        raise UserError(
            f"{path}: unknown layer_id_convention {recorded.get('layer_id_convention')!r} (expected '{vllm}: ...' "
            f"or '{seed}: ...')."
        )
    return None


def train_eval_split(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random split of `range(n)` into (train, held-out) indices."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = 0 if eval_fraction <= 0 else max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise UserError(f"--eval-split {eval_fraction} leaves no training samples out of {n}.")
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def pack(lengths: list[int], total_seq_len: int) -> list[list[int]]:
    """First-fit-decreasing packing of sample lengths into bins of `total_seq_len` tokens (deterministic).

    Samples go longest first (ties: lower index first), each into the first (oldest) bin with room for it. The first
    fitting bin is found in a max-segment-tree over the bins' free room, so packing is O(n log n), not O(n * bins).
    Returns the bins in the order they were opened, each as sorted sample indices.
    """
    too_long = [(n, i) for i, n in enumerate(lengths) if n > total_seq_len]
    if too_long:
        n, i = max(too_long)
        raise UserError(
            f"--total-seq-len {total_seq_len} is smaller than sample {i} ({n} aligned tokens; {len(too_long)} samples "
            f"do not fit): raise --total-seq-len to at least {n} or regenerate the data with a shorter --seq-length."
        )
    if not lengths:
        return []
    # First fit leaves at most one bin at most half full, so it never opens more than 2 * tokens / capacity + 1 bins.
    max_bins = min(len(lengths), 2 * sum(lengths) // total_seq_len + 2)
    size = 1 << (max_bins - 1).bit_length()
    room = [total_seq_len] * (2 * size)  # room[size + b]: free tokens of bin b (unopened: empty); parents: max
    bins: list[list[int]] = []
    order = torch.argsort(-torch.tensor(lengths, dtype=torch.long), stable=True).tolist()  # longest first, ties: index
    for i in order:
        n = lengths[i]
        node = 1
        while node < size:  # descend to the leftmost leaf with room >= n (the root always has: unopened bins)
            node = 2 * node if room[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        room[node] -= n
        node //= 2
        while node:  # restore the max over children up to the root; stop once a parent is unchanged
            best = max(room[2 * node], room[2 * node + 1])
            if room[node] == best:
                break
            room[node] = best
            node //= 2
    return [sorted(b) for b in bins]


class PackedDataset(torch.utils.data.Dataset):
    """Groups of samples filling one row of `total_seq_len` aligned tokens (`DataCollatorForEagle3` joins them).

    The aligned length of a sample of `T` tokens is `T - 1` (see `collator.align_sample`). Each sample is returned
    with its dataset `index`; one whose hidden states are unusable is a zero-loss placeholder marked `skipped`. A
    dataset with `get_many(indices)` (online states) is asked for a whole pack, or a whole batch, at once.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, indices: list[int], total_seq_len: int):
        self.dataset = dataset
        lengths = [dataset.sample_length(i) - 1 for i in indices]
        self.packs = [[indices[j] for j in group] for group in pack(lengths, total_seq_len)]
        self.num_tokens = sum(lengths)
        self.num_samples = len(indices)
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        return self._read(self.packs[i])

    def __getitems__(self, pack_indices: list[int]) -> list[list[dict[str, torch.Tensor]]]:
        samples = iter(self._read([j for i in pack_indices for j in self.packs[i]]))
        return [[next(samples) for _ in self.packs[i]] for i in pack_indices]

    def _read(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        get_many = getattr(self.dataset, "get_many", None)
        samples = get_many(indices) if get_many is not None else [self.dataset[j] for j in indices]
        dtype = next((s["hidden_states"].dtype for s in samples if s.get("hidden_states") is not None), None)
        return [self._checked(j, s, dtype) for j, s in zip(indices, samples)]

    def _checked(self, j: int, sample: dict, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        if usable_states(sample):
            return {**sample, "index": j}
        if sample.get("hidden_states") is not None and j not in self._warned:
            self._warned.add(j)
            sample_id = self.dataset.sample_id(j) if hasattr(self.dataset, "sample_id") else j
            logger.warning("Sample %d (datagen sample id %d) skipped: non-finite hidden states.", j, sample_id)
        return {**placeholder(sample, self.dataset.hidden_shape, dtype), "index": j, "skipped": True}


def usable_states(sample: dict[str, torch.Tensor]) -> bool:
    """Whether a sample's hidden states (and fp8 scales) are there and finite (`all_finite`)."""
    states = sample.get("hidden_states")
    if states is None:  # online: the servers delivered nothing usable
        return False
    return all_finite(states) and (SCALE_KEY not in sample or all_finite(sample[SCALE_KEY]))


# float dtype -> (integer dtype of its size, its exponent bits): a value is inf or nan exactly when they are all set
# (float8 e4m3fn has no inf; its nan is the one pattern with exponent and mantissa all set: 0x7F under the sign)
_NON_FINITE_BITS = {
    torch.float32: (torch.int32, 0x7F800000),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float8_e4m3fn: (torch.uint8, 0x7F),
}


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of a float tensor is finite. On CPU a test of the bits (in numpy, no float conversion:
    several times faster than a float32 sum, which a data loader worker pays for every sample); elsewhere one
    fp32-accumulated sum (float8 has no `isfinite`), non-finite when an element is."""
    bits = _NON_FINITE_BITS.get(x.dtype)
    if bits is None or x.device.type != "cpu":
        return bool(torch.isfinite(x.sum(dtype=torch.float32)))
    itype, mask = bits
    values = x.view(itype).numpy()
    return not ((values & mask) == mask).any()


def placeholder(sample: dict, hidden_shape: tuple[int, int], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A zero-loss stand-in for a sample with unusable states: its tokens, loss mask 0, zero states (and scales)."""
    out = {**sample, "loss_mask": torch.zeros_like(sample["loss_mask"])}
    states = sample.get("hidden_states")
    if states is None:
        out["hidden_states"] = torch.zeros(len(sample["input_ids"]), *hidden_shape, dtype=dtype or torch.float32)
    else:
        out["hidden_states"] = torch.zeros_like(states)
    if SCALE_KEY in sample:
        out[SCALE_KEY] = torch.zeros_like(sample[SCALE_KEY])
    return out


def add_uniform_noise(hidden_states: torch.Tensor, magnitude: float) -> torch.Tensor:
    """`hidden_states + U(-magnitude, magnitude)` (the usual light augmentation of the aux states)."""
    if magnitude <= 0:
        return hidden_states
    return hidden_states + torch.empty_like(hidden_states).uniform_(-magnitude, magnitude)
