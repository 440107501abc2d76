"""`Eagle3Trainer`: a thin `transformers.Trainer` whose loss is the EAGLE-3 training-time-test (TTT) unroll.

Everything else (loop, accumulation, schedules, DDP/FSDP via accelerate, checkpoints, resume, loggers) is Trainer's.
Additions: `compute_loss` (K draft steps sharing one KV cache), step metrics through `_metrics` + `log`, and one
loadable draft per epoch in `<output_dir>/<epoch>/` next to Trainer's `checkpoint-<step>/` resume states (the newest
`save_total_limit` of each are kept), plus the final draft when training ends mid-epoch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..datagen.shards import dequantize
from ..modeling.modeling_eagle3 import VERIFIER_HEAD_MISSING
from ..utils import UserError, get_logger
from .arguments import Eagle3TrainingArguments
from .collator import FETCH_STATS, DataCollatorForEagle3
from .data import add_uniform_noise
from ..modeling.losses import (
    STEP_STATS,
    metrics_from_stats,
    shift_for_step,
    step_statistics,
    ttt_attention_mask,
    ttt_block_mask,
    ttt_valid_rows,
)
from .resume import RUN_FINGERPRINT_KEY, RUN_INPUTS_KEY, run_fingerprint
from .ttt_cache import TTTCache

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
        if getattr(model, "verifier_head", None) is None:
            raise UserError(VERIFIER_HEAD_MISSING)  # else every target would come from a random head
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
        for module in self.model.modules():  # our TTT cache survives the replay: layers keep it when checkpointed
            if isinstance(module, GradientCheckpointingLayer):
                module._can_checkpoint_with_cache = True
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.is_fsdp_enabled:
            logger.warning(
                "An FSDP accelerate config on %s processes runs as DDP (accelerate shards only on accelerators): "
                "every process holds the whole draft.",
                self.accelerator.device.type,
            )
        self.model_accepts_loss_kwargs = False  # the loss is a per-row masked mean: let Trainer scale it for GA
        self._metrics: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self._interval_start: dict[str, float | None] = {"train": None, "eval": None}
        self.run_inputs: dict | None = None  # recorded in every checkpoint (`resume.run_inputs`); set by the CLI
        self._draft_step: int | None = None  # global step of the last draft written to <output_dir>/<epoch>/
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
        window = getattr(self.model.config, "sliding_window", None)  # a draft with windowed attention
        step0 = build(document_ids, 0, sliding_window=window)
        for k in range(self.args.ttt_steps):
            yield build(document_ids, k, step0, sliding_window=window)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`sum_k decay**k * KL_k`: K draft steps over one packed batch, each fed the previous step's hidden state,
        then the fused head + KL over the K steps' final states (`losses.fused_ttt_kl`, inside the model's forward)."""
        mode = "train" if model.training else "eval"
        if self._interval_start[mode] is None:
            self._interval_start[mode] = time.perf_counter()
        input_ids, position_ids = inputs["input_ids"], inputs["position_ids"]  # [B, S]
        loss_mask, document_ids = inputs["loss_mask"], inputs["document_ids"]  # [B, S]
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        # fp8 batches carry per-(token, layer) scales: dequantized here, on the training device
        aux = dequantize(inputs["aux_hidden_states"], inputs.get("aux_hidden_states_scale"), dtype)  # [B, S, 3H]
        if mode == "train":
            aux = add_uniform_noise(aux, self.args.hidden_states_noise)

        # step k writes slot k and reads slots 0..k of every layer (replay-safe under gradient checkpointing; no
        # window eviction: the TTT masks, windowed ones too, index every step's keys)
        cache = TTTCache()
        hidden, states = None, []
        for k, attention_mask in enumerate(self._attention_masks(document_ids)):
            out = model(
                input_ids=shift_for_step(input_ids, k),  # teacher forcing: ground truth shifted by k
                aux_hidden_states=aux if k == 0 else None,
                hidden_states=hidden,  # the previous step's output, not detached
                position_ids=position_ids + k,
                attention_mask=attention_mask,
                past_key_values=cache.step(k),
                use_cache=True,
                return_logits=False,
            )
            states.append(out.normed_hidden_states)  # [B, S, H]
            hidden = out.hidden_states  # [B, S, H]

        K = len(states)
        valid = ttt_valid_rows(loss_mask, document_ids, K)  # [K, B, S]
        last = dequantize(
            inputs["verifier_last_hidden_states"], inputs.get("verifier_last_hidden_states_scale"), dtype
        )  # [B, S, H]
        out = model(
            ttt_hidden_states=states,
            verifier_last_hidden_states=last,
            loss_mask=valid,
            loss_step_weights=[self.args.ttt_step_loss_decay**k for k in range(K)],
        )
        tokens = (document_ids >= 0).sum(-1, keepdim=True).float()  # [B, 1]
        self._record(mode, torch.cat([step_statistics(out.step_kl, out.step_agree, valid), tokens], dim=1))
        return (out.loss, None) if return_outputs else out.loss

    def _record(self, mode: str, per_row: torch.Tensor) -> None:
        """Add one micro-batch's per-row statistics to this process's sums; `log` adds them up across processes once
        per logging interval. Rows repeated to give every process a full last batch are left out, as
        `gather_for_metrics` does."""
        per_row = per_row.detach()[: self._rows_to_count(mode, len(per_row))]
        summed = per_row.double().sum(0)  # stays on device: no sync
        previous = self._metrics[mode]
        self._metrics[mode] = summed if previous is None else previous + summed

    def _rows_to_count(self, mode: str, rows: int) -> int:
        """How many of this process's `rows` are real samples. accelerate completes the last round of batches with
        samples from the start of the epoch; the real ones come first, process by process (`remainder` of them).
        Trainer fetches the micro-batches of a step ahead, so in training only the step's last one (the one that
        syncs gradients) can be the last batch."""
        state = self.accelerator.gradient_state
        last = state.end_of_dataloader and (mode == "eval" or state.sync_gradients)
        if not last or state.remainder <= 0:
            return rows
        return max(0, min(rows, state.remainder - self.accelerator.process_index * rows))

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
            summed = self.accelerator.reduce(summed, "sum").cpu()  # the one collective and host sync per interval
            K = (len(summed) - 1) // len(STEP_STATS)
            metrics = metrics_from_stats(summed[:-1].view(K, len(STEP_STATS)))
            metrics["tokens"] = float(summed[-1])  # in this interval, all processes
            metrics["tokens_per_second"] = metrics["tokens"] / max(time.perf_counter() - started, 1e-9)
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
        self._save_training_config(output_dir or self.args.output_dir)

    def _save_training_config(self, output_dir: str) -> None:
        if not self.args.should_save:
            return
        keys = ("ttt_steps", "ttt_step_loss_decay", "loss_mask_alignment", "total_seq_len", "hidden_states_noise")
        config = {key: getattr(self.args, key) for key in keys}
        config["eval_split"] = self.args.eval_split  # the held-out samples: train_eval_split(n, eval_split, seed)
        config["eval_split_seed"] = self.args.data_seed or 0
        config["loss_mask_alignment_note"] = (
            "row t (input x_{t+1}, predicting x_{t+2}) counts when l_{t+2} = 1 (predicted) or l_{t+1} = 1 (input)"
        )
        config["global_step"], config["epoch"] = self.state.global_step, self.state.epoch
        if self.run_inputs is not None:  # what a resume must match (training/resume.py)
            config[RUN_FINGERPRINT_KEY] = run_fingerprint(self.run_inputs)
            config[RUN_INPUTS_KEY] = self.run_inputs
        with open(os.path.join(output_dir, TRAINING_CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's resumable checkpoint, plus a loadable draft in `<output_dir>/<epoch>/` at each epoch's end."""
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if not os.path.exists(os.path.join(folder, TRAINING_CONFIG_FILE)):  # FSDP with sharded resume states: Trainer
            self._save_training_config(folder)  # wrote the weights without `_save`, and resume needs the record
        epoch = self.state.epoch
        if epoch is not None and abs(epoch - round(epoch)) < 1e-6 and round(epoch) > 0:
            self._save_draft(round(epoch) - 1)

    def train(self, *args, **kwargs):
        """`Trainer.train`, then the final draft in `<output_dir>/<epoch>/` if no epoch draft holds the last weights
        (the run ended mid-epoch: `--max-steps`, or `--save-strategy steps|no`). A partial epoch keeps its index:
        ending at epoch 2.5 writes `2/` (its `training_config.json` records `epoch` and `global_step`)."""
        output = super().train(*args, **kwargs)
        if self._draft_step != self.state.global_step:
            self._save_draft(max(math.ceil(round(self.state.epoch or 0, 6)) - 1, 0))
        return output

    def _save_draft(self, index: int) -> None:
        """Save the draft as `<output_dir>/<index>/`, then keep only the newest `save_total_limit` of them (<= 0: all,
        like `checkpoint-*`). Every process calls this (FSDP gathers the weights); the main one writes and deletes."""
        path = os.path.join(self.args.output_dir, str(index))
        if self.is_fsdp_enabled:  # full weights whatever the resume states hold (Trainer.save_model writes none
            state_dict = self.accelerator.get_state_dict(self.model)  # under SHARDED_STATE_DICT)
            if self.args.should_save:
                self._save(path, state_dict=state_dict)
        else:
            self.save_model(path)
        self._draft_step = self.state.global_step
        limit = self.args.save_total_limit
        if not self.args.should_save or not limit or limit <= 0:
            return
        folders = Path(self.args.output_dir).iterdir()
        drafts = sorted(int(p.name) for p in folders if p.name.isdigit() and (p / TRAINING_CONFIG_FILE).exists())
        for old in drafts[:-limit]:
            logger.info("Deleting epoch draft %s/%d (--save-total-limit %d).", self.args.output_dir, old, limit)
            shutil.rmtree(os.path.join(self.args.output_dir, str(old)), ignore_errors=True)
