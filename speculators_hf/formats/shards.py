"""The on-disk format of datagen's output (shards, `index.json`, fp8 scaling), and a memory-mapped reader for training.

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
and `index.json` is rewritten atomically after each one, so a killed run leaves a consistent folder. Every file name
read from `index.json` must name a file inside the folder (`validation.resolve_inside`), and the stored hidden states
must be of the dtype `data_config.json` declares (`hidden_states_storage.dtype`).

Writers raise `OSError` (with the file's name) when the disk is full, whatever the library underneath reports, so
the CLI says it in one line.
"""

from __future__ import annotations

import bisect
import io
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..utils import UserError, atomic_path, write_json
from ..validation import bad_file, read_json_if_exists, resolve_inside, safetensors_header

INDEX_FILE = "index.json"
DATA_CONFIG_FILE = "data_config.json"
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
        try:
            # One metadata key: safetensors writes its metadata map in hash order: two keys would make reruns differ.
            save_file(tensors, str(tmp), metadata={"format": f"{SHARD_FORMAT}/{SHARD_SCHEMA_VERSION}"})
        except SafetensorError as err:  # it reports a full disk as "I/O error: ... (os error 28)"
            raise _as_os_error(err, path) from err
    return {
        "file": path.name,
        "num_samples": len(samples),
        "num_tokens": int(offsets[-1]),
        "first_sample_id": int(sample_ids[0]),
        "last_sample_id": int(sample_ids[-1]),
    }


def _as_os_error(err: Exception, path: Path) -> Exception:
    """The `OSError` a library's I/O failure stands for (naming `path`), or `err` itself when it names none."""
    code = re.search(r"os error (\d+)", str(err))
    if code is None:
        return err
    number = int(code.group(1))
    return OSError(number, os.strerror(number), str(path))


