"""Scaling: training step time vs total_seq_len and vs TTT steps K, ours and `speculators train` (0.9.0).

    .venv/bin/python benchmarks/scaling.py                 # CPU: total_seq_len 256..2048 (K=3), K=1,3,5,7 (512)
    .venv/bin/python benchmarks/scaling.py --gpu           # GPU: 2k, 4k, 8k, 16k (K=3) and K=1,3,5,7 at 8k

Each point is one `train_throughput.py` pair (both trainers back to back, same synthetic data and shapes, samples of
total_seq_len/4 tokens packed 4 per row). The issue asks for 2k-16k; on a 2-core CPU those take minutes per step, so
the CPU default is 256-2048 (the same 8x range) -- pass `--seq-lens` to change it. Reported: median step ms of each
trainer, the ratio, and the growth factor per doubling (1.0 = linear in tokens, ~2 at a doubling = quadratic).
With dense masks, attention work is quadratic in the row length and grows with K twice over: step k attends to
(k+1)*T keys, so the K steps cost ~T^2 * K(K+1)/2 in attention plus ~T*K in everything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import train_throughput as TP  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--shape", choices=sorted(C.SHAPES), default=None)
    p.add_argument("--seq-lens", type=int, nargs="+", default=None)
    p.add_argument("--ttt-list", type=int, nargs="+", default=[1, 3, 5, 7])
    p.add_argument("--ttt-seq-len", type=int, default=None, help="total_seq_len of the K sweep")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--baseline-python", default=C.DEFAULT_BASELINE_PY)
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK_DIR)
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=None)
    a = p.parse_args(argv)
    device = "cuda" if a.gpu else "cpu"
    a.shape = a.shape or ("llama8b" if a.gpu else "tiny")
    a.seq_lens = a.seq_lens or ([2048, 4096, 8192, 16384] if a.gpu else [256, 512, 1024, 2048])
    a.ttt_seq_len = a.ttt_seq_len or (8192 if a.gpu else 512)
    a.steps = a.steps or (10 if a.gpu else 4)
    a.warmup = a.warmup if a.warmup is not None else (3 if a.gpu else 1)
    pair_args = argparse.Namespace(
        warmup=a.warmup, steps=a.steps, num_workers=4 if a.gpu else 0, only=None, baseline_attn="sdpa",
        baseline_loss="eager", ours_attn=None, baseline_python=a.baseline_python, timeout=a.timeout,
    )  # fmt: skip
    work = a.work_dir.resolve()
    info = C.machine_info(device)
    info["baseline"] = C.baseline_versions(a.baseline_python)
    info["load_before"] = C.uptime()
    points = []
    configs = [(s, 3) for s in a.seq_lens] + [(a.ttt_seq_len, k) for k in a.ttt_list if (a.ttt_seq_len, k) not in
                                                [(s, 3) for s in a.seq_lens]]  # fmt: skip
    for seq, k in configs:
        prep = C.prepare_synthetic(work, a.shape, n_samples=16, sample_len=seq // 4, device=device,
                                   baseline_python=a.baseline_python, unique=4 if a.gpu else None)  # fmt: skip
        res = TP.run_pair(pair_args, prep, work / "scaling", device, seq, k, f"sc-{a.shape}-{device}-S{seq}-K{k}")
        res["load"] = C.uptime()
        points.append(res)
        b, o = res.get("baseline", {}), res.get("ours", {})
        C.log(f"S={seq} K={k}: baseline {b.get('median_step_ms')} ms, ours {o.get('median_step_ms')} ms")
    info["load_after"] = C.uptime()

    def table(select, key):
        rows, prev = [], None
        for r in sorted((r for r in points if select(r)), key=lambda r: r[key]):
            b, o = r.get("baseline", {}), r.get("ours", {})
            bm, om = b.get("median_step_ms"), o.get("median_step_ms")
            growth = (C.ratio(bm, prev[0]), C.ratio(om, prev[1])) if prev else (None, None)
            bmem, omem = (s.get("step_alloc_peak_mib") or s.get("peak_mem_mib") for s in (b, o))
            rows.append([r[key], bm, om, C.ratio(om, bm), growth[0], growth[1], bmem, omem, C.ratio(omem, bmem)])
            prev = (bm, om)
        return rows

    # memory: CUDA max allocated; CPU the last step's allocator-level peak (see _spec_runner.LastStepAllocations)
    hdr = ["baseline ms", "ours ms", "ours/baseline", "baseline growth", "ours growth", "baseline MiB", "ours MiB",
           "ours/baseline MiB"]  # fmt: skip
    print(f"\n# Step time vs total_seq_len (K=3), shape={a.shape}, device={device}")
    print(C.markdown_table(["total_seq_len"] + hdr, table(lambda r: r["ttt_steps"] == 3 and r["total_seq_len"]
                                                           in a.seq_lens, "total_seq_len")))  # fmt: skip
    print(f"\n# Step time vs TTT steps K (total_seq_len={a.ttt_seq_len})")
    print(C.markdown_table(["K"] + hdr, table(lambda r: r["total_seq_len"] == a.ttt_seq_len and r["ttt_steps"]
                                              in a.ttt_list, "ttt_steps")))  # fmt: skip
    print(f"load before: {info['load_before']}\nload after:  {info['load_after']}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    C.save_results(a.output or work / f"scaling-{a.shape}-{device}.json",
                   {"benchmark": "scaling", "machine": info, "settings": settings, "points": points})  # fmt: skip


if __name__ == "__main__":
    main()
