"""The largest total_seq_len whose training step fits a fixed memory budget: ours vs `speculators train` (0.9.0).

    .venv/bin/python benchmarks/memory_budget.py                       # CPU, vocab32k shape (Vd = 32,000), 2 GiB
    .venv/bin/python benchmarks/memory_budget.py --gpu --budget-mib 40960   # GPU, Llama-3.1-8B draft shapes

For each trainer, total_seq_len doubles from `--start` while the step's memory stays within `--budget-mib`, then one
midpoint between the last length that fits and the first that does not is tried. Each point is one short
`train_throughput.py` pair run of that trainer alone (1 warm-up step, 1 measured step, + the profiled step on CPU),
same data and shapes for both. Memory: CPU the last step's allocator-level peak above what was live when it began
(`_spec_runner.LastStepAllocations`); CUDA `max_memory_allocated` since training started (weights and optimizer
state included). Reported: each trainer's largest fitting total_seq_len, and every measured point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import train_throughput as TP  # noqa: E402


def memory_of(side: dict) -> float | None:
    return side.get("step_alloc_peak_mib") or side.get("peak_mem_mib")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--shape", choices=sorted(C.SHAPES), default=None, help="default: vocab32k (CPU), llama8b (--gpu)")
    p.add_argument("--budget-mib", type=float, default=None, help="default: 2048 (CPU), 40960 (--gpu)")
    p.add_argument("--start", type=int, default=None, help="first total_seq_len (default: 512 CPU, 8192 GPU)")
    p.add_argument("--max-len", type=int, default=None, help="stop doubling here (default: 16384 CPU, 65536 GPU)")
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--baseline-python", default=C.DEFAULT_BASELINE_PY)
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK_DIR)
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=None, help="seconds per trainer run")
    a = p.parse_args(argv)
    device = "cuda" if a.gpu else "cpu"
    a.shape = a.shape or ("llama8b" if a.gpu else "vocab32k")
    a.budget_mib = a.budget_mib or (40960.0 if a.gpu else 2048.0)
    a.start = a.start or (8192 if a.gpu else 512)
    a.max_len = a.max_len or (65536 if a.gpu else 16384)
    work = a.work_dir.resolve()
    info = C.machine_info(device)
    info["baseline"] = C.baseline_versions(a.baseline_python)
    info["load_before"] = C.uptime()
    points: dict[str, dict[int, dict]] = {"baseline": {}, "ours": {}}

    def measure(side: str, seq: int) -> float | None:
        prep = C.prepare_synthetic(work, a.shape, n_samples=4 if a.gpu else 8, sample_len=seq // 4, device=device,
                                   baseline_python=a.baseline_python, unique=2)  # fmt: skip
        pair_args = argparse.Namespace(
            warmup=1, steps=1, num_workers=0, only=side, baseline_attn="sdpa", baseline_loss="eager",
            ours_attn=None, baseline_python=a.baseline_python, timeout=a.timeout,
        )  # fmt: skip
        res = TP.run_pair(pair_args, prep, work / "budget", device, seq, a.ttt_steps, f"mb-{a.shape}-{device}-S{seq}")
        stats = res.get(side, {})
        points[side][seq] = {"mib": memory_of(stats), "median_step_ms": stats.get("median_step_ms"),
                             "error": stats.get("error")}  # fmt: skip
        C.log(f"{side} S={seq}: {points[side][seq]}")
        return memory_of(stats)

    def fits(side: str, seq: int) -> bool:
        mib = measure(side, seq)
        return mib is not None and mib <= a.budget_mib

    largest = {}
    for side in ("baseline", "ours"):
        seq, best = a.start, None
        while seq <= a.max_len and fits(side, seq):
            best, seq = seq, seq * 2
        if best is not None and seq <= a.max_len:  # one midpoint between the last fit and the first miss
            mid = (best + seq) // 2 // 4 * 4
            if fits(side, mid):
                best = mid
        largest[side] = best
    info["load_after"] = C.uptime()

    print(f"\n# Largest total_seq_len within {a.budget_mib:.0f} MiB, {a.shape}, {device}, K={a.ttt_steps}")
    rows = [[side, largest[side] or f"< {a.start}"] for side in ("baseline", "ours")]
    rows.append(["ratio ours / baseline", C.ratio(largest["ours"], largest["baseline"])])
    print(C.markdown_table(["trainer", "largest total_seq_len"], rows))
    seqs = sorted(set(points["baseline"]) | set(points["ours"]))
    table = []
    for seq in seqs:
        b, o = points["baseline"].get(seq, {}), points["ours"].get(seq, {})
        table.append([seq, b.get("mib"), o.get("mib"), C.ratio(o.get("mib"), b.get("mib"))])
    print(C.markdown_table(["total_seq_len", "baseline MiB", "ours MiB", "ours / baseline"], table))
    print(f"load before: {info['load_before']}\nload after:  {info['load_after']}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    C.save_results(a.output or work / f"memory-budget-{a.shape}-{device}.json",
                   {"benchmark": "memory_budget", "machine": info, "settings": settings, "largest": largest,
                    "points": points})  # fmt: skip


if __name__ == "__main__":
    main()
