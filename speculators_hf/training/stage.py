"""The training stage: `run(model_args, args) -> TrainResult`, `train` (the same, returning the Trainer), and the one
multi-process launch (`accelerate_command`, `launch`) built from the two argument dataclasses.

    result = run(Eagle3ModelArguments(verifier_name_or_path=..., data_path=...), Eagle3TrainingArguments(...))
    result = launch(model_args, args, "accelerate_configs/ddp.yaml")   # several processes: reads the run's record
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from ..http import API_KEY_ENV
from ..modeling.pretrained import resolve_draft_folder
from ..online.dataset import HIDDEN_STATES_REPORT, describe_report, hidden_states_report
from ..replicas import to_argv
from ..runstate import read_manifest, require_complete
from ..utils import RunFailed, UserError, get_logger, write_json
from .arguments import Eagle3ModelArguments, Eagle3TrainingArguments
from .on_policy import ContinuationScorer, OnPolicyObjective
from .records import RUN_KEY, claim_save_path, explicit_checkpoint, last_checkpoint, run_inputs
from .setup import attach_hybrid_cache, build_datasets, build_draft
from .trainer import Eagle3Trainer

logger = get_logger(__name__)


@dataclass
class TrainResult:
    """What a training run produced (recorded in `<save-path>/.speculators_hf/train.json`).

    Args:
        save_path: the run's folder.
        draft: the final draft, `<save-path>/<epoch>/` (what evaluate and export read).
        global_step: optimizer steps taken.
        epochs: where training stopped, in epochs (fractional when it ended mid-epoch).
        train_loss: the mean training loss of the run's last `train` call.
        eval: the last held-out evaluation, `{"loss", "tau_sim", "acc": [per TTT step]}` (None without one).
        samples_trained: sample reads that trained (every epoch counts its own).
        samples_skipped: sample reads skipped for unusable hidden states.
        hidden_states: online/hybrid runs: the hidden-states report (`hidden_states_report.json`).
        seconds: wall time of the run that produced this.
        on_policy: `--stage on-policy`: acceptance per step over the run, tau, rows the verifier continued and what
            its passes cost (`{"accept", "tau", "continued_rows", "verifier_tokens", "verifier_seconds"}`; the cost
            is the first process's).
    """

    save_path: str
    draft: str
    global_step: int
    epochs: float
    train_loss: float | None
    eval: dict | None
    samples_trained: int
    samples_skipped: int
    hidden_states: dict | None
    seconds: float
    reused: bool = False  # True: the recorded result of a finished run with the same inputs (nothing ran)
    on_policy: dict | None = None


def train(
    model_args: Eagle3ModelArguments, args: Eagle3TrainingArguments, *, replace_stale: bool = False
) -> Eagle3Trainer:
    """Check the inputs, build the draft, claim `--save-path` and train (resuming the same run's last complete
    checkpoint). Returns the Trainer, with `.result` (a `TrainResult`); a run found finished is not run again."""
    start = time.perf_counter()
    check_stage(model_args, args)
    # Data: datagen shards, packed into rows of --total-seq-len tokens; a held-out split for evaluation
    train_dataset, eval_dataset, layer_ids = build_datasets(model_args, args)
    # Draft: embedding, lm_head rows and final norm from the verifier; checked against the data and d2t/t2d
    model = build_draft(model_args, train_dataset, layer_ids, seed=args.seed, ttt_steps=args.ttt_steps)
    # The run: what decides its weights, an explicit checkpoint's files, then the claim on --save-path
    pretrained = resolve_draft_folder(model_args.from_pretrained) if model_args.from_pretrained else None
    inputs = run_inputs(model, args, model_args.data_path, train_dataset.dataset, pretrained)
    checkpoint = explicit_checkpoint(args, inputs)
    run = claim_save_path(args, inputs, replace_stale=replace_stale)
    # Trainer does the rest: DDP/FSDP, bf16 autocast on GPU, logging, <save-path>/<epoch>/ drafts
    trainer = Eagle3Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        claim=run,
        run_inputs=inputs,
        on_policy=on_policy_objective(model_args, args) if args.stage == "on-policy" and not run.finished else None,
    )
    if run.finished:
        logger.warning(
            "--save-path %s: this run finished there: up to date, skipped; --overwrite reruns it.", run.folder
        )
        trainer.result = TrainResult(**{**run.result, "reused": True})
        return trainer
    if args.should_save:
        attach_hybrid_cache(model_args, train_dataset.dataset, run)
    trainer.train(resume_from_checkpoint=checkpoint or last_checkpoint(run, args))
    trainer.result = _result(trainer, args, start)
    if trainer.result.hidden_states is not None and args.should_save:
        print(describe_report(trainer.result.hidden_states, getattr(train_dataset.dataset.cache, "folder", None)))
        write_json(run.path(HIDDEN_STATES_REPORT), trainer.result.hidden_states)
    run.finish(asdict(trainer.result), produced=trainer.result.samples_trained, what="trained samples")
    return trainer


def check_stage(model_args: Eagle3ModelArguments, args: Eagle3TrainingArguments) -> None:
    """`--stage on-policy` continues a trained chained draft: one line when it has none to continue."""
    if args.stage != "on-policy":
        return
    if not model_args.from_pretrained:
        raise UserError(
            "--stage on-policy continues a trained draft: pass --from-pretrained DRAFT (e.g. the <epoch>/ folder "
            "of a train run, or an exported draft)."
        )
    if model_args.parallel_drafting:
        raise UserError(
            "--stage on-policy trains the chained draft on its own proposals; a --parallel-drafting draft proposes "
            "all its tokens at once from the context: drop one of the two."
        )


def on_policy_objective(model_args: Eagle3ModelArguments, args: Eagle3TrainingArguments) -> OnPolicyObjective:
    """The on-policy objective of `args`, with the verifier loaded on the training device when it scores the
    draft's continuations (`--on-policy-targets verifier`)."""
    scorer = None
    if args.on_policy_targets == "verifier":
        logger.info("On-policy stage: verifier %s scores the draft's continuations.", model_args.verifier_name_or_path)
        scorer = ContinuationScorer.from_pretrained(
            model_args.verifier_name_or_path, args.device, trust_remote_code=model_args.trust_remote_code
        )
    sample = args.on_policy_draft_sample_method == "probabilistic"
    return OnPolicyObjective(args.on_policy_temperature, args.on_policy_rejected_loss, scorer, args.seed, sample)


def run(
    model_args: Eagle3ModelArguments, args: Eagle3TrainingArguments, *, replace_stale: bool = False
) -> TrainResult:
    """Train a draft (`train`) and return what the run produced."""
    return train(model_args, args, replace_stale=replace_stale).result


def _result(trainer: Eagle3Trainer, args: Eagle3TrainingArguments, start: float) -> TrainResult:
    """The run's result; every process computes it (the statistics are reduced across processes)."""
    history = trainer.state.log_history
    final = next((h for h in reversed(history) if "train_loss" in h), {})
    evals = [h for h in history if "eval_tau_sim" in h]
    last = evals[-1] if evals else None
    steps = range(args.ttt_steps)
    hidden = None
    dataset = trainer.train_dataset.dataset
    if trainer.feed.total is not None:  # online/hybrid: what fetching cost, every process
        hidden = hidden_states_report(dataset, trainer.feed.reduced(trainer.feed.total, trainer.accelerator))
    guard = trainer.guard
    return TrainResult(
        save_path=str(args.output_dir),
        draft=str(Path(args.output_dir) / str(trainer.drafts.index)),
        global_step=trainer.state.global_step,
        epochs=float(trainer.state.epoch or 0.0),
        train_loss=final.get("train_loss"),
        eval=None
        if last is None
        else {
            "loss": last.get("eval_loss"),
            "tau_sim": last["eval_tau_sim"],
            "acc": [last.get(f"eval_acc_{k}") for k in steps],
        },
        samples_trained=guard.samples - guard.skipped,
        samples_skipped=guard.skipped,
        hidden_states=hidden,
        seconds=round(time.perf_counter() - start, 1),
        on_policy=_on_policy_result(trainer),
    )


def _on_policy_result(trainer: Eagle3Trainer) -> dict | None:
    """The on-policy stage's acceptance per step over the run and the verifier passes it cost (None: a TTT run)."""
    return None if trainer.on_policy is None else trainer.on_policy.summary(trainer.accelerator)


# ------------------------------------------------------------------------------------------ several processes


def _flag_values(args) -> dict:
    """The fields of an argument dataclass that differ from its defaults, as values the command line parses back
    (enums by value, dicts as JSON); the others are left out."""
    required = _required(args)
    defaults = type(args)(**required)
    values = {}
    for f in dataclasses.fields(args):
        value = getattr(args, f.name, None)
        if not f.init or (f.name not in required and value == getattr(defaults, f.name, None)):
            continue  # its default: left off the command line
        if isinstance(value, Enum):
            value = value.value
        elif dataclasses.is_dataclass(value):
            value = json.dumps(asdict(value))
        elif isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, list):
            value = [v.value if isinstance(v, Enum) else v for v in value]
        values[f.name] = value
    return values


