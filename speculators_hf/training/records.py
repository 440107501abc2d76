"""What a training run is, in the run-state module's terms: its inputs, its claim on `--save-path`, the record each
checkpoint and draft carries, and which checkpoint a run resumes from.

`run_inputs` describes what decides the trained weights: the data (datagen's fingerprint, the files and their sizes),
the draft before training (its config and vocabulary mapping) and every training flag except those that cannot change
the weights (`NOT_FINGERPRINTED`: paths, logging, saving, evaluation, dataloader and memory/speed levers).
`--save-path` is a folder the run owns (`runstate.claim`): the same inputs resume from the last complete checkpoint
(or, finished, are not run again), other inputs are refused in one line naming what changed unless `--overwrite`
(`--no-resume-from-checkpoint`), and only the files the run recorded are ever deleted. Every checkpoint and draft
also carries the inputs in its `training_config.json`, for an explicit `--resume-from-checkpoint` from elsewhere.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from transformers import TrainerState
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..formats.checkpoint import LOSS_BEFORE_RECORDED, LOSS_KEYS
from ..runstate import Claim, claim, file_signature, fingerprint
from ..utils import UserError, get_logger, write_json
from ..validation import bad_file, describe, read_json, read_json_if_exists, safetensors_header, torch_load

logger = get_logger(__name__)

ON_POLICY_KEYS = (
    "on_policy_temperature",
    "on_policy_draft_sample_method",
    "on_policy_targets",
    "on_policy_rejected_loss",
)
RUN_KEY = "train"  # the run's manifest: <save-path>/.speculators_hf/train.json
TRAINING_CONFIG_FILE = "training_config.json"  # the record inside every checkpoint and draft
RUN_FINGERPRINT_KEY, RUN_INPUTS_KEY = "run_fingerprint", "run_inputs"  # keys of training_config.json
CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
# The files of a pretrained draft that decide its weights (`--from-pretrained`): config and weights
PRETRAINED_FILES = re.compile(r"config\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|pytorch_model\.bin")

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
        # saving, resuming, the run's folder and its guards, the hub
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_on_each_node",
        "save_only_model",
        "enable_jit_checkpoint",
        "resume_from_checkpoint",
        "no_resume_from_checkpoint",
        "overwrite",
        "replace_stale",
        "max_skipped_fraction",
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
    return fingerprint([recorded, files, len(dataset)])


def pretrained_fingerprint(folder: str | Path) -> dict:
    """A pretrained draft's files (config and weights) by content: `{file name: sha256}` (where the folder lies does
    not count; an edited or replaced file does)."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and PRETRAINED_FILES.fullmatch(p.name))
    return {name: file_signature(folder / name)["sha256"] for name in names}


def run_inputs(model, args, data_path: str | Path, dataset, pretrained: str | Path | None = None) -> dict:
    """What decides the trained weights: data, the draft before training (with `pretrained`, the folder its weights
    came from: `pretrained_fingerprint`), the result-changing flags, world size."""
    vocab = None if model.d2t is None else hashlib.sha256(model.d2t.cpu().numpy().tobytes()).hexdigest()[:16]
    flags = {k: v for k, v in args.to_dict().items() if k not in NOT_FINGERPRINTED}
    for key, default in LOSS_BEFORE_RECORDED.items():  # KL at T = 1, what runs before `--loss` trained:
        if flags.get(key) == default:  # left out, so that those runs resume and their fingerprints stay the same
            flags.pop(key)
    if flags.get("loss", "kl") != "kl_tv":  # eta weighs nothing else
        flags.pop("loss_eta", None)
    if flags.get("stage") == "ttt":  # the on-policy stage's flags weigh nothing in a TTT run (nor did they exist)
        for key in ("stage", *ON_POLICY_KEYS):
            flags.pop(key, None)
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
    warm = {} if pretrained is None else {"--from-pretrained": pretrained_fingerprint(pretrained)}
    return {
        "data": data_fingerprint(data_path, dataset),
        "draft": fingerprint([config, vocab]),
        **warm,
        "world_size": args.world_size,
        **{f"--{k.replace('_', '-')}": v for k, v in flags.items()},
    }


def training_record(args, state, inputs: dict | None) -> dict:
    """`training_config.json` of a checkpoint or draft: the objective's settings, the held-out split (evaluation
    scores exactly those samples), where training stood, and the run's inputs."""
    keys = ("ttt_steps", "ttt_step_loss_decay", "loss_mask_alignment", "total_seq_len", "hidden_states_noise")
    keys += LOSS_KEYS  # which objective: what evaluation and the model card say was trained
    record = {key: getattr(args, key) for key in keys}
    if args.stage != "ttt":  # the on-policy stage: its rule, for the model card
        record.update({key: getattr(args, key) for key in ("stage", *ON_POLICY_KEYS)})
    record["eval_split"] = args.eval_split  # the held-out samples: train_eval_split(n, eval_split, seed)
    record["eval_split_seed"] = args.data_seed or 0
    record["loss_mask_alignment_note"] = (
        "row t (input x_{t+1}, predicting x_{t+2}) counts when l_{t+2} = 1 (predicted) or l_{t+1} = 1 (input)"
    )
    record["global_step"], record["epoch"] = state.global_step, state.epoch
    if inputs is not None:  # what an explicit --resume-from-checkpoint is compared with
        record[RUN_FINGERPRINT_KEY] = fingerprint(inputs)
        record[RUN_INPUTS_KEY] = inputs
    return record


