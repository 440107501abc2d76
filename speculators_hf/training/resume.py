"""Resume only a run started with the same inputs.

`run_inputs` describes what decides the result of a run: the data (datagen's fingerprint, the files and their sizes),
the draft before training (its config and vocabulary mapping) and every training flag except those that cannot change
the weights (`NOT_FINGERPRINTED`: paths, logging, saving, evaluation, dataloader and memory/speed levers). Every
checkpoint records it in `training_config.json`; auto-resume (`--save-path` holding `checkpoint-*`) refuses a
checkpoint whose inputs differ, in one line naming what changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from ..utils import UserError, get_logger
from ..validation import read_json, read_json_if_exists

logger = get_logger(__name__)

RUN_FINGERPRINT_KEY, RUN_INPUTS_KEY = "run_fingerprint", "run_inputs"  # keys of training_config.json

# TrainingArguments fields that do not change the trained weights (a run may resume with other values).
NOT_FINGERPRINTED = frozenset(
    {
        # where things go, logging and reporting
        "output_dir",
        "log_dir",
        "run_name",
        "report_to",
        "project",
        "trackio_bucket_id",
        "trackio_space_id",
        "trackio_static_space_id",
        "logging_steps",
        "logging_strategy",
        "logging_first_step",
        "logging_nan_inf_filter",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "disable_tqdm",
        "skip_memory_metrics",
        "include_num_input_tokens_seen",
        # saving, resuming, the hub
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_on_each_node",
        "save_only_model",
        "enable_jit_checkpoint",
        "resume_from_checkpoint",
        "no_resume_from_checkpoint",
        "restore_callback_states_from_checkpoint",
        "ignore_data_skip",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "hub_private_repo",
        "hub_always_push",
        "hub_revision",
        # evaluation (the held-out split itself, --eval-split, is fingerprinted)
        "do_train",
        "do_eval",
        "do_predict",
        "eval_strategy",
        "eval_steps",
        "eval_delay",
        "eval_on_start",
        "eval_accumulation_steps",
        "eval_do_concat_batches",
        "eval_use_gather_object",
        "per_device_eval_batch_size",
        "batch_eval_metrics",
        "prediction_loss_only",
        "include_for_metrics",
        "label_names",
        "metric_for_best_model",
        "greater_is_better",
        "bf16_full_eval",
        "fp16_full_eval",
        # data loading, memory and speed levers, the process layout (world size is recorded separately)
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "torch_empty_cache_steps",
        "torch_compile",
        "torch_compile_backend",
        "torch_compile_mode",
        "use_liger_kernel",
        "liger_kernel_config",
        "tf32",
        "use_cpu",
        "use_cache",
        "local_rank",
        "debug",
        "ddp_backend",
        "ddp_timeout",
        "ddp_bucket_cap_mb",
        "ddp_find_unused_parameters",
        "ddp_broadcast_buffers",
        "ddp_static_graph",
        "accelerator_config",
        "parallelism_config",
        "fsdp",
        "fsdp_config",
        "deepspeed",
        "full_determinism",
    }
)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(data_path: str | Path, dataset) -> str:
    """Datagen's recorded fingerprint (if any), plus the data files' names and sizes (a partial folder that grew, or
    edited `.pt` files, differ)."""
    recorded = {}
    for name in ("data_config.json", "index.json"):
        path = Path(data_path) / name
        if path.exists():
            info = read_json(path, fix="rerun datagen, or fix the file by hand")
            recorded[name] = {k: info.get(k) for k in ("fingerprint", "layer_ids", "layer_id_convention")}
    files = [(Path(f).name, Path(f).stat().st_size) for f in getattr(dataset, "files", [])]
    return _digest([recorded, files, len(dataset)])


def run_inputs(model, args, data_path: str | Path, dataset) -> dict:
    """What decides the trained weights: data, the draft before training, the result-changing flags, world size."""
    vocab = None if model.d2t is None else hashlib.sha256(model.d2t.cpu().numpy().tobytes()).hexdigest()[:16]
    flags = {k: v for k, v in args.to_dict().items() if k not in NOT_FINGERPRINTED}
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
    return {
        "data": data_fingerprint(data_path, dataset),
        "draft": _digest([config, vocab]),
        "world_size": args.world_size,
        **{f"--{k.replace('_', '-')}": v for k, v in flags.items()},
    }


def run_fingerprint(inputs: dict) -> str:
    return _digest(inputs)


def checkpoint_to_resume(args, inputs: dict) -> str | None:
    """`--resume-from-checkpoint` if given; else the last `checkpoint-*` under `--save-path` if it was written with
    the same inputs (unless `--no-resume-from-checkpoint`). Other inputs: a one-line `UserError`."""
    from .trainer import TRAINING_CONFIG_FILE

    explicit = bool(args.resume_from_checkpoint)
    if explicit:
        checkpoint = args.resume_from_checkpoint
    elif args.no_resume_from_checkpoint or not Path(args.output_dir).is_dir():
        return None
    else:
        checkpoint = get_last_checkpoint(args.output_dir)
        if checkpoint is None:
            return None
    if explicit and not Path(checkpoint).is_dir():
        raise UserError(f"--resume-from-checkpoint {checkpoint} is not a folder (a checkpoint-<step>/ of a run).")
    config_path = Path(checkpoint) / TRAINING_CONFIG_FILE
    fix = "delete that checkpoint, or start fresh with --no-resume-from-checkpoint"
    recorded = read_json_if_exists(config_path, fix=fix) or {}
    read_json_if_exists(Path(checkpoint) / "trainer_state.json", fix=fix)  # Trainer reads it: fail here, in one line
    if RUN_FINGERPRINT_KEY not in recorded:
        logger.warning("%s records no run fingerprint (an older version): resuming without checking.", checkpoint)
        return checkpoint
    if recorded[RUN_FINGERPRINT_KEY] == run_fingerprint(inputs):
        return checkpoint
    before = recorded.get(RUN_INPUTS_KEY) or {}
    changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k)) or ["unknown"]
    if explicit:
        logger.warning(
            "--resume-from-checkpoint %s was written with other inputs (%s).", checkpoint, ", ".join(changed)
        )
        return checkpoint
    raise UserError(
        f"--save-path {args.output_dir} holds a run with other inputs ({', '.join(changed)} changed since "
        f"{Path(checkpoint).name}): start fresh with --no-resume-from-checkpoint or a new --save-path (or resume it "
        "anyway with --resume-from-checkpoint)."
    )


def clear_previous_run(output_dir: str | Path) -> None:
    """Before a fresh start: remove an earlier run's `checkpoint-*` states and `<epoch>/` drafts from `output_dir`, so
    that none of them is later taken for this run's (auto-resume, the pipeline's final draft). Only folders that
    training wrote (with `trainer_state.json` / `training_config.json`) are removed."""
    from .trainer import TRAINING_CONFIG_FILE

    root = Path(output_dir)
    if not root.is_dir():
        return
    stale = [
        p
        for p in sorted(root.iterdir())
        if (p.name.startswith("checkpoint-") and (p / "trainer_state.json").is_file())
        or (p.name.isdigit() and (p / TRAINING_CONFIG_FILE).is_file())
    ]
    if stale:
        logger.warning("Starting fresh in %s: removing the earlier run's %s.", root, ", ".join(p.name for p in stale))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