def _required(args) -> dict:
    """The fields without a default (a dataclass cannot be built without them)."""
    missing = dataclasses.MISSING
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(args)
        if f.init and f.default is missing and f.default_factory is missing
    }


def accelerate_command(
    model_args: Eagle3ModelArguments, args: Eagle3TrainingArguments, config_file: str | Path | None
) -> list[str]:
    """`python -m accelerate.commands.launch --config_file <config_file> -m speculators_hf.training <flags>` (without a
    config file: `python -m speculators_hf.training <flags>`, one fresh process), the flags built from the two
    dataclasses (only what differs from the defaults). The hidden-states API key is not a flag here (a command line
    is visible to every user of the machine): `launch` hands it over in the environment."""
    model_values = _flag_values(model_args)
    model_values.pop("hidden_states_api_key", None)
    flags = to_argv(Eagle3ModelArguments, model_values) + to_argv(Eagle3TrainingArguments, _flag_values(args))
    if config_file is None:
        return [sys.executable, "-m", "speculators_hf.training", *flags]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    return [*launcher, "-m", "speculators_hf.training", *flags]


def launch(
    model_args: Eagle3ModelArguments,
    args: Eagle3TrainingArguments,
    config_file: str | Path | None,
    env: dict[str, str] | None = None,
    *,
    replace_stale: bool = False,
) -> TrainResult:
    """Train in child processes (`accelerate_command`; `env` adds to their environment, e.g. the GPUs or CPU threads
    they may use) and read the result from the run's record."""
    command = accelerate_command(model_args, args, config_file)
    if replace_stale:
        command.append("--replace-stale")
    env = {**os.environ, **(env or {})}
    if model_args.hidden_states_api_key:
        env[API_KEY_ENV] = model_args.hidden_states_api_key
    before = read_manifest(args.output_dir, RUN_KEY) or {}
    status = subprocess.call(command, env=env)
    if status != 0:
        how = f"accelerate launch --config_file {config_file}" if config_file else "a training process"
        raise RunFailed(f"training ({how}) failed with exit status {status}.")
    record = require_complete(args.output_dir, RUN_KEY, "--save-path", "rerun training")
    reused = before.get("status") == "complete" and before.get("finished") == record.get("finished")
    return TrainResult(**{**record["result"], "reused": reused})