def write_training_record(folder: str | Path, args, state, inputs: dict | None) -> None:
    write_json(Path(folder) / TRAINING_CONFIG_FILE, training_record(args, state, inputs))


# ------------------------------------------------------------------------------------------------- the claim


def checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest first. A checkpoint exists under its name only once complete
    (it is written under a temporary name and renamed), so a run cut mid-save leaves none of its own here."""
    found = [p for p in Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if CHECKPOINT.fullmatch(p.name)]
    return sorted((p for p in found if p.is_dir()), key=lambda p: int(p.name.rsplit("-", 1)[1]))


def claim_save_path(args, inputs: dict, *, replace_stale: bool = False) -> Claim:
    """Claim `--save-path` for a training run with `inputs` (`runstate.claim`). The process that saves decides first;
    the others decide after it, read-only, from what it recorded (the same decision, no race)."""
    latest = checkpoints(args.output_dir)[-1:] if Path(args.output_dir).is_dir() else []
    kwargs = dict(
        overwrite=args.overwrite,
        replace_stale=replace_stale or args.replace_stale,
        label="--save-path",
        since=latest[0].name if latest else None,
        fix="start fresh with --overwrite, --no-resume-from-checkpoint or a new --save-path (only the files that run "
        "wrote are deleted), or continue one of its checkpoints in a new --save-path with --resume-from-checkpoint",
    )
    with args.main_process_first(local=args.save_on_each_node, desc="claiming --save-path"):
        return claim(args.output_dir, RUN_KEY, inputs, readonly=not args.should_save, **kwargs)


# ------------------------------------------------------------------------------------------------------ resume


def check_resume_files(checkpoint: str | Path, label: str) -> None:
    """The files Trainer reads to resume, each one line when unreadable (instead of a traceback in the middle of
    `Trainer.train`): the trainer state, the record, the weights' header, the optimizer, scheduler, scaler and RNG
    states (memory-mapped: no tensor data is read)."""
    folder = Path(checkpoint)
    fix = f"delete {folder.name} (the run resumes from the one before it), or start fresh with --overwrite"
    state_file = folder / "trainer_state.json"
    read_json(state_file, f"{label} {state_file}", fix=fix)
    try:
        TrainerState.load_from_json(str(state_file))
    except Exception as err:  # noqa: BLE001 - a field of the wrong type or name, whatever TrainerState raises
        raise bad_file(f"{label} {state_file}", f"is not a Trainer state ({describe(err, 80)})", fix) from err
    read_json_if_exists(folder / TRAINING_CONFIG_FILE, f"{label} {folder / TRAINING_CONFIG_FILE}", fix=fix)
    if (folder / "model.safetensors").exists():
        safetensors_header(folder / "model.safetensors", f"{label} {folder / 'model.safetensors'}", fix)
    with safe_globals():  # what Trainer allows in them too: numpy arrays (the RNG states), nothing that runs code
        for pattern in ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth"):
            for path in sorted(folder.glob(pattern)):
                torch_load(path, f"{label} {path}", fix, mmap=True)


def explicit_checkpoint(args, inputs: dict) -> str | None:
    """`--resume-from-checkpoint`, its files checked (before anything is written); a checkpoint written with other
    inputs is only warned about: the user asked for it."""
    if not args.resume_from_checkpoint:
        return None
    checkpoint = Path(args.resume_from_checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"--resume-from-checkpoint {checkpoint} is not a folder (a checkpoint-<step>/ of a run).")
    check_resume_files(checkpoint, "--resume-from-checkpoint")
    fix = "pass another checkpoint, or start without --resume-from-checkpoint"
    recorded = read_json_if_exists(checkpoint / TRAINING_CONFIG_FILE, fix=fix) or {}
    if RUN_FINGERPRINT_KEY not in recorded:
        logger.warning("%s records no run fingerprint (an older version): resuming without checking.", checkpoint)
    elif recorded[RUN_FINGERPRINT_KEY] != fingerprint(inputs):
        before = recorded.get(RUN_INPUTS_KEY) or {}
        changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k)) or ["unknown"]
        logger.warning(
            "--resume-from-checkpoint %s was written with other inputs (%s).", checkpoint, ", ".join(changed)
        )
    return str(checkpoint)


def last_checkpoint(run: Claim, args) -> str | None:
    """The last complete checkpoint of a resumed run (its files checked), else None (a fresh start)."""
    found = checkpoints(run.folder) if run.resumed else []
    if not found:
        return None
    check_resume_files(found[-1], "--save-path")
    return str(Path(args.output_dir) / found[-1].name)


__all__ = [
    "NOT_FINGERPRINTED",
    "RUN_KEY",
    "TRAINING_CONFIG_FILE",
    "check_resume_files",
    "checkpoints",
    "claim_save_path",
    "explicit_checkpoint",
    "last_checkpoint",
    "run_inputs",
    "training_record",
    "write_training_record",
]
