"""Where our trainer's step time goes: torch profiler over a few training steps of `Eagle3Trainer`, plus the share of
each of our own functions (mask construction, the draft forward, the per-step KL/metrics, backward, optimizer).

    .venv/bin/python benchmarks/profile_step.py                     # CPU, tiny shapes, total_seq_len 2048
    .venv/bin/python benchmarks/profile_step.py --shape small --total-seq-len 4096
    .venv/bin/python benchmarks/profile_step.py --gpu               # Llama-3.1-8B draft shapes on CUDA

Uses the same synthetic data as `train_throughput.py` (written on first use). Prints the profiler's top operators by
self time and the wall-clock share of each phase, measured by wrapping our functions (a device synchronize around
each, so the shares are exact on GPU too, at the price of a slightly slower step).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--shape", choices=sorted(C.SHAPES), default=None)
    p.add_argument("--total-seq-len", type=int, default=None)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--baseline-python", default=C.DEFAULT_BASELINE_PY)
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK_DIR)
    a = p.parse_args(argv)
    device = "cuda" if a.gpu else "cpu"
    a.shape = a.shape or ("llama8b" if a.gpu else "tiny")
    a.total_seq_len = a.total_seq_len or (8192 if a.gpu else 2048)
    work = a.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    prep = C.prepare_synthetic(work, a.shape, n_samples=32, sample_len=a.total_seq_len // 4, device=device,
                               baseline_python=a.baseline_python, unique=8 if a.gpu else None)  # fmt: skip

    import torch
    from torch.profiler import ProfilerActivity, profile

    import speculators_hf.modeling.losses as losses_mod
    import speculators_hf.training.trainer as trainer_mod
    from speculators_hf.training import Eagle3ModelArguments, Eagle3Trainer, Eagle3TrainingArguments
    from speculators_hf.training.setup import build_datasets, build_draft

    cfg = C.ours_config(verifier=prep["verifier"], our_data=prep["our_data"], out_dir=work / "profile",
                        shape=prep["shape"], total_seq_len=a.total_seq_len, ttt_steps=a.ttt_steps, max_steps=100,
                        lr=1e-4, warmup_steps=1, device=device)  # fmt: skip
    model_args = Eagle3ModelArguments(**cfg["model_args"])
    args = Eagle3TrainingArguments(**cfg["training_args"])
    train_dataset, _, layer_ids = build_datasets(model_args, args)
    model = build_draft(model_args, train_dataset, layer_ids)
    trainer = Eagle3Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=None)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    shares: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            sync()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            shares[name] += time.perf_counter() - t
            return out

        return wrapper

    # Wrap our functions where the trainer module looks them up.
    trainer.model.forward = timed("draft forward (Eagle3DraftModel.forward)", trainer.model.forward)
    for name in ("ttt_attention_mask", "ttt_block_mask", "step_statistics", "add_uniform_noise"):
        setattr(trainer_mod, name, timed(f"{name} (modeling/losses.py)", getattr(trainer_mod, name)))
    # the fused heads + KL run inside the draft's forward (its last call per batch), so they are part of its share too
    losses_mod.fused_ttt_kl = timed("fused_ttt_kl, inside forward (modeling/losses.py)", losses_mod.fused_ttt_kl)
    trainer._record = timed("Eagle3Trainer._record (per-process metric sums)", trainer._record)

    # One training step by hand, as Trainer's inner loop does it (fetch, training_step, clip, optimizer step).
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1
    loader = trainer.get_train_dataloader()
    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    model.train()
    it = iter(loader)

    def one_step():
        t = time.perf_counter()
        batch = next(it)
        shares["data fetch + collate"] += time.perf_counter() - t
        t = time.perf_counter()
        loss = trainer.training_step(model, batch)  # forward + loss + backward
        sync()
        shares["training_step (forward + loss + backward)"] += time.perf_counter() - t
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        sync()
        shares["clip + optimizer"] += time.perf_counter() - t
        return loss

    for _ in range(2):
        one_step()
    shares.clear()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(a.steps):
            one_step()
    wall = time.perf_counter() - t0
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))
    step = wall / a.steps
    print(f"\n# Our trainer, shape={a.shape}, total_seq_len={a.total_seq_len}, K={a.ttt_steps}, device={device}: "
          f"{step * 1000:.1f} ms/step under the profiler ({C.uptime()})")  # fmt: skip
    total = (
        shares["data fetch + collate"]
        + shares["training_step (forward + loss + backward)"]
        + shares["clip + optimizer"]
    )
    rows = [
        [name, sec / a.steps * 1000, 100 * sec / total] for name, sec in sorted(shares.items(), key=lambda x: -x[1])
    ]
    print(C.markdown_table(["phase / function (nested)", "ms per step", "% of step"], rows))


if __name__ == "__main__":
    main()