def save_pt(obj, path: str | Path) -> None:
    """`torch.save(obj)` to `path`, atomically; a full disk is an `OSError` naming the file (torch's own writer reports
    it as an unrelated-looking `RuntimeError`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        try:
            tmp.write_bytes(buffer.getbuffer())
        except OSError as err:  # a write error names no file
            raise OSError(err.errno, err.strerror, str(path)) from err


def read_index(data_dir: str | Path) -> dict | None:
    """`index.json` of a datagen folder (None when there is none), checked: `shards` lists `{"file": ...}` entries."""
    path = Path(data_dir) / INDEX_FILE
    fix = "rerun datagen with the same flags (it rewrites index.json), or delete index.json"
    index = read_json_if_exists(path, fix=fix)
    if index is None:
        return None
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in shards):
        raise bad_file(str(path), 'has no list of {"file": ...} entries under "shards"', fix)
    return index


def declared_storage(data_dir: str | Path) -> str | None:
    """The storage dtype of the hidden states that `data_config.json` declares (`hidden_states_storage.dtype`, or
    `model.hidden_states_dtype` where the storage is not recorded), or None: no data config, tokens only, or none
    declared (a folder not written by datagen)."""
    path = Path(data_dir) / DATA_CONFIG_FILE
    fix = "rerun datagen, or fix the file by hand"
    config = read_json_if_exists(path, fix=fix)
    if config is None or config.get("tokens_only") is True:
        return None
    storage, model = config.get("hidden_states_storage"), config.get("model")
    declared = (storage.get("dtype") if isinstance(storage, dict) else None) or (
        model.get("hidden_states_dtype") if isinstance(model, dict) else None
    )
    if declared is not None and declared not in STORAGE_DTYPES[1:]:
        raise bad_file(
            str(path), f"declares hidden states of dtype {declared!r}, not one of {STORAGE_DTYPES[1:]}", fix
        )
    return declared


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


# name -> (rank, safetensors dtypes allowed) of the tensors a shard holds (hidden_states: not in tokens-only shards)
_SHARD_TENSORS = {
    "input_ids": (1, ("I64", "I32")),
    "loss_mask": (1, ("U8", "I64", "I32", "BOOL")),
    "hidden_states": (3, tuple(_STORED)),
    "sample_offsets": (1, ("I64",)),
    "sample_ids": (1, ("I64",)),
}
_SCALE_DTYPES = ("F32", "BF16", "F16")


def check_shard(path: Path, fix: str = "delete it and rerun datagen with the same flags (it resumes)"):
    """Check a shard's header (tensors, ranks, dtypes, matching lengths) and its sample offsets, without reading its
    hidden states. Returns `(hidden_states shape [N, L, H] or None (tokens only), sample_offsets [S + 1],
    sample_ids [S])`; `fix` ends the one-line error."""
    label = str(path)
    fix = f"it is truncated or not a datagen shard: {fix}"
    header = safetensors_header(path, label, fix)
    for name, (rank, dtypes) in _SHARD_TENSORS.items():
        if name not in header:
            if name == "hidden_states" and SCALE_KEY not in header:
                continue  # a tokens-only shard
            raise bad_file(label, f"has no {name} tensor", fix)
        dtype, shape = header[name]
        if len(shape) != rank or dtype not in dtypes:
            raise bad_file(label, f"{name} is {dtype} {shape}, expected rank {rank} of {'/'.join(dtypes)}", fix)
    n = header["input_ids"][1][0]
    shape = header["hidden_states"][1] if "hidden_states" in header else None
    counts = {k: header[k][1][0] for k in ("input_ids", "loss_mask", "hidden_states") if k in header}
    if len(set(counts.values())) > 1:
        raise bad_file(label, f"{', '.join(counts)} have {', '.join(map(str, counts.values()))} tokens", fix)
    if SCALE_KEY in header and (header[SCALE_KEY][1] != shape[:2] or header[SCALE_KEY][0] not in _SCALE_DTYPES):
        dtype, scale_shape = header[SCALE_KEY]
        raise bad_file(label, f"{SCALE_KEY} is {dtype} {scale_shape}, expected {shape[:2]} of a float dtype", fix)
    with safe_open(str(path), "pt") as f:
        offsets, sample_ids = f.get_tensor("sample_offsets"), f.get_tensor("sample_ids")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n or (offsets[1:] <= offsets[:-1]).any():
        raise bad_file(label, f"sample_offsets do not split its {n} tokens into non-empty samples", fix)
    if len(sample_ids) != len(offsets) - 1:
        raise bad_file(label, f"has {len(sample_ids)} sample_ids for {len(offsets) - 1} samples", fix)
    return shape, offsets, sample_ids


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
            label, fix = str(self.data_dir / INDEX_FILE), "rerun datagen with the same flags (it rewrites index.json)"
            files = [resolve_inside(self.data_dir, s["file"], label, fix) for s in index["shards"]]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(
                    f"{self.data_dir / INDEX_FILE} lists {missing[0]}, which is missing ({len(missing)} of "
                    f"{len(files)} shards): rerun datagen with the same flags (it resumes) or restore the file."
                )
        else:
            files = sorted(self.data_dir.glob("data-*.safetensors"))
        if not files:
            raise UserError(f"No datagen shards (data-*.safetensors) in {self.data_dir}.")
        self.files = files
        self.offsets: list[torch.Tensor] = []
        self.sample_ids: list[torch.Tensor] = []
        self._starts = [0]  # the dataset index of each shard's first sample, then the total (not one entry per sample)
        for k, file in enumerate(files):
            shape, offsets, sample_ids = check_shard(file)
            self.sample_ids.append(sample_ids)
            if shape is None:
                storage = None  # tokens only
            else:
                with safe_open(str(file), "pt") as f:
                    storage = shard_storage(f, str(file))
            if k == 0:
                self.hidden_shape = None if shape is None else tuple(shape[1:])  # (L, H)
                self.storage = storage  # the --storage-dtype of every shard (None: tokens only)
            elif storage != self.storage:
                kinds = [f"stores hidden states as {s}" if s else "holds tokens only" for s in (storage, self.storage)]
                raise UserError(
                    f"{self.data_dir}: {file.name} {kinds[0]} but {files[0].name} {kinds[1]}; one data folder holds "
                    "one datagen run (one --storage-dtype, --tokens-only or not): regenerate into a new folder."
                )
            elif shape is not None and tuple(shape[1:]) != self.hidden_shape:
                raise UserError(
                    f"{file}: hidden states of shape [N, {shape[1]}, {shape[2]}] but {files[0].name} has "
                    f"[N, {self.hidden_shape[0]}, {self.hidden_shape[1]}]; one data folder holds one datagen run."
                )
            self.offsets.append(offsets)
            self._starts.append(self._starts[-1] + len(offsets) - 1)
        declared = declared_storage(self.data_dir)
        if declared is not None and self.storage is not None and self.storage != declared:
            raise UserError(
                f"{files[0]} stores hidden states as {self.storage} but {self.data_dir / DATA_CONFIG_FILE} declares "
                f"{declared}: the shards are not that datagen run's; regenerate the data into a new folder."
            )
        self.tokens_only = tokens_only or self.hidden_shape is None
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        """Sample `i` (negative: from the end) -> (shard, sample within it)."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a dataset of {len(self)}")
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def _handle(self, k: int):
        if k not in self._handles:  # opened lazily, so each DataLoader worker maps its own files
            self._handles[k] = safe_open(str(self.files[k]), "pt")
        return self._handles[k]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def sample_length(self, i: int) -> int:
        k, s = self._locate(i)
        return int(self.offsets[k][s + 1] - self.offsets[k][s])

    def sample_id(self, i: int) -> int:
        """Sample `i`'s row in datagen's tokenized dataset (stable across runs: the key of online caches)."""
        k, s = self._locate(i)
        return int(self.sample_ids[k][s])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k, s = self._locate(i)
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
    save_pt(data, path)
