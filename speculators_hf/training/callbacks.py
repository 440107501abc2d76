"""What the training loop does beside the loss, as `TrainerCallback`s: how long steps wait for data (and what fetching
online hidden states cost), the guard that stops a run at the first non-finite loss or gradient or past
`--max-skipped-fraction`, and the loadable draft of every epoch.
"""

from __future__ import annotations

import math
import time

import torch
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback

from ..online.dataset import FETCH_STATS_COLUMNS
from ..utils import RunFailed, get_logger

logger = get_logger(__name__)


class DataFeed(TrainerCallback):
    """How long each optimizer step waited for its batches (`data_wait_fraction` of the logging interval), and the
    online fetch statistics its batches carried (`hidden_states_*`), per interval and for the whole run.

    The wait is the time from the end of the loop's own work (the previous step, its logging, evaluation and saving,
    each ending in a callback) to the start of the next step: what fetching the step's batches took.
    """

    def __init__(self):
        self.wait, self.since, self.mark = 0.0, None, None
        self.interval: torch.Tensor | None = None  # fetch statistics summed since the last log (peak: max)
        self.total: torch.Tensor | None = None  # ... over the whole run

    def _mark(self, *args, **kwargs) -> None:
        self.mark = time.perf_counter()

    on_train_begin = on_epoch_begin = on_step_end = on_log = on_evaluate = on_save = _mark

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if self.mark is not None:
            self.wait += time.perf_counter() - self.mark
            self.since = self.mark if self.since is None else self.since
        self.mark = None

    def add(self, stats: torch.Tensor) -> None:
        """One micro-batch's per-sample fetch statistics `[samples, len(FETCH_STATS_COLUMNS)]`."""
        summed = torch.cat([stats[:, :-1].sum(0), stats[:, -1:].max(0).values])  # the last column is a peak
        for name in ("interval", "total"):
            old = getattr(self, name)
            new = summed if old is None else torch.cat([old[:-1] + summed[:-1], old[-1:].maximum(summed[-1:])])
            setattr(self, name, new)

    def interval_logs(self, accelerator) -> dict[str, float]:
        """The interval's `data_wait_fraction` and fetch metrics (every process calls it: they are reduced)."""
        logs = {}
        if self.since is not None:
            logs["data_wait_fraction"] = self.wait / max(time.perf_counter() - self.since, 1e-9)
            self.wait, self.since = 0.0, None
        if self.interval is not None:
            stats = self.reduced(self.interval, accelerator)
            self.interval = None
            logs["hidden_states_fetched"] = stats["fetched"]
            logs["hidden_states_cache_hits"] = stats["cache_hits"]
            logs["hidden_states_skipped"] = stats["skipped"]
            logs["hidden_states_retries"] = stats["retries"]
            logs["hidden_states_fetch_seconds"] = stats["fetch_seconds"] / max(stats["fetched"], 1.0)
            logs["hidden_states_disk_peak_mb"] = stats["spool_bytes"] / 2**20
        return logs

    @staticmethod
    def reduced(stats: torch.Tensor, accelerator) -> dict[str, float]:
        """Statistics summed over processes (the peak column: max)."""
        if accelerator.num_processes > 1:
            stats = stats.to(accelerator.device)
            summed = accelerator.reduce(stats.clone(), reduction="sum")
            peak = accelerator.gather(stats[-1:]).max()
            stats = torch.cat([summed[:-1], peak.view(1)])
        return dict(zip(FETCH_STATS_COLUMNS, stats.cpu().tolist()))


