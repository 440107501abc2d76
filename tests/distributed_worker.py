"""What tests/test_distributed.py launches on every process: `examples/train_eagle3.py` itself, plus a report of what
the test checks in `<save-path>/report-<process index>.json`.

    accelerate launch --config_file ... tests/distributed_worker.py [--fsdp-on-cpu] [--stop-at-step N] <flags>

The report holds the process's ranks, what accelerate chose, the checkpoint it resumed from, the log history, the
collectives made by the trainer's metric code (`_record`, `log`), which modules FSDP sharded and how large each
process's piece of every parameter is, and how far each frozen parameter (verifier head, embedding) moved in training.
With `DISTRIBUTED_TEST_PIDS` set, the process first writes its pid there (the test kills what is left on failure).
With `DISTRIBUTED_TEST_EXITS` set, the process writes there, at interpreter exit, whether it still held its process
group (`in group`) or had left it (`left`): torch's finalizers tearing a gloo group down can abort a rank after a clean
run. With `DISTRIBUTED_TEST_WATCHDOG=S`, a process still running after S seconds prints every thread's stack and exits
(a hang then shows where it hung in the launch's output, instead of only running out the test's time).

`--stop-at-step N`: the last process stops (sleeps) at the end of optimizer step N, after writing its pid to
`<save-path>/stopped-<process index>`, for the test to kill it there.

`--fsdp-on-cpu`: accelerate 1.15 enables FSDP only on accelerators; on CPU processes it runs an FSDP config as DDP
(`MULTI_CPU`, recorded as `accelerate_chose`). This flag then switches accelerate's state to FSDP (before the Trainer
prepares the model), so that the run goes through accelerate's FSDP2 path: `fully_shard` over gloo, sharded
checkpoints, the full state dict of the saved drafts.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_eagle3.py"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "gather")
report: dict = {"accelerate_chose": None, "resumed_from": None, "calls": {}}
report.update(metric_collectives=0, metric_seconds=0.0)


def fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if report["accelerate_chose"] is None:
            report["accelerate_chose"] = str(self.distributed_type)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched


def count_metric_collectives() -> None:
    """Count the collectives (and time) spent inside `Eagle3Trainer._record` and `Eagle3Trainer.log`."""
    from speculators_hf.training import Eagle3Trainer

    inside = [False]
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _original=original, **kwargs):
            report["metric_collectives"] += inside[0]
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    for name in ("_record", "log"):
        original = getattr(Eagle3Trainer, name)

        def timed(self, *args, _original=original, _name=name, **kwargs):
            inside[0], start = True, time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                inside[0] = False
                report["metric_seconds"] += time.perf_counter() - start
                report["calls"][_name] = report["calls"].get(_name, 0) + 1

        setattr(Eagle3Trainer, name, timed)


def snapshot_frozen() -> dict[str, torch.Tensor]:
    """The frozen parameters of the draft `train` builds, as built (before any process group touches them)."""
    import speculators_hf.training.stage as stage

    frozen: dict[str, torch.Tensor] = {}
    build = stage.build_draft

    def building(*args, **kwargs):
        model = build(*args, **kwargs)
        frozen.update({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad})
        return model

    stage.build_draft = building
    return frozen


def record_resume_and_stop(step: int | None) -> None:
    """Record the checkpoint `train` resumes from; with `step`, the last process sleeps at the end of that step."""
    from transformers import TrainerCallback

    from speculators_hf.training import Eagle3Trainer

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step and args.process_index == args.world_size - 1:
                (Path(args.output_dir) / f"stopped-{args.process_index}").write_text(str(os.getpid()))
                time.sleep(3600)

    train = Eagle3Trainer.train

    def train_and_record(self, *args, resume_from_checkpoint=None, **kwargs):
        report["resumed_from"] = resume_from_checkpoint
        if self.args.should_save:  # this worker's own files are the run's too: a rerun in the folder accepts them
            world = range(self.args.world_size)
            self.claim.track(*(f"report-{i}.json" for i in world), *(f"stopped-{i}" for i in world))
        if step is not None:
            self.add_callback(Stop())
        return train(self, *args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    Eagle3Trainer.train = train_and_record


def write_report(trainer, frozen: dict[str, torch.Tensor]) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    model, acc, args = trainer.model, trainer.accelerator, trainer.args
    moved, pieces = {}, {}
    for name, p in model.named_parameters():  # the same order on every process: full_tensor() is a collective
        local = p.to_local() if isinstance(p, DTensor) else p
        pieces[name] = [local.numel(), p.numel()]
        if name in frozen:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            moved[name] = float((full.detach().cpu().float() - frozen[name].float()).abs().max())
    report.update(
        process_index=acc.process_index,
        local_process_index=acc.local_process_index,
        num_processes=acc.num_processes,
        should_save=args.should_save,
        distributed_type=str(acc.distributed_type),
        fsdp_units=[name for name, m in model.named_modules() if isinstance(m, FSDPModule)],
        parameter_pieces=pieces,
        frozen_moved=moved,
        log_history=trainer.state.log_history,
    )
    path = Path(args.output_dir) / f"report-{acc.process_index}.json"
    path.write_text(json.dumps(report, indent=1))


def main() -> None:
    if os.environ.get("DISTRIBUTED_TEST_PIDS"):
        Path(os.environ["DISTRIBUTED_TEST_PIDS"], str(os.getpid())).touch()
    if os.environ.get("DISTRIBUTED_TEST_EXITS"):
        exits = Path(os.environ["DISTRIBUTED_TEST_EXITS"], str(os.getpid()))
        atexit.register(lambda: exits.write_text("in group" if dist.is_initialized() else "left"))
    if os.environ.get("DISTRIBUTED_TEST_WATCHDOG"):
        faulthandler.dump_traceback_later(float(os.environ["DISTRIBUTED_TEST_WATCHDOG"]), exit=True)
    argv = sys.argv[1:]
    if "--fsdp-on-cpu" in argv[:3]:
        argv.remove("--fsdp-on-cpu")
        fsdp_on_cpu()
    step = None
    if "--stop-at-step" in argv[:3]:
        i = argv.index("--stop-at-step")
        step = int(argv.pop(i + 1))
        argv.pop(i)
    record_resume_and_stop(step)
    count_metric_collectives()
    frozen = snapshot_frozen()

    import speculators_hf.training as training

    train = training.train

    def train_and_report(model_args, args):
        trainer = train(model_args, args)
        write_report(trainer, frozen)
        return trainer

    training.train = train_and_report  # what the example imports
    sys.argv = [str(EXAMPLE), *argv]
    runpy.run_path(str(EXAMPLE), run_name="__main__")


if __name__ == "__main__":
    main()
