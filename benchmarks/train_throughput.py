"""Training throughput (tokens/s) and peak memory: our trainer vs `speculators train` (vllm-project/speculators 0.9.0).

    .venv/bin/python benchmarks/train_throughput.py                 # CPU, tiny shapes (the default)
    .venv/bin/python benchmarks/train_throughput.py --shape small   # CPU, a mid-size draft
    .venv/bin/python benchmarks/train_throughput.py --gpu           # one H100/H200: Llama-3.1-8B draft shapes, < 8 min

Both trainers run back to back in this one job, as fresh subprocesses, on the same synthetic hidden states written in
both offline layouts, with the same draft (1 layer, no Eagle-3.1 norms, frozen embedding and lm_head, full attention in
the draft layer), K=3 TTT steps, the same total sequence length (whole samples packed per row), AdamW with the same
LR schedule, and the same number of steps; the first `--warmup` steps are not measured. Step time = time between
consecutive optimizer-step ends (data fetch + forward + backward + optimizer), after a device synchronize.
Peak memory: CUDA `max_memory_allocated` since training started; CPU: peak RSS during training minus RSS at its start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="CUDA run at Llama-3.1-8B draft shapes (synthetic states).")
    p.add_argument("--shape", choices=sorted(C.SHAPES), default=None, help="default: tiny (CPU), llama8b (--gpu)")
    p.add_argument("--total-seq-len", type=int, default=None, help="default: 2048 (CPU), 8192 (--gpu)")
    p.add_argument("--sample-len", type=int, default=None, help="tokens per sample (default: total_seq_len / 4)")
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="measured steps (default: 15 CPU, 30 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured first steps (default: 3 CPU, 8 GPU)")
    p.add_argument("--num-samples", type=int, default=None, help="distinct samples (default: 32; reused by epochs)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers, both (default: 0 CPU, 4 GPU)")
    p.add_argument("--baseline-attn", default=None, help="speculators --draft-attn-impl (default: sdpa)")
    p.add_argument("--baseline-loss", default="eager", help="speculators --loss-implementation (fused needs Triton)")
    p.add_argument("--ours-attn", default=None, help="override our attention (default: flex on CUDA, sdpa on CPU)")
    p.add_argument("--only", choices=["ours", "baseline"], default=None, help="run one side only (debugging)")
    p.add_argument("--baseline-python", default=C.DEFAULT_BASELINE_PY)
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK_DIR, help="data, checkpoints and logs")
    p.add_argument("--output", type=Path, default=None, help="results JSON (default: <work-dir>/throughput-*.json)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per trainer run")
    return p.parse_args(argv)


def run_pair(a, prep: dict, out_dir: Path, device: str, total_seq_len: int, ttt_steps: int, tag: str) -> dict:
    """Both trainers on the same data and shapes; returns their raw results and steady-state stats."""
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = device == "cpu"  # CPU: one more step, run under the memory profiler (allocator-level step peak)
    max_steps = a.warmup + a.steps + 1 + probe  # step times are differences, so one more step than measured
    env = {"BENCH_PROBE_LAST_STEP": "1"} if probe else None
    common = dict(shape=prep["shape"], total_seq_len=total_seq_len, ttt_steps=ttt_steps, max_steps=max_steps,
                  lr=1e-4, warmup_steps=1, device=device, num_workers=a.num_workers)  # fmt: skip
    out = {"total_seq_len": total_seq_len, "ttt_steps": ttt_steps}
    if a.only != "ours":
        argv = C.baseline_argv(verifier=prep["verifier"], spec_data=prep["spec_data"], out_dir=out_dir,
                               train_data_ratio=prep["train_data_ratio"], attn=a.baseline_attn,
                               loss_impl=a.baseline_loss, **common)  # fmt: skip
        res = C.run_baseline(
            argv, out_dir, f"{tag}-baseline", device, max_steps, a.baseline_python, timeout=a.timeout, env=env
        )
        out["baseline_raw"], out["baseline"] = res, C.steady_stats(res, a.warmup)
    if a.only != "baseline":
        cfg = C.ours_config(verifier=prep["verifier"], our_data=prep["our_data"], out_dir=out_dir, **common)
        if a.ours_attn:
            cfg["attn_implementation"] = a.ours_attn
        res = C.run_ours(cfg, out_dir, f"{tag}-ours", timeout=a.timeout, env=env)
        out["ours_raw"], out["ours"] = res, C.steady_stats(res, a.warmup)
    b, o = out.get("baseline", {}), out.get("ours", {})
    out["tokens_per_s_ratio"] = C.ratio(o.get("tokens_per_s"), b.get("tokens_per_s"))
    out["peak_mem_ratio"] = C.ratio(o.get("peak_mem_mib"), b.get("peak_mem_mib"))
    out["step_alloc_peak_ratio"] = C.ratio(o.get("step_alloc_peak_mib"), b.get("step_alloc_peak_mib"))
    return out


def defaults(a):
    a.shape = a.shape or ("llama8b" if a.gpu else "tiny")
    a.total_seq_len = a.total_seq_len or (8192 if a.gpu else 2048)
    a.sample_len = a.sample_len or a.total_seq_len // 4
    a.steps = a.steps or (30 if a.gpu else 15)
    a.warmup = a.warmup if a.warmup is not None else (8 if a.gpu else 3)
    a.num_samples = a.num_samples or 32
    a.num_workers = a.num_workers if a.num_workers is not None else (4 if a.gpu else 0)
    a.baseline_attn = a.baseline_attn or "sdpa"
    a.timeout = a.timeout or (300 if a.gpu else None)  # keeps --gpu under 8 min even if one side hangs
    return a


def main(argv=None) -> dict:
    a = defaults(parse_args(argv))
    device = "cuda" if a.gpu else "cpu"
    if a.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device visible.")
    work = a.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    info = C.machine_info(device)
    info["baseline"] = C.baseline_versions(a.baseline_python)
    info["load_before"] = C.uptime()
    C.log(f"machine: {info}")
    prep = C.prepare_synthetic(work, a.shape, n_samples=a.num_samples, sample_len=a.sample_len, device=device,
                               baseline_python=a.baseline_python, unique=8 if a.gpu else None)  # fmt: skip
    res = run_pair(a, prep, work / "throughput", device, a.total_seq_len, a.ttt_steps, f"tp-{a.shape}-{device}")
    info["load_after"] = C.uptime()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    result = {"benchmark": "train_throughput", "machine": info, "settings": settings, "result": res}

    b, o = res.get("baseline", {}), res.get("ours", {})
    rows = []
    for name, s in (("speculators 0.9.0", b), ("speculators_hf (ours)", o)):
        if "error" in s or not s:
            rows.append([name, s.get("error", "not run"), "-", "-", "-", "-", "-"])
        else:
            rows.append([name, s["tokens_per_s"], s["median_step_ms"], s["min_step_ms"], s["tokens_per_step"],
                         s["peak_mem_mib"], s.get("step_alloc_peak_mib")])  # fmt: skip
    min_ratio = C.ratio(b.get("min_step_ms"), o.get("min_step_ms"))  # speed ratio from the fastest steps
    rows.append(["ratio ours / baseline", res["tokens_per_s_ratio"], None, min_ratio, None, res["peak_mem_ratio"],
                 res["step_alloc_peak_ratio"]])  # fmt: skip
    print()
    print(f"# Training throughput, shape={a.shape}, device={device}, total_seq_len={a.total_seq_len}, "
          f"K={a.ttt_steps}, {a.steps} measured steps after {a.warmup}")  # fmt: skip
    print(
        C.markdown_table(
            ["trainer", "tokens/s", "median step ms", "min step ms", "tokens/step", "peak mem MiB", "step alloc MiB"],
            rows,
        )
    )
    flops = C.train_flops_per_token(prep["shape"], a.sample_len, a.ttt_steps)  # lm_head frozen in both runs
    peak = C.peak_tflops(info.get("gpu"))
    mfu = {name: s["tokens_per_s"] * flops / (peak * 1e12) for name, s in (("baseline", b), ("ours", o))
           if peak and s.get("tokens_per_s")}  # fmt: skip
    result["model_flops_per_token"], result["mfu"] = flops, mfu
    print(f"model FLOPs per token: {flops / 1e9:.3g} GFLOP"
          + "".join(f"; MFU {name} {v:.1%} of {peak:.0f} TFLOP/s" for name, v in mfu.items()))  # fmt: skip
    print(f"load before: {info['load_before']}\nload after:  {info['load_after']}")
    for side in ("baseline_raw", "ours_raw"):
        if "error" in res.get(side, {}):
            print(f"\n{side} failed: {res[side]['error']} (log {res[side]['log']}):\n{res[side]['log_tail'][-1500:]}")
    out = a.output or work / f"throughput-{a.shape}-{device}.json"
    C.save_results(out, result)
    return result


if __name__ == "__main__":
    main()
