"""`Eagle3Trainer`: a thin `transformers.Trainer` whose loss is the EAGLE-3 training-time-test (TTT) unroll.

Everything else (loop, accumulation, schedules, DDP/FSDP via accelerate, checkpoints, resume, loggers) is Trainer's.
Additions: `compute_loss` (K draft steps sharing one KV cache), step metrics through `_metrics` + `log`, and one
loadable draft per epoch in `<output_dir>/<epoch>/` next to Trainer's `checkpoint-<step>/` resume states.
"""

from __future__ import annotations

import json
import os
import time

import torch
from transformers import Trainer
from transformers.cache_utils import DynamicCache

from ..utils import get_logger
from .arguments import Eagle3TrainingArguments
from .collator import FETCH_STATS, DataCollatorForEagle3
from .data import add_uniform_noise
from .losses import STEP_STATS, metrics_from_stats, shift_for_step, step_statistics, ttt_attention_mask, ttt_block_mask

logger = get_logger(__name__)

TRAINING_CONFIG_FILE = "training_config.json"


class Eagle3Trainer(Trainer):
    """Trains an `Eagle3DraftModel` on packed rows from `DataCollatorForEagle3`.

    Args:
        model (`Eagle3DraftModel`): the draft (fp32 master weights; `Trainer` applies bf16 autocast when `args.bf16`).
        args (`Eagle3TrainingArguments`): training arguments, including `ttt_steps` and `ttt_step_loss_decay`.
        train_dataset, eval_dataset (`PackedDataset`): groups of samples, one packed row each.
        data_collator: default `DataCollatorForEagle3(args.total_seq_len, args.loss_mask_alignment)`.
    """

    args: Eagle3TrainingArguments

    def __init__(
        self, model, args: Eagle3TrainingArguments, train_dataset=None, eval_dataset=None, data_collator=None, **kwargs
    ):
        args.apply_logging_env()
        if data_collator is None:
            data_collator = DataCollatorForEagle3(args.total_seq_len, args.loss_mask_alignment)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False  # the loss is a per-row masked mean: let Trainer scale it for GA
        self._metrics: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self._interval_start: dict[str, float | None] = {"train": None, "eval": None}
        # Data feeding: seconds the step waited for batches, and online fetch statistics (interval and whole run)
        self._data_wait, self._data_since = 0.0, None
        self._fetch_interval: torch.Tensor | None = None
        self._fetch_total: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------------- data

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's, timed (`data_wait_fraction`), taking the online fetch statistics out of the batches."""
        start = time.perf_counter()
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._data_wait += time.perf_counter() - start
        self._data_since = start if self._data_since is None else self._data_since
        for batch in batches:
            stats = batch.pop(FETCH_STATS, None)  # [samples, columns]
            if stats is not None:
                summed = torch.cat([stats[:, :-1].sum(0), stats[:, -1:].max(0).values])  # the last column is a peak
                for name in ("_fetch_interval", "_fetch_total"):
                    old = getattr(self, name)
                    new = summed if old is None else torch.cat([old[:-1] + summed[:-1], old[-1:].maximum(summed[-1:])])
                    setattr(self, name, new)
        return batches, num_items

    def fetch_totals(self) -> dict[str, float] | None:
        """Online fetch statistics of the whole run, summed over processes (peaks: max). Every process calls it."""
        if self._fetch_total is None:
            return None
        from ..online.dataset import FETCH_STATS_COLUMNS

        return dict(zip(FETCH_STATS_COLUMNS, self._reduce_fetch_stats(self._fetch_total).tolist()))

    def _reduce_fetch_stats(self, stats: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return stats
        stats = stats.to(self.accelerator.device)
        summed = self.accelerator.reduce(stats.clone(), reduction="sum")
        peak = self.accelerator.gather(stats[-1:]).max()
        return torch.cat([summed[:-1], peak.view(1)]).cpu()

    # ------------------------------------------------------------------------------------------------------- loss

    def _attention_masks(self, document_ids: torch.Tensor):
        """The K steps' attention masks, each built when its step runs from the step-0 mask built once per batch."""
        build = ttt_block_mask if self.model.config._attn_implementation == "flex_attention" else ttt_attention_mask
        step0 = build(document_ids, 0)
        for k in range(self.args.ttt_steps):
            yield build(document_ids, k, step0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`sum_k decay**k * KL_k`: K draft steps over one packed batch, each fed the previous step's hidden state."""
        mode = "train" if model.training else "eval"
        if self._interval_start[mode] is None:
            self._interval_start[mode] = time.perf_counter()
        input_ids, position_ids = inputs["input_ids"], inputs["position_ids"]  # [B, S]
        loss_mask, document_ids = inputs["loss_mask"], inputs["document_ids"]  # [B, S]
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        aux = inputs["aux_hidden_states"].to(dtype)  # [B, S, 3H]
        if mode == "train":
            aux = add_uniform_noise(aux, self.args.hidden_states_noise)

        cache = DynamicCache(config=self.model.config)
        hidden, targets, target_ids, prev_correct = None, None, None, None
        loss, stats = 0.0, []
        for k, attention_mask in enumerate(self._attention_masks(document_ids)):
            out = model(
                input_ids=shift_for_step(input_ids, k),  # teacher forcing: ground truth shifted by k
                aux_hidden_states=aux if k == 0 else None,
                hidden_states=hidden,  # the previous step's output, not detached
                position_ids=position_ids + k,
                attention_mask=attention_mask,
                past_key_values=cache,
                use_cache=True,
                verifier_last_hidden_states=inputs["verifier_last_hidden_states"].to(dtype) if k == 0 else None,
            )
            if k == 0:
                targets = out.target_logits  # [B, S, Vd]
                target_ids = targets.argmax(-1)  # [B, S], shifted by k at step k
            step_loss, step_stats, prev_correct = step_statistics(
                out.logits, targets, loss_mask, document_ids, k, prev_correct, target_ids
            )
            loss = loss + self.args.ttt_step_loss_decay**k * step_loss
            stats.append(step_stats)  # [B, 5]
            hidden = out.hidden_states  # [B, S, H]
            del out  # free this step's logits before the next step's forward (backward keeps none of them)

        tokens = (document_ids >= 0).sum(-1, keepdim=True).float()  # [B, 1]
        self._record(mode, torch.cat([torch.stack(stats, 1).flatten(1), tokens], dim=1))
        return (loss, None) if return_outputs else loss

    def _record(self, mode: str, per_row: torch.Tensor) -> None:
        """Sum per-row statistics across processes (`gather_for_metrics` drops the padding of uneven last batches)."""
        summed = self.accelerator.gather_for_metrics(per_row.detach()).sum(0).double()  # stays on device: no sync
        previous = self._metrics[mode]
        self._metrics[mode] = summed if previous is None else previous + summed

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---------------------------------------------------------------------------------------------------- logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        summed, started = self._metrics[mode], self._interval_start[mode]
        if summed is not None:
            summed = summed.cpu()  # the one host sync per logging interval
            K = (len(summed) - 1) // len(STEP_STATS)
            metrics = metrics_from_stats(summed[:-1].view(K, len(STEP_STATS)))
            metrics["tokens_per_second"] = float(summed[-1]) / max(time.perf_counter() - started, 1e-9)
            if mode == "eval":
                metrics = {f"eval_{key}": val for key, val in metrics.items()}
            logs.update(metrics)
        self._metrics[mode], self._interval_start[mode] = None, None
        if mode == "train" and self._data_since is not None:
            logs["data_wait_fraction"] = self._data_wait / max(time.perf_counter() - self._data_since, 1e-9)
            self._data_wait, self._data_since = 0.0, None
            if self._fetch_interval is not None:  # the same on every process: reduce together
                from ..online.dataset import FETCH_STATS_COLUMNS

                stats = dict(zip(FETCH_STATS_COLUMNS, self._reduce_fetch_stats(self._fetch_interval).tolist()))
                self._fetch_interval = None
                logs["hidden_states_fetched"] = stats["fetched"]
                logs["hidden_states_cache_hits"] = stats["cache_hits"]
                logs["hidden_states_skipped"] = stats["skipped"]
                logs["hidden_states_retries"] = stats["retries"]
                logs["hidden_states_fetch_seconds"] = stats["fetch_seconds"] / max(stats["fetched"], 1.0)
                logs["hidden_states_disk_peak_mb"] = stats["spool_bytes"] / 2**20
        super().log(logs, start_time)

    # ---------------------------------------------------------------------------------------------------- saving

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            keys = ("ttt_steps", "ttt_step_loss_decay", "loss_mask_alignment", "total_seq_len", "hidden_states_noise")
            config = {key: getattr(self.args, key) for key in keys}
            config["eval_split"] = self.args.eval_split  # the held-out samples: train_eval_split(n, eval_split, seed)
            config["eval_split_seed"] = self.args.data_seed or 0
            config["loss_mask_alignment_note"] = (
                "row t (input x_{t+1}, predicting x_{t+2}) counts when l_{t+2} = 1 (predicted) or l_{t+1} = 1 (input)"
            )
            with open(os.path.join(output_dir or self.args.output_dir, TRAINING_CONFIG_FILE), "w") as f:
                json.dump(config, f, indent=2)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's resumable checkpoint, plus a loadable draft in `<output_dir>/<epoch>/` at each epoch's end."""
        super()._save_checkpoint(model, trial)
        epoch = self.state.epoch
        if epoch is not None and abs(epoch - round(epoch)) < 1e-6 and round(epoch) > 0:
            self.save_model(os.path.join(self.args.output_dir, str(round(epoch) - 1)))
