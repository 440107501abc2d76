"""Packing samples into rows of `total_seq_len` tokens: the old linear-scan first-fit-decreasing vs ours.

    .venv/bin/python benchmarks/packing.py                       # 10k, 100k, 1M samples; old up to 100k
    .venv/bin/python benchmarks/packing.py --sizes 10000 --old-max 10000

Both run in this process on the same random lengths (chat-like: log-uniform 16..4096 aligned tokens, rows of 8192).
Reported per size: seconds of each (best of `--repeat`), the ratio old/new, and the bin count of each (equal: ours
opens the same bins in the same order). `training.data.pack` runs on every rank when a run starts.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time

from speculators_hf.training.data import pack


def linear_first_fit_decreasing(lengths: list[int], total_seq_len: int) -> list[list[int]]:
    """The previous `pack`: a linear scan over the open bins per sample, O(n * bins)."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(total_seq_len - lengths[i])
    return [sorted(b) for b in bins]


def chat_lengths(n: int, seed: int = 0, low: int = 16, high: int = 4096) -> list[int]:
    rng = random.Random(seed)
    return [int(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(n)]


def best_time(fn, lengths: list[int], total_seq_len: int, repeat: int) -> tuple[float, list[list[int]]]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(lengths, total_seq_len)
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--old-max", type=int, default=100_000, help="run the old algorithm only up to this many samples")
    p.add_argument("--total-seq-len", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=3, help="best of N for sizes up to 100k (one run above)")
    a = p.parse_args(argv)
    rows = []
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{'samples':>9} {'bins':>8} {'new s':>8} {'old s':>8} {'old/new':>8}")
    for n in a.sizes:
        lengths = chat_lengths(n)
        repeat = a.repeat if n <= 100_000 else 1
        new_s, new_bins = best_time(pack, lengths, a.total_seq_len, repeat)
        row = {"samples": n, "new_s": round(new_s, 4), "bins": len(new_bins)}
        if n <= a.old_max:
            old_s, old_bins = best_time(linear_first_fit_decreasing, lengths, a.total_seq_len, repeat)
            assert old_bins == new_bins, "the two algorithms disagree"
            row |= {"old_s": round(old_s, 4), "old_over_new": round(old_s / new_s, 1)}
        rows.append(row)
        old = f"{row['old_s']:8.3f} {row['old_over_new']:8.1f}" if "old_s" in row else f"{'-':>8} {'-':>8}"
        print(f"{n:>9} {row['bins']:>8} {new_s:8.3f} {old}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
