"""The on-disk format of datagen's output, and a memory-mapped reader for training.

An output folder holds `data-00000.safetensors`, `data-00001.safetensors`, ... and `index.json`. Each shard packs many
samples end to end:

    input_ids       int64  [N]            N = total tokens of the shard's samples
    loss_mask       uint8  [N]            1 on assistant tokens
    hidden_states   dtype  [N, L, H]      L = aux layers + the last layer (pre-norm), in `layer_ids` order;
                                          absent in tokens-only shards (`--tokens-only`: states come from servers)
    sample_offsets  int64  [S + 1]        sample s spans [sample_offsets[s], sample_offsets[s + 1])
    sample_ids      int64  [S]            the sample's row in the tokenized dataset (for resume and provenance)

`--storage-dtype fp8_e4m3` stores `hidden_states` as float8 e4m3 (safetensors `F8_E4M3`, still memory-mapped) with
one scale per token and layer, so that an outlier token does not crush the others:

    hidden_states        float8_e4m3fn  [N, L, H]   round(x / scale)
    hidden_states_scale  float32        [N, L]      amax over H of |x| / 448 (1 where the row is all zeros)

and `x ~ float(hidden_states) * hidden_states_scale[..., None]` (relative error per element <= 2^-4). Each shard
describes itself by its tensors' dtypes; a folder holds one storage dtype (the reader refuses a mix).

`index.json` lists the finished shards in order; a shard file exists only once it is complete (temp file + rename),
and `index.json` is rewritten atomically after each one, so a killed run leaves a consistent folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils import UserError, atomic_path, write_json

INDEX_FILE = "index.json"
SHARD_FORMAT = "speculators_hf.shards"
SHARD_SCHEMA_VERSION = 1  # the layout of one shard file (recorded in its metadata and index.json)

# `--storage-dtype` values: "auto" keeps the extraction dtype; fp8_e4m3 adds per-(token, layer) scales.
STORAGE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8_e4m3")
FP8 = "fp8_e4m3"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
FP8_SCALE_DTYPE = torch.float32  # 4 bytes per (token, layer): 0.1% of a Llama-8B token; bf16 saves half of that
SCALE_KEY = "hidden_states_scale"
_QUANT_CHUNK = 1 << 20  # elements quantized at a time
# safetensors dtype names of the stored hidden states -> the --storage-dtype that writes them
_STORED = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": FP8}


def shard_name(k: int) -> str:
    return f"data-{k:05d}.safetensors"


def quantize_fp8(x: torch.Tensor, scale_dtype: torch.dtype = FP8_SCALE_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [..., H]` -> `(q [..., H] float8_e4m3fn, scale [...])` with `x ~ q * scale[..., None]`, scale = amax / 448.

    Computed in float32 on `x`'s device; `q` is rounded with the stored (maybe rounded) scale, so it never overflows.
    """
    rows = x.reshape(-1, x.shape[-1])  # [R, H]
    q = torch.empty(rows.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(len(rows), dtype=scale_dtype, device=x.device)
    step = max(1, _QUANT_CHUNK // rows.shape[-1])  # bounded temporaries
    for a in range(0, len(rows), step):
        chunk = rows[a : a + step]  # [r, H], as given
        amax = chunk.abs().amax(-1).float()  # [r] (exact in any float dtype)
        if not torch.isfinite(amax).all():
            raise UserError("hidden states hold inf/nan (verifier overflow?): they cannot be stored as fp8_e4m3.")
        s = (amax / FP8_MAX).to(scale_dtype)
        s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero rows (and scale underflow)
        # x / s in float32, rounded once to e4m3 (|x / s| <= 448, + 1 bf16 ulp for bf16 scales: rounds to 448)
        torch.div(chunk, s.float().unsqueeze(-1), out=q[a : a + step])
        scale[a : a + step] = s
    return q.view(x.shape), scale.view(x.shape[:-1])


def dequantize(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Hidden states as `dtype`: `x` itself when `scale` is None, else `x * scale` per group of H values.

    `x [..., G, H]` with `scale [..., G]`, or `x [..., G*H]` (G layers side by side, as the collator packs them).
    """
    if scale is None:
        return x.to(dtype)
    scale = scale.to(dtype).unsqueeze(-1)  # [..., G, 1]
    if x.shape[:-1] == scale.shape[:-1]:
        return x.to(dtype, copy=True).mul_(scale)
    return x.unflatten(-1, (scale.shape[-2], -1)).to(dtype, copy=True).mul_(scale).flatten(-2)


def store_hidden_states(hidden_states: torch.Tensor, storage_dtype: str | None) -> dict[str, torch.Tensor]:
    """`hidden_states [T, L, H]` as stored: `{"hidden_states": ...}` (+ `hidden_states_scale [T, L]` for fp8)."""
    if storage_dtype in (None, "auto"):
        return {"hidden_states": hidden_states}
    if storage_dtype == FP8:
        q, scale = quantize_fp8(hidden_states)
        return {"hidden_states": q, SCALE_KEY: scale}
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {storage_dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}.")
    return {"hidden_states": hidden_states.to(getattr(torch, storage_dtype))}


def write_shard(
    path: str | Path,
    samples: list[dict[str, torch.Tensor]],
    sample_ids: list[int],
    storage_dtype: str | None = None,
) -> dict:
    """Write samples (`input_ids [T]`, `loss_mask [T]`, `hidden_states [T, L, H]`) as one shard, atomically.

    `storage_dtype` (`STORAGE_DTYPES`; None or "auto": as given) casts or quantizes the hidden states (per sample, on
    their device, so temporaries stay small). Samples without `hidden_states` (all of them) make a tokens-only shard.
    Returns the shard's entry for `index.json`.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    offsets = torch.zeros(len(samples) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(lengths).cumsum(0)
    with_states = sum("hidden_states" in s for s in samples)
    if with_states not in (0, len(samples)):
        raise ValueError(f"{with_states} of {len(samples)} samples have hidden_states: all or none (tokens only).")
    stored = [store_hidden_states(s["hidden_states"], storage_dtype) for s in samples] if with_states else []
    tensors = {
        "input_ids": torch.cat([s["input_ids"].long() for s in samples]),
        "loss_mask": torch.cat([s["loss_mask"].to(torch.uint8) for s in samples]),
        **({key: torch.cat([s[key] for s in stored]).cpu().contiguous() for key in stored[0]} if stored else {}),
        "sample_offsets": offsets,
        "sample_ids": torch.tensor(sample_ids, dtype=torch.long),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        # One metadata key: safetensors writes its metadata map in hash order, so two keys would make reruns differ.
        save_file(tensors, str(tmp), metadata={"format": f"{SHARD_FORMAT}/{SHARD_SCHEMA_VERSION}"})
    return {
        "file": path.name,
        "num_samples": len(samples),
        "num_tokens": int(offsets[-1]),
        "first_sample_id": int(sample_ids[0]),
        "last_sample_id": int(sample_ids[-1]),
    }


def read_index(data_dir: str | Path) -> dict | None:
    path = Path(data_dir) / INDEX_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_index(data_dir: str | Path, index: dict) -> None:
    write_json(Path(data_dir) / INDEX_FILE, index)


def shard_storage(f, name: str) -> str:
    """The `--storage-dtype` an open shard was written with (from its tensors' dtypes), or a one-line error."""
    dtype = f.get_slice("hidden_states").get_dtype()
    storage = _STORED.get(dtype)
    if storage is None or (storage == FP8) != (SCALE_KEY in f.keys()):
        what = f"{dtype} hidden states " + ("with" if SCALE_KEY in f.keys() else "without") + f" {SCALE_KEY}"
        raise UserError(
            f"Shard {name} stores {what}: not a datagen layout (regenerate it with speculators-hf datagen)."
        )
    return storage


class ShardDataset(torch.utils.data.Dataset):
    """Random access to the samples of a datagen output folder, read lazily from memory-mapped safetensors.

    `dataset[i]` is `{"input_ids": [T] int64, "loss_mask": [T] int64, "hidden_states": [T, L, H]}`. fp8 shards
    (`storage == "fp8_e4m3"`) give `hidden_states` dequantized to float32, or with `dequantize=False` the stored
    float8 values plus `hidden_states_scale [T, L]` (the training collator's input: the trainer dequantizes them on
    its device, which halves what the data loader moves). Tokens-only folders (`--tokens-only`) have no
    `hidden_states` (`hidden_shape` and `storage` are None, `tokens_only` True).
    """

    def __init__(self, data_dir: str | Path, dequantize: bool = True, tokens_only: bool = False):
        """`tokens_only=True` reads only tokens and loss masks even where the shards hold states."""
        self.data_dir = Path(data_dir)
        self.dequantize = dequantize
        index = read_index(self.data_dir)
        if index is not None:
            files = [self.data_dir / s["file"] for s in index["shards"]]
        else:
            files = sorted(self.data_dir.glob("data-*.safetensors"))
        if not files:
            raise UserError(f"No datagen shards (data-*.safetensors) in {self.data_dir}.")
        self.files = files
        self.offsets: list[torch.Tensor] = []
        self.sample_ids: list[torch.Tensor] = []
        self._where: list[tuple[int, int]] = []
        for k, file in enumerate(files):
            with safe_open(str(file), "pt") as f:
                offsets = f.get_tensor("sample_offsets")
                self.sample_ids.append(f.get_tensor("sample_ids"))
                has_states = "hidden_states" in f.keys()
                storage = shard_storage(f, file.name) if has_states else None
                if k == 0:
                    self.hidden_shape = tuple(f.get_slice("hidden_states").get_shape()[1:]) if has_states else None
                    self.storage = storage  # the --storage-dtype of every shard (None: tokens only)
                elif storage != self.storage:
                    raise UserError(
                        f"{self.data_dir}: {file.name} stores hidden states as {storage} but {files[0].name} as "
                        f"{self.storage}; one data folder holds one --storage-dtype (regenerate into a new folder)."
                    )
            self.offsets.append(offsets)
            self._where += [(k, s) for s in range(len(offsets) - 1)]
        self.tokens_only = tokens_only or self.hidden_shape is None
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self._where)

    def _handle(self, k: int):
        if k not in self._handles:  # opened lazily, so each DataLoader worker maps its own files
            self._handles[k] = safe_open(str(self.files[k]), "pt")
        return self._handles[k]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def sample_length(self, i: int) -> int:
        k, s = self._where[i]
        return int(self.offsets[k][s + 1] - self.offsets[k][s])

    def sample_id(self, i: int) -> int:
        """Sample `i`'s row in datagen's tokenized dataset (stable across runs: the key of online caches)."""
        k, s = self._where[i]
        return int(self.sample_ids[k][s])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k, s = self._where[i]
        a, b = int(self.offsets[k][s]), int(self.offsets[k][s + 1])
        f = self._handle(k)
        sample = {"input_ids": f.get_slice("input_ids")[a:b].long(), "loss_mask": f.get_slice("loss_mask")[a:b].long()}
        if self.tokens_only:
            return sample
        sample["hidden_states"] = f.get_slice("hidden_states")[a:b]  # [T, L, H]
        if self.storage == FP8:
            scale = f.get_slice(SCALE_KEY)[a:b]  # [T, L]
            if self.dequantize:
                sample["hidden_states"] = dequantize(sample["hidden_states"], scale, torch.float32)
            else:
                sample[SCALE_KEY] = scale
        return sample


def write_v1_sample(path: str | Path, sample: dict[str, torch.Tensor], storage_dtype: str | None = None) -> None:
    """The seed's v1 layout, one sample per file: `input_ids [T]`, `hidden_states` (list of `[T, H]`), `loss_mask [T]`.

    Holds only tensors and lists, so training reads it with `torch.load(..., weights_only=True)`. The layout has no
    place for scales (and the seed's readers would train on the raw fp8 values), so fp8 storage is refused.
    """
    if storage_dtype == FP8:
        raise UserError("--storage-dtype fp8_e4m3 needs --data-format-version 2 (the v1 .pt layout has no scales).")
    hidden_states = store_hidden_states(sample["hidden_states"], storage_dtype)["hidden_states"]  # [T, L, H]
    data = {
        "input_ids": sample["input_ids"].long(),
        "hidden_states": [hidden_states[:, i].clone() for i in range(hidden_states.shape[1])],
        "loss_mask": sample["loss_mask"].long(),
    }
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
