"""The offline input pipeline at production shapes: shard reader + packing + collator, per loader worker.

    .venv/bin/python benchmarks/loader.py                         # H 4096 and 8192, bf16 and fp8 (~6 min, 3 GB /tmp)
    .venv/bin/python benchmarks/loader.py --hidden 4096 --tokens 16384 --repeat 2   # quick (~1 min)
    .venv/bin/python benchmarks/loader.py --transport-only        # online spool transport on loopback (~30 s)

What one DataLoader worker does per batch, timed in this process with one intra-op thread (as a worker runs):
`PackedDataset.__getitems__` (the `ShardDataset` reads and the finiteness check of every sample) then
`DataCollatorForEagle3` (one row of --total-seq-len tokens, fp8 kept as fp8 + scales, as training collates it).
Shards: L = 4 stored layers (3 aux + last), synthetic states written with `write_shard` to --work-dir, samples of
256..2048 tokens, read once to warm the page cache, then --repeat passes of each path, interleaved, best of each.
Reported per shape and storage: real tokens/s and hidden-state bytes/s of one worker, and the workers per GPU for
--goal tokens/s (Llama-3.1-8B at 44k tokens/s). The previous collator (`OldCollator` below, per-row `cat` + `stack`)
runs on the same packs in the same process; its batches must equal the new ones bit for bit (asserted). `read` is
the reads and checks alone (no collation), `old_read` the same with the previous check (a float32 sum).

`--transport-only`: a writer process saves `[T, 4, H]` bf16 states as safetensors spool files (what the server's
connector writes, with its `.lock` file) into /dev/shm, and this process reads them through `SpoolTransport.load`
(lock, read, delete): bytes/s between two processes on one machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import time
from pathlib import Path

import torch

from speculators_hf.formats.shards import SCALE_KEY, ShardDataset, write_index, write_shard
from speculators_hf.training.collator import DataCollatorForEagle3
from speculators_hf.training.data import PackedDataset

HERE = Path(__file__).resolve().parent
L = 4


class OldCollator(DataCollatorForEagle3):
    """The collator before the loader work: `pack_row` per row (every sample aligned: the aux states reshaped, one
    copy; the row `cat`, a second; it is still the package's reference path) and the rows `stack`ed (a third)."""

    def __call__(self, packs):
        rows = [self.pack_row(p) for p in packs]
        keys = (*self.KEYS, *(key for key in rows[0] if key not in self.KEYS))
        batch = {key: torch.stack([row[key] for row in rows]) for key in keys}
        if all("index" in s for pack in packs for s in pack):
            D = max(len(pack) for pack in packs)
            batch["sample_index"] = torch.tensor([[s["index"] for s in p] + [-1] * (D - len(p)) for p in packs])
            batch["sample_skipped"] = torch.tensor(
                [[s.get("skipped", False) for s in p] + [False] * (D - len(p)) for p in packs]
            )
        return batch


def make_shards(folder: Path, hidden: int, storage: str, tokens: int, seed: int = 0) -> Path:
    """Shards of ~`tokens` tokens of synthetic bf16 states stored as `storage` (bfloat16 or fp8_e4m3)."""
    if (folder / "index.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < tokens:
        lengths.append(rng.randint(256, 2048))
        total += lengths[-1]
    entries, per_shard, sample_id = [], 16, 0
    for k in range(0, len(lengths), per_shard):
        samples = []
        for T in lengths[k : k + per_shard]:
            states = torch.randn(T, L, hidden, generator=gen).to(torch.bfloat16)
            samples.append(
                {
                    "input_ids": torch.randint(0, 128000, (T,)),
                    "loss_mask": torch.ones(T, dtype=torch.long),
                    "hidden_states": states,
                }  # fmt: skip
            )
        ids = list(range(sample_id, sample_id + len(samples)))
        sample_id += len(samples)
        entries.append(write_shard(folder / f"data-{len(entries):05d}.safetensors", samples, ids, storage))
    write_index(folder, {"shards": entries})
    return folder


def old_usable_states(sample: dict) -> bool:
    """The previous finiteness check: one fp32-accumulated sum of the states (and scales)."""
    total = sample["hidden_states"].sum(dtype=torch.float32)
    if SCALE_KEY in sample:
        total = total + sample[SCALE_KEY].sum(dtype=torch.float32)
    return bool(torch.isfinite(total))


def read_old(packed: PackedDataset, i: int) -> list[list[dict]]:
    samples = [packed.dataset[j] for j in packed.packs[i]]
    assert all(old_usable_states(s) for s in samples)
    return [[{**s, "index": j} for j, s in zip(packed.packs[i], samples)]]


def read_new(packed: PackedDataset, i: int) -> list[list[dict]]:
    return packed.__getitems__([i])


def batches(packed: PackedDataset, read, collator, order: list[int]):
    for i in order:
        yield collator(read(packed, i))


def measure(packed, read, collator, order) -> float:
    start = time.perf_counter()
    for _ in batches(packed, read, collator, order):
        pass
    return time.perf_counter() - start


def loader_rows(a) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for hidden in a.hidden:
        for storage in a.storage:
            folder = make_shards(Path(a.work_dir) / f"h{hidden}-{storage}", hidden, storage, a.tokens)
            dataset = ShardDataset(folder, dequantize=False)
            packed = PackedDataset(dataset, list(range(len(dataset))), a.total_seq_len)
            order = list(range(len(packed)))
            new, old = DataCollatorForEagle3(a.total_seq_len), OldCollator(a.total_seq_len)
            pairs = zip(batches(packed, read_new, new, order), batches(packed, read_old, old, order))
            for b_new, b_old in pairs:  # warms the cache too
                assert b_new.keys() == b_old.keys(), (b_new.keys(), b_old.keys())
                assert all(torch.equal(b_new[k].view(torch.uint8) if b_new[k].dtype.itemsize == 1 else b_new[k],
                                       b_old[k].view(torch.uint8) if b_old[k].dtype.itemsize == 1 else b_old[k])
                           for k in b_new), "the new collator's batch differs"  # fmt: skip
            tokens = packed.num_tokens
            per_token = L * hidden * (1 if storage == "fp8_e4m3" else 2) + (4 * L if storage == "fp8_e4m3" else 0)
            paths = {
                "new": (read_new, new),
                "old": (read_old, old),
                "read": (read_new, lambda packs: packs),
                "read_old": (read_old, lambda packs: packs),
            }
            times = {name: [] for name in paths}
            for _ in range(a.repeat):  # interleaved, best of each: other jobs share this machine
                for name, (read, collate) in paths.items():
                    times[name].append(measure(packed, read, collate, order))
            t_new, t_old, read_s, read_old_s = (min(times[k]) for k in paths)
            row = {
                "hidden": hidden,
                "storage": storage,
                "tokens": tokens,
                "batches": len(order),
                "read_tokens_per_s": round(tokens / read_s),
                "old_read_tokens_per_s": round(tokens / read_old_s),
                "old_tokens_per_s": round(tokens / t_old),
                "new_tokens_per_s": round(tokens / t_new),
                "new_over_old": round(t_old / t_new, 2),
                "new_gb_per_s": round(tokens * per_token / t_new / 1e9, 2),
                "workers_for_goal": round(a.goal / (tokens / t_new), 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _writer(folder: str, hidden: int, tokens: int, count: int, ready) -> None:
    from safetensors.torch import save_file

    states = torch.randn(tokens, L, hidden).to(torch.bfloat16)
    for i in range(count):
        path = Path(folder) / f"req-{i}.safetensors"
        lock = Path(f"{path}.lock")
        lock.touch()
        save_file({"hidden_states": states, "input_ids": torch.arange(tokens)}, str(path))
        ready.put(str(path))
    ready.put(None)


def transport_rows(a) -> list[dict]:
    from speculators_hf.online.transport import SpoolTransport

    rows = []
    for hidden in a.hidden:
        folder = Path("/dev/shm") / f"speculators_hf_bench_{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        transport = SpoolTransport(spool_dirs=[folder])
        ctx = mp.get_context("spawn")
        ready = ctx.Queue(maxsize=4)  # at most 4 requests' states in flight, as a bounded server would have
        tokens, count = 2048, 24
        proc = ctx.Process(target=_writer, args=(str(folder), hidden, tokens, count, ready))
        proc.start()
        got, start, first = 0, None, True
        while (path := ready.get()) is not None:
            if first:
                start, first = time.perf_counter(), False  # the writer is up (its start-up is not counted)
                states = transport.load({"hidden_states_path": path})["hidden_states"]
                continue
            states = transport.load({"hidden_states_path": path})["hidden_states"]
            got += states.numel() * states.element_size()
        seconds = time.perf_counter() - start
        proc.join()
        shutil.rmtree(folder, ignore_errors=True)
        row = {
            "hidden": hidden,
            "transport": "spool (/dev/shm, two processes)",
            "requests": count - 1,
            "gb_per_s": round(got / seconds / 1e9, 2),
            "tokens_per_s": round((count - 1) * tokens / seconds),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--storage", nargs="+", default=["bfloat16", "fp8_e4m3"])
    p.add_argument("--tokens", type=int, default=32768, help="tokens of states per shape and storage")
    p.add_argument("--total-seq-len", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--goal", type=float, default=44_000, help="tokens/s one GPU trains (Llama-3.1-8B draft)")
    p.add_argument("--work-dir", default=str(HERE / ".work" / "loader"))
    p.add_argument("--transport-only", action="store_true")
    p.add_argument("--no-transport", action="store_true")
    a = p.parse_args(argv)
    print(f"{platform.machine()}, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}, one thread")
    out = {"loader": [] if a.transport_only else loader_rows(a)}
    if not a.no_transport:
        out["transport"] = transport_rows(a)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
