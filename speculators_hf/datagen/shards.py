"""The on-disk format of datagen's output, and a memory-mapped reader for training.

An output folder holds `data-00000.safetensors`, `data-00001.safetensors`, ... and `index.json`. Each shard packs many
samples end to end:

    input_ids       int64  [N]            N = total tokens of the shard's samples
    loss_mask       uint8  [N]            1 on assistant tokens
    hidden_states   dtype  [N, L, H]      L = aux layers + the last layer (pre-norm), in `layer_ids` order;
                                          absent in tokens-only shards (`--tokens-only`: states come from servers)
    sample_offsets  int64  [S + 1]        sample s spans [sample_offsets[s], sample_offsets[s + 1])
    sample_ids      int64  [S]            the sample's row in the tokenized dataset (for resume and provenance)

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


def shard_name(k: int) -> str:
    return f"data-{k:05d}.safetensors"


def write_shard(path: str | Path, samples: list[dict[str, torch.Tensor]], sample_ids: list[int]) -> dict:
    """Write samples (`input_ids [T]`, `loss_mask [T]`, `hidden_states [T, L, H]`) as one shard, atomically.

    Samples without `hidden_states` (all of them) make a tokens-only shard.

    Returns the shard's entry for `index.json`.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    offsets = torch.zeros(len(samples) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(lengths).cumsum(0)
    tensors = {
        "input_ids": torch.cat([s["input_ids"].long() for s in samples]),
        "loss_mask": torch.cat([s["loss_mask"].to(torch.uint8) for s in samples]),
        "sample_offsets": offsets,
        "sample_ids": torch.tensor(sample_ids, dtype=torch.long),
    }
    with_states = sum("hidden_states" in s for s in samples)
    if with_states not in (0, len(samples)):
        raise ValueError(f"{with_states} of {len(samples)} samples have hidden_states: all or none (tokens only).")
    if with_states:
        tensors["hidden_states"] = torch.cat([s["hidden_states"] for s in samples]).contiguous()
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


class ShardDataset(torch.utils.data.Dataset):
    """Random access to the samples of a datagen output folder, read lazily from memory-mapped safetensors.

    `dataset[i]` is `{"input_ids": [T] int64, "loss_mask": [T] int64, "hidden_states": [T, L, H]}`; tokens-only
    folders (`--tokens-only`) have no `hidden_states` (`hidden_shape` is None, `tokens_only` True).
    """

    def __init__(self, data_dir: str | Path, tokens_only: bool = False):
        """`tokens_only=True` reads only tokens and loss masks even where the shards hold states."""
        self.data_dir = Path(data_dir)
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
                if k == 0:
                    has_states = "hidden_states" in f.keys()
                    self.hidden_shape = tuple(f.get_slice("hidden_states").get_shape()[1:]) if has_states else None
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
        if not self.tokens_only:
            sample["hidden_states"] = f.get_slice("hidden_states")[a:b]
        return sample


def write_v1_sample(path: str | Path, sample: dict[str, torch.Tensor]) -> None:
    """The seed's v1 layout, one sample per file: `input_ids [T]`, `hidden_states` (list of `[T, H]`), `loss_mask [T]`.

    Holds only tensors and lists, so training reads it with `torch.load(..., weights_only=True)`.
    """
    hidden_states = sample["hidden_states"]  # [T, L, H]
    data = {
        "input_ids": sample["input_ids"].long(),
        "hidden_states": [hidden_states[:, i].clone() for i in range(hidden_states.shape[1])],
        "loss_mask": sample["loss_mask"].long(),
    }
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
