"""Run `speculators train` (vllm-project/speculators 0.9.0) with measurement hooks; use the *baseline's* interpreter.

    /path/to/venv-spec/bin/python _spec_runner.py CONFIG.json

CONFIG: {"argv": [... speculators train flags ...], "device": "cpu" | "cuda", "max_steps": N,
         "result": "out.json", "save_final": "dir" | null}

Runtime patches only (speculators' code is not modified or copied):
* its trainer moves the model and batches with `.to(local_rank)` and calls `torch.accelerator.synchronize()`; on CPU
  `local_rank` is replaced by "cpu" and the synchronize is a no-op;
* `run_training` is replaced by a loop of its own `train_epoch` until `max_steps` (no per-epoch checkpoint or
  validation pass, which would be timed otherwise), then an optional `save_pretrained` of the final draft;
* each optimizer step's end time (after a device synchronize) and each batch's real-token count are recorded, and
  peak memory (CUDA: max allocated since training started; CPU: peak RSS of the process during training, and with
  `BENCH_PROBE_LAST_STEP=1` the allocator-level peak of the last step, `LastStepAllocations`).
"""

import json
import os
import sys
import threading
import time


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.start, self._stop = interval, 0.0, 0.0, threading.Event()

    def __enter__(self):
        self.start = self.peak = rss_mib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


class LastStepAllocations:
    """CPU: the allocator-level peak of the last training step (`BENCH_PROBE_LAST_STEP=1`).

    RSS includes whatever the C allocator keeps cached, so on CPU the last step also runs under the torch profiler
    with memory events, from the end of step `n - 1` to the end of step `n`: the peak of its running "Total
    Allocated" is the memory the step needs above what was live when it began (activations, gradients, temporaries).
    That step is profiled, so its time is left out of the timing (`profiled_last_step` in the result).
    """

    def __init__(self, last_step: int):
        self.last_step, self.prof, self.peak_mib = last_step, None, None

    def on_step_end(self, steps_done: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        if steps_done == self.last_step - 1:
            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.start()
        elif steps_done == self.last_step and self.prof is not None:
            import tempfile

            self.prof.stop()
            with tempfile.TemporaryDirectory() as tmp:
                self.prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
                with open(os.path.join(tmp, "trace.json")) as f:
                    events = json.load(f)["traceEvents"]
            totals = [e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]"]
            self.peak_mib = max(totals, default=0) / 2**20
            self.prof = None

    def record(self, record: dict) -> None:
        if self.peak_mib is not None:
            record["step_alloc_peak_mib"] = self.peak_mib
            record["profiled_last_step"] = True


def last_step_probe(device: str, max_steps: int) -> "LastStepAllocations | None":
    return LastStepAllocations(max_steps) if device == "cpu" and os.environ.get("BENCH_PROBE_LAST_STEP") else None


def record_peak_memory(record: dict, device: str, rss: RssSampler, probe: "LastStepAllocations | None") -> None:
    """The same memory fields for both runners: CUDA max allocated, or CPU peak RSS (+ the last step's peak)."""
    import torch

    if device.startswith("cuda"):
        record["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        record["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
    else:
        record["peak_mem_mib"] = rss.peak - rss.start
        record["peak_mem_kind"] = "peak RSS during training minus RSS at its start"
        record["peak_rss_mib"] = rss.peak
    if probe is not None:
        probe.record(record)


class _CountingLoader:
    """Wraps the train DataLoader: records each batch's real (non-padding) token count."""

    def __init__(self, loader, sink):
        self._loader, self._sink = loader, sink

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __iter__(self):
        for batch in self._loader:
            self._sink.append(int((batch["document_ids"] != -1).sum()))
            yield batch


def main() -> None:
    cfg = json.loads(open(sys.argv[1]).read())
    device = cfg["device"]
    import torch

    if device == "cpu":
        torch.accelerator.synchronize = lambda *a, **k: None  # the trainer's profiler assumes an accelerator

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    import speculators.train.cli as spec_cli
    import speculators.train.trainer as spec_trainer
    from speculators.train.config import TrainConfig

    spec_trainer.get_local_rank = lambda: device if device == "cpu" else 0

    record = {"step_end_s": [], "tokens_per_step": [], "loss": []}
    tokens: list[int] = []
    orig_init = spec_trainer.Trainer.__init__

    def init(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        self.train_loader = _CountingLoader(self.train_loader, tokens)

    orig_sched_step = spec_trainer.Trainer._schedulers_step

    max_steps = int(cfg["max_steps"])
    probe = last_step_probe(device, max_steps)

    def sched_step(self):
        orig_sched_step(self)
        sync()
        record["step_end_s"].append(time.perf_counter())
        if probe is not None:
            probe.on_step_end(len(record["step_end_s"]))

    def run_training(self):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with RssSampler() as rss:
            epoch = 0
            while self.global_step < max_steps:
                self.train_epoch(epoch)
                epoch += 1
        record["train_wall_s"] = time.perf_counter() - t0
        record_peak_memory(record, device, rss, probe)
        if cfg.get("save_final"):
            self.model.save_pretrained(cfg["save_final"])

    spec_trainer.Trainer.__init__ = init
    spec_trainer.Trainer._schedulers_step = sched_step
    spec_trainer.Trainer.run_training = run_training

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    spec_cli.main(TrainConfig.resolve(cfg["argv"]))

    n = len(record["step_end_s"])
    record["tokens_per_step"] = tokens[:n]
    record["trainer"] = "speculators 0.9.0"
    record["threads"] = torch.get_num_threads()
    with open(cfg["result"], "w") as f:
        json.dump(record, f)


if __name__ == "__main__":  # required: speculators' DataLoader workers use the "spawn" start method
    main()
