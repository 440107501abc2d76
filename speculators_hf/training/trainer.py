"""`Eagle3Trainer`: a thin `transformers.Trainer` whose loss is the EAGLE-3 training-time-test (TTT) unroll.

Everything else (loop, accumulation, schedules, DDP/FSDP via accelerate, checkpoints, resume, loggers) is Trainer's.
Additions: `compute_loss` (K draft steps sharing one KV cache), step metrics through `_metrics` + `log`, and callbacks
(`callbacks.py`): data-wait and online fetch statistics, the guard against non-finite steps and skipped samples, one
loadable draft per epoch in `<output_dir>/<epoch>/`. The run owns `<output_dir>` through its claim
(`records.claim_save_path`): checkpoints and drafts are written under a temporary name and renamed when complete, and
the older ones beyond `save_total_limit` are deleted through the claim, never by hand.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..formats.shards import dequantize
from ..modeling.losses import (
    STEP_STATS,
    metrics_from_stats,
    shift_for_step,
    step_statistics,
    ttt_attention_mask,
    ttt_block_mask,
    ttt_valid_rows,
)
from ..modeling.modeling_eagle3 import VERIFIER_HEAD_MISSING
from ..runstate import Claim
from ..utils import UserError, environment_fault, get_logger
from .arguments import Eagle3TrainingArguments
from .callbacks import DataFeed, EpochDrafts, StepGuard
from .collator import FETCH_STATS, SAMPLE_INDEX, SAMPLE_SKIPPED, DataCollatorForEagle3
from .data import add_uniform_noise
from .on_policy import OnPolicyObjective
from .records import CHECKPOINT, TRAINING_CONFIG_FILE, claim_save_path, run_inputs, write_training_record
from .ttt_cache import TTTCache

logger = get_logger(__name__)

__all__ = ["TRAINING_CONFIG_FILE", "Eagle3Trainer", "ttt_unroll"]


def ttt_unroll(
    model, input_ids, aux, position_ids, attention_masks, parallel: bool = False, propose=None
) -> list[torch.Tensor]:
    """The K steps of the training forward over one packed batch; returns each step's final-norm states `[B, S, H]`.

    Chained (EAGLE-3): step k reads the ground-truth tokens shifted by k and the previous step's output state (not
    detached). Parallel (`parallel`, P-EAGLE): step k >= 1 is mask slot k of every row (`mask_slots`: token
    `mask_token_id`, state `fuse(mask_hidden)`), which vLLM computes for the proposal after row t (see
    `modeling_eagle3`). Either way positions are + k and step k attends through `attention_masks[k]` (the TTT mask)
    to the keys of steps 0..k: step k writes slot k and reads slots 0..k of every layer (replay-safe under gradient
    checkpointing; no window eviction: the TTT masks, windowed ones too, index every step's keys).
    With `propose` (the on-policy stage, `on_policy.OnPolicyObjective.start`), step k >= 1 reads the token ids
    `propose` returned for step k - 1's states instead of the ground truth (it is called after every step).
    """
    cache = TTTCache()
    hidden, states, proposed = None, [], None
    for k, attention_mask in enumerate(attention_masks):
        if parallel and k:
            inputs = dict(mask_slots=True)
        else:
            inputs = dict(
                # teacher forcing: ground truth shifted by k (on-policy: the draft's own previous proposals)
                input_ids=shift_for_step(input_ids, k) if proposed is None else proposed,
                aux_hidden_states=aux if k == 0 else None,
                hidden_states=hidden,  # the previous step's output, not detached
            )
        out = model(
            **inputs,
            position_ids=position_ids + k,
            attention_mask=attention_mask,
            past_key_values=cache.step(k),
            use_cache=True,
            return_logits=False,
        )
        states.append(out.normed_hidden_states)  # [B, S, H]
        hidden = out.hidden_states  # [B, S, H]
        if propose is not None:
            proposed = propose(out.normed_hidden_states)  # [B, S] verifier ids
    return states


class Eagle3Trainer(Trainer):
    """Trains an `Eagle3DraftModel` on packed rows from `DataCollatorForEagle3`.

    Args:
        model (`Eagle3DraftModel`): the draft (fp32 master weights; `Trainer` applies bf16 autocast when `args.bf16`).
        args (`Eagle3TrainingArguments`): training arguments, including `ttt_steps` and `ttt_step_loss_decay`.
        train_dataset, eval_dataset (`PackedDataset`): groups of samples, one packed row each.
        data_collator: default `DataCollatorForEagle3(args.total_seq_len, args.loss_mask_alignment)`.
        claim (`runstate.Claim`, *optional*): the run's claim on `args.output_dir` (`records.claim_save_path`);
            without one, `train` claims the folder itself for the draft and `args`.
        run_inputs (`dict`, *optional*): what decides the weights (`records.run_inputs`), recorded in every checkpoint
            and draft.
        on_policy (`on_policy.OnPolicyObjective`, *optional*): `--stage on-policy`: training batches unroll the
            draft's own proposals and count what the verifier accepts (evaluation stays the TTT objective, comparable
            across stages).
    """

    args: Eagle3TrainingArguments

    def __init__(
        self,
        model,
        args: Eagle3TrainingArguments,
        train_dataset=None,
        eval_dataset=None,
        data_collator=None,
        claim: Claim | None = None,
        run_inputs: dict | None = None,
        on_policy: OnPolicyObjective | None = None,
        **kwargs,
    ):
        if getattr(model, "verifier_head", None) is None:
            raise UserError(VERIFIER_HEAD_MISSING)  # else every target would come from a random head
        args.apply_logging_env()
        if data_collator is None:
            data_collator = DataCollatorForEagle3(
                args.total_seq_len, args.loss_mask_alignment, verifier_ids=on_policy is not None
            )
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
        if on_policy is not None and self.is_fsdp_enabled:  # it runs the draft head and verifier head outside forward
            raise UserError(
                "--stage on-policy runs on one process or under DDP (accelerate_configs/ddp.yaml); FSDP shards the "
                "draft and verifier heads it reads between forward passes: use a DDP config for this stage."
            )
        self.model_accepts_loss_kwargs = False  # the loss is a per-row masked mean: let Trainer scale it for GA
        self._metrics: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self._interval_start: dict[str, float | None] = {"train": None, "eval": None}
        self.claim = claim
        self.on_policy = on_policy
        self.run_inputs = run_inputs  # recorded in every checkpoint and draft (`records.run_inputs`)
        self.feed, self.guard, self.drafts = DataFeed(), StepGuard(self), EpochDrafts(self)
        for callback in (self.feed, self.guard, self.drafts):
            self.add_callback(callback)

    # ------------------------------------------------------------------------------------------------------- loss

    def _attention_masks(self, document_ids: torch.Tensor):
        """The K steps' attention masks, each built when its step runs from the step-0 mask built once per batch."""
        build = ttt_block_mask if self.model.config._attn_implementation == "flex_attention" else ttt_attention_mask
        window = getattr(self.model.config, "sliding_window", None)  # a draft with windowed attention
        step0 = build(document_ids, 0, sliding_window=window)
        for k in range(self.args.ttt_steps):
            yield build(document_ids, k, step0, sliding_window=window)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`sum_k decay**k * loss_k` (`loss_k`: the masked mean of `--loss`, KL by default): K draft steps over one
        packed batch, each fed the previous step's hidden state, then the fused head + loss over the K steps' final
        states (`losses.fused_ttt_kl`, inside the model's forward)."""
        mode = "train" if model.training else "eval"
        if self._interval_start[mode] is None:
            self._interval_start[mode] = time.perf_counter()
        inputs = dict(inputs)
        fetch_stats = inputs.pop(FETCH_STATS, None)  # [samples, columns]: what fetching online states cost
        samples, skipped = inputs.pop(SAMPLE_INDEX, None), inputs.pop(SAMPLE_SKIPPED, None)  # [B, D]
        if mode == "train" and fetch_stats is not None:
            self.feed.add(fetch_stats)
        input_ids, position_ids = inputs["input_ids"], inputs["position_ids"]  # [B, S]
        loss_mask, document_ids = inputs["loss_mask"], inputs["document_ids"]  # [B, S]
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        # fp8 batches carry per-(token, layer) scales: dequantized here, on the training device
        aux = dequantize(inputs["aux_hidden_states"], inputs.get("aux_hidden_states_scale"), dtype)  # [B, S, 3H]
        if mode == "train":
            aux = add_uniform_noise(aux, self.args.hidden_states_noise)

        masks, parallel = self._attention_masks(document_ids), self.model.config.parallel_drafting
        on_policy = self.on_policy if mode == "train" else None
        draft = self.accelerator.unwrap_model(model) if on_policy else None
        propose = on_policy.start(draft, input_ids.device, self.state.global_step) if on_policy else None
        states = ttt_unroll(model, input_ids, aux, position_ids, masks, parallel, propose)  # K x [B, S, H]
        K = len(states)
        valid = ttt_valid_rows(loss_mask, document_ids, K)  # [K, B, S]
        last = dequantize(
            inputs["verifier_last_hidden_states"], inputs.get("verifier_last_hidden_states_scale"), dtype
        )  # [B, S, H]
        where = {}
        if on_policy is not None:  # the rows the served draft reaches, their targets, and the rejected ones
            valid, last, index, reverse = on_policy.step(draft, inputs, last, valid)
            where = dict(loss_target_index=index, loss_reverse_rows=reverse)
        out = model(
            ttt_hidden_states=states,
            verifier_last_hidden_states=last,
            loss_mask=valid,
            **where,
            loss_step_weights=[self.args.ttt_step_loss_decay**k for k in range(K)],
            loss_function=self.args.loss,
            loss_temperature=self.args.loss_temperature,
            loss_eta=self.args.loss_eta,
        )
        tokens = (document_ids >= 0).sum(-1, keepdim=True).float()  # [B, 1]
        per_row = self._record(mode, torch.cat([step_statistics(out.step_kl, out.step_agree, valid), tokens], dim=1))
        if mode == "train":  # checked once per optimizer step, before it (`callbacks.StepGuard`)
            n = len(per_row)
            rows = (samples[:n], skipped[:n]) if samples is not None else (None, None)
            self.guard.add(out.loss, per_row.isfinite().all(1), *rows)
        return (out.loss, None) if return_outputs else out.loss

    def _record(self, mode: str, per_row: torch.Tensor) -> torch.Tensor:
        """Add one micro-batch's per-row statistics to this process's sums; `log` adds them up across processes once
        per logging interval. Rows repeated to give every process a full last batch are left out, as
        `gather_for_metrics` does. Returns the rows counted."""
        per_row = per_row.detach()[: self._rows_to_count(mode, len(per_row))]
        summed = per_row.double().sum(0)  # stays on device: no sync
        previous = self._metrics[mode]
        self._metrics[mode] = summed if previous is None else previous + summed
        return per_row

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
        if mode == "train":  # the same on every process: reduced together
            logs.update(self.feed.interval_logs(self.accelerator))
            if self.on_policy is not None:
                logs.update(self.on_policy.interval_logs(self.accelerator))
        super().log(logs, start_time)

    # ---------------------------------------------------------------------------------------------------- saving

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`, in `args.output_dir` claimed for the draft and `args` when no claim was given."""
        if self.claim is None:
            dataset = self.train_dataset.dataset
            tokens = getattr(dataset, "token_dataset", dataset)
            data_path = getattr(tokens, "data_dir", None) or Path(tokens.files[0]).parent
            self.run_inputs = self.run_inputs or run_inputs(self.model, self.args, data_path, dataset)
            self.claim = claim_save_path(self.args, self.run_inputs)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's resumable checkpoint, written whole or not at all: under `.<name>.partial/` first, with the run's
        record, then renamed to `checkpoint-<step>/`; the older ones beyond `save_total_limit` are deleted through the
        claim. Overridden because transformers 5.19 has no hook for where a checkpoint goes: `_save_checkpoint` writes
        `<output_dir>/checkpoint-<step>/` in place (a save cut by a full disk left a folder that resume took for the
        latest) and deletes old ones itself; here it writes into the staging folder, where its rotation finds only
        this one."""
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with self._staged(name) as staging:
            output_dir = self.args.output_dir
            self.args.output_dir = str(staging)  # where Trainer puts checkpoint-<step>/ (`_get_output_dir`)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = output_dir
            if self.args.should_save:
                write_training_record(staging / name, self.args, self.state, self.run_inputs)
        if self.args.should_save:
            self._rotate(CHECKPOINT.fullmatch, keep={Path(self.state.best_model_checkpoint or "").name})

    def save_draft(self, index: int) -> None:
        """Save the draft as `<output_dir>/<index>/` (written under a temporary name, then renamed), then keep only
        the newest `save_total_limit` drafts (<= 0: all, like `checkpoint-*`). Every process calls it (FSDP gathers
        the weights); the one that saves writes and deletes."""
        name = str(index)
        with self._staged(name) as staging:
            if self.is_fsdp_enabled:  # full weights whatever the resume states hold (Trainer.save_model writes
                state_dict = self.accelerator.get_state_dict(self.model)  # none under SHARDED_STATE_DICT)
                if self.args.should_save:
                    self._save(str(staging / name), state_dict=state_dict)
            else:
                self.save_model(str(staging / name))
            if self.args.should_save:
                write_training_record(staging / name, self.args, self.state, self.run_inputs)
        if self.args.should_save:
            self._rotate(str.isdigit)

    @contextmanager
    def _staged(self, name: str):
        """Yield a staging folder in which every process writes `<staging>/<name>/`; then it becomes
        `<output_dir>/<name>` in one rename. The entry is recorded first, so that a run killed mid-write owns what it
        left (and a rerun deletes it: a partial folder is never taken for a checkpoint)."""
        folder = Path(self.args.output_dir)
        staging = folder / f".{name}.partial"
        if self.args.should_save:
            if self.claim.owns(name):
                self.claim.remove(name)  # a leftover of a cut run, or this step saved again: written anew
            self.claim.path(name)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        try:
            yield staging
        except Exception as err:  # a full disk surfaces as whatever the writer raised: name the folder
            raise _write_fault(err, folder) from err
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            os.replace(staging / name, folder / name)
            staging.rmdir()

    def _rotate(self, kind, keep: set[str] = frozenset()) -> None:
        """Delete (through the claim) the oldest entries of one kind beyond `save_total_limit`."""
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        names = sorted((n for n in self.claim.entries() if kind(n)), key=lambda n: int(n.rsplit("-", 1)[-1]))
        for name in [n for n in names[:-limit] if n not in keep]:
            logger.info("Deleting %s/%s (--save-total-limit %d).", self.args.output_dir, name, limit)
            self.claim.remove(name)


def _write_fault(err: Exception, folder: Path) -> Exception:
    """A save that failed: one line when the folder's disk is full or read-only (the writers of torch and safetensors
    raise their own errors, without an errno: a probe write tells), else the error itself."""
    cause = err
    while cause is not None and not (isinstance(cause, OSError) and cause.errno):
        cause = cause.__cause__ or cause.__context__
    if cause is None and not isinstance(err, UserError):
        probe = folder / ".write-probe-space"
        try:
            with open(probe, "wb") as f:
                f.write(bytes(2**20))
                f.flush()
                os.fsync(f.fileno())
        except OSError as probe_err:
            cause = probe_err
        finally:
            probe.unlink(missing_ok=True)
    fault = environment_fault(OSError(cause.errno, os.strerror(cause.errno), str(folder))) if cause else None
    return fault or err
