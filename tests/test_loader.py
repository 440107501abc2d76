"""The data loader's fast paths give exactly what the previous code gave: the collator that writes each row straight
into the batch (against the previous per-row `cat` + `stack`, kept in `benchmarks/loader.py`), and the finiteness
check by bits (against the previous float32 sum)."""

import pytest
import torch

from benchmarks.loader import OldCollator, old_usable_states  # the previous implementations, as the reference
from speculators_hf.formats.shards import SCALE_KEY, quantize_fp8
from speculators_hf.training.collator import DataCollatorForEagle3
from speculators_hf.training.data import all_finite, usable_states

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def sample(T: int, seed: int, dtype: torch.dtype, L: int = 4, H: int = 8) -> dict:
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(T, L, H, generator=gen)
    out = {
        "input_ids": torch.randint(0, 100, (T,), generator=gen),
        "loss_mask": torch.randint(0, 2, (T,), generator=gen),
    }
    if dtype == torch.float8_e4m3fn:
        q, scale = quantize_fp8(states)
        return out | {"hidden_states": q, SCALE_KEY: scale}
    return out | {"hidden_states": states.to(dtype)}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(bits), b.view(bits))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alignment", ["predicted", "input"])
def test_collator_writes_the_batch_the_previous_one_built(dtype, alignment):
    packs = [[sample(5, 0, dtype), sample(9, 1, dtype)], [sample(2, 2, dtype)], [sample(16, 3, dtype)]]
    for pack in packs:
        for k, s in enumerate(pack):
            s["index"] = k
    for cast in (None, torch.bfloat16) if dtype != torch.float16 else (None,):
        new = DataCollatorForEagle3(16, alignment, cast)(packs)
        old = OldCollator(16, alignment, cast)(packs)
        assert list(new) == list(old) and all(same(new[k], old[k]) for k in old), (dtype, cast)


@pytest.mark.parametrize("dtype", DTYPES)
def test_finiteness_by_bits_agrees_with_the_float32_sum(dtype):
    x = torch.randn(4, 3, 8).to(dtype)
    bad = [float("nan")] + ([] if dtype == torch.float8_e4m3fn else [float("inf"), -float("inf")])  # e4m3fn: no inf
    cases = [x, x[:, 1:], torch.tensor([torch.finfo(dtype).max]).to(dtype), torch.zeros(0, dtype=dtype)]
    for value in bad:
        y = x.float()
        y[1, 2, 3] = value
        cases += [y.to(dtype), y.to(dtype)[:, 1:], y.to(dtype)[:, :2]]
    for case in cases:
        expected = bool(torch.isfinite(case.sum(dtype=torch.float32)))
        assert all_finite(case) == expected
        s = {"hidden_states": case}
        assert usable_states(s) == old_usable_states(s) == expected


def test_shard_dataset_keeps_no_per_sample_bookkeeping(tmp_path):
    """Opening a folder keeps one entry per shard, not one Python object per sample (a million samples were ~100 MB
    in every DataLoader worker); indexing is unchanged."""
    import tracemalloc

    from speculators_hf.formats.shards import ShardDataset, write_index, write_shard

    entries, n = [], 0
    for k, count in enumerate((5_000, 1, 3_000)):
        samples = [{"input_ids": torch.tensor([i, i + 1]), "loss_mask": torch.ones(2)} for i in range(n, n + count)]
        entries.append(write_shard(tmp_path / f"data-{k:05d}.safetensors", samples, list(range(n, n + count))))
        n += count
    write_index(tmp_path, {"shards": entries})
    tracemalloc.start()
    dataset = ShardDataset(tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200_000, f"{peak} bytes traced to open 8,001 samples"
    assert len(dataset) == n == 8_001
    for i in (0, 4_999, 5_000, 5_001, 8_000, -1):
        j = i % n
        assert dataset[i]["input_ids"].tolist() == [j, j + 1] and dataset.sample_id(i) == j
        assert dataset.sample_length(i) == 2
    with pytest.raises(IndexError):
        dataset[n]