class StepGuard(TrainerCallback):
    """Stops training, before the optimizer step, at the first step whose loss or gradient is not finite (one line
    naming the step and its samples: the weights, the checkpoints and the drafts on disk stay the last good ones), and
    once more than `--max-skipped-fraction` of an epoch's samples were skipped (unusable hidden states).

    `compute_loss` reports each micro-batch (`add`); the check costs one host sync per optimizer step (Trainer's own
    `logging_nan_inf_filter` already syncs on every micro-batch) and, on several processes, one small all-reduce, so
    that every process stops at the same step.
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer  # the `Eagle3Trainer` whose steps it checks
        self.skipped_in_epoch = 0
        self.samples = self.skipped = 0  # whole run, every process
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def add(
        self, loss: torch.Tensor, rows_ok: torch.Tensor, samples: torch.Tensor | None, skipped: torch.Tensor | None
    ):
        """One micro-batch: its loss, which of its counted rows have finite statistics, and their samples (`[B, D]`
        indices, -1 after the last) and which of those were skipped."""
        self._pending.append((loss.detach(), rows_ok, samples, skipped))

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self.skipped_in_epoch = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grads = [g.to_local() if isinstance(g, DTensor) else g for g in grads]  # FSDP: this process's shards
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        loss_bad = sum((~torch.isfinite(loss)).float() for loss, *_ in pending)
        counts = [(s >= 0).sum() for *_, s, _ in pending if s is not None]
        skips = [k.sum() for *_, k in pending if k is not None]
        flags = torch.stack(
            [
                torch.as_tensor(loss_bad, dtype=torch.float64, device=norm.device),
                (~torch.isfinite(norm)).double(),
                torch.as_tensor(sum(counts) if counts else 0, dtype=torch.float64, device=norm.device),
                torch.as_tensor(sum(skips) if skips else 0, dtype=torch.float64, device=norm.device),
            ]
        )
        accelerator = self.trainer.accelerator
        if accelerator.num_processes > 1:  # the same decision on every process
            flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum")
        loss_bad, grad_bad, samples, skipped = flags.tolist()  # the one host sync of the step
        self.samples, self.skipped = self.samples + int(samples), self.skipped + int(skipped)
        self.skipped_in_epoch += int(skipped)
        step = state.global_step + 1
        if loss_bad or grad_bad:
            what = " and ".join(w for w, bad in (("loss", loss_bad), ("gradient", grad_bad)) if bad)
            raise RunFailed(
                f"training stopped at step {step}: non-finite {what} ({self._samples(pending)}); nothing of this step "
                f"was saved, so the last checkpoint in {args.output_dir} is the last good one (lower --lr, or check "
                "those samples)."
            )
        allowed = args.max_skipped_fraction * self.trainer.train_dataset.num_samples
        if self.skipped_in_epoch > allowed:
            raise RunFailed(
                f"training stopped at step {step}: {self.skipped_in_epoch} of this epoch's "
                f"{self.trainer.train_dataset.num_samples} samples were skipped (hidden states non-finite or not "
                f"delivered), more than --max-skipped-fraction {args.max_skipped_fraction}; check the data (or the "
                "hidden-states servers), or raise --max-skipped-fraction."
            )

    def _samples(self, pending) -> str:
        """The step's samples, those of non-finite rows first named (datagen sample ids where the data has them)."""
        bad, every = [], []
        for _, rows_ok, samples, _ in pending:
            if samples is None:
                continue
            rows = samples.cpu().tolist()
            flags = rows_ok.cpu().tolist()
            for row, ok in zip(rows, flags):
                ids = [j for j in row if j >= 0]
                every += ids
                bad += [] if ok else ids
        names = sorted(set(bad or every))
        dataset = self.trainer.train_dataset.dataset
        if hasattr(dataset, "sample_id"):
            names = [dataset.sample_id(j) for j in names]
            label = "datagen sample ids"
        else:
            label = "samples"
        if not names:
            return "samples unknown"
        shown = ", ".join(map(str, names[:8])) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        return f"{label} {shown}" + ("" if bad else ", every sample of the step")


class EpochDrafts(TrainerCallback):
    """A loadable draft in `<save-path>/<epoch>/` whenever a checkpoint closes an epoch, and at the end of training
    if no draft holds the last weights (`--max-steps`, `--save-strategy steps|no`). A partial epoch keeps its index:
    ending at epoch 2.5 writes `2/` (its `training_config.json` records `epoch` and `global_step`)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer  # the `Eagle3Trainer` that saves the drafts (`save_draft`)
        self.step: int | None = None  # global step of the last draft written
        self.index: int | None = None  # ... and its epoch index

    def on_save(self, args, state, control, **kwargs) -> None:
        epoch = state.epoch
        if epoch is not None and abs(epoch - round(epoch)) < 1e-6 and round(epoch) > 0:
            self._save(round(epoch) - 1, state)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.step != state.global_step:
            self._save(max(math.ceil(round(state.epoch or 0, 6)) - 1, 0), state)

    def _save(self, index: int, state) -> None:
        self.trainer.save_draft(index)
        self.step, self.index = state.global_step, index
