"""Arguments of the training stage: what draft to build (`Eagle3ModelArguments`) and how to train it
(`Eagle3TrainingArguments`, a `TrainingArguments` with the seed's flags and draft-friendly defaults).

The seed's `scripts/train.py` flags keep their names and defaults: `--epochs` (= `--num-train-epochs`), `--lr`
(= `--learning-rate`), `--save-path` (= `--output-dir`), `--logger` (= `--report-to`), `--log-dir`, `--run-name`,
`--total-seq-len`, `--ttt-steps`, `--ttt-step-loss-decay`, `--no-resume-from-checkpoint` (= `--overwrite`). Every
other `TrainingArguments` field is available too; dashes and underscores are both accepted. Every number is checked
against its range when the flags are parsed (one line naming the flag).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from dataclasses import dataclass, field
from functools import cached_property

import torch
from accelerate import PartialState
from transformers import TrainingArguments

from ..modeling.losses import DEFAULT_LOSS_ETA, LOSSES
from ..utils import UserError
from .collator import LOSS_MASK_ALIGNMENTS

LOGGERS = ("trackio", "wandb", "tensorboard")
TRAINING_STAGES = ("ttt", "on-policy")  # --stage: the TTT objective on the data, or the on-policy stage after it
ON_POLICY_TARGETS = ("verifier", "shards")
ON_POLICY_REJECTED_LOSSES = ("reverse_kl", "same")
DRAFT_SAMPLE_METHODS = ("greedy", "probabilistic")  # vLLM's `draft_sample_method`
HIDDEN_STATES_SOURCES = ("offline", "online", "hybrid")
# what each logger imports (transformers' TensorBoard callback takes torch's writer, which needs tensorboard, or X)
LOGGER_PACKAGES = {"trackio": ("trackio",), "wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Ranges of the numeric flags: (test, what the one-line error says is expected).
POSITIVE = (lambda v: _finite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: _finite(v) and v >= 0, "a finite number >= 0")
FRACTION = (lambda v: _finite(v) and 0 <= v < 1, "a fraction in [0, 1)")
AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
UNSET_OR_AT_LEAST_1 = (lambda v: v is None or v >= 1, "an integer >= 1 (or unset)")
MODEL_RANGES = {
    "num_layers": ("--num-layers", AT_LEAST_1),
    "draft_hidden_size": ("--draft-hidden-size", UNSET_OR_AT_LEAST_1),
    "draft_intermediate_size": ("--draft-intermediate-size", UNSET_OR_AT_LEAST_1),
    "draft_sliding_window": ("--draft-sliding-window", UNSET_OR_AT_LEAST_1),
    "data_format_version": ("--data-format-version", (lambda v: v in (None, 0, 1, 2), "0 or 1 (.pt) or 2 (shards)")),
    "hidden_states_max_in_flight": ("--hidden-states-max-in-flight", AT_LEAST_1),
    "hidden_states_timeout": ("--hidden-states-timeout", POSITIVE),
}
TRAINING_RANGES = {
    "max_steps": ("--max-steps", (lambda v: v == -1 or v >= 1, "an integer >= 1 (or -1: --epochs decides)")),
    "learning_rate": ("--lr", POSITIVE),
    "ttt_steps": ("--ttt-steps", AT_LEAST_1),
    "ttt_step_loss_decay": ("--ttt-step-loss-decay", POSITIVE),
    "loss_temperature": ("--loss-temperature", POSITIVE),
    "loss_eta": ("--loss-eta", NON_NEGATIVE),
    "on_policy_temperature": ("--on-policy-temperature", NON_NEGATIVE),
    "total_seq_len": ("--total-seq-len", (lambda v: v >= 2, "an integer >= 2 (tokens per packed row)")),
    "eval_split": ("--eval-split", FRACTION),
    "hidden_states_noise": ("--hidden-states-noise", NON_NEGATIVE),
    "max_skipped_fraction": ("--max-skipped-fraction", (lambda v: _finite(v) and 0 <= v <= 1, "a fraction in [0, 1]")),
    "weight_decay": ("--weight-decay", NON_NEGATIVE),
    "warmup_steps": ("--warmup-steps", NON_NEGATIVE),
    "max_grad_norm": ("--max-grad-norm", (NON_NEGATIVE[0], "a finite number >= 0 (0: no clipping)")),
    "adam_beta1": ("--adam-beta1", FRACTION),
    "adam_beta2": ("--adam-beta2", FRACTION),
    "adam_epsilon": ("--adam-epsilon", POSITIVE),
    "per_device_train_batch_size": ("--per-device-train-batch-size", AT_LEAST_1),
    "per_device_eval_batch_size": ("--per-device-eval-batch-size", AT_LEAST_1),
    "gradient_accumulation_steps": ("--gradient-accumulation-steps", AT_LEAST_1),
    "logging_steps": ("--logging-steps", POSITIVE),
    "save_steps": ("--save-steps", POSITIVE),
    "save_total_limit": ("--save-total-limit", (lambda v: v is None or v >= 0, "an integer >= 0 (0: keep all)")),
    "dataloader_num_workers": ("--dataloader-num-workers", (lambda v: v >= 0, "an integer >= 0")),
}


def require_ranges(args, ranges: dict) -> None:
    """Every field of `ranges` within its range; the first one out is one line naming its flag and the range."""
    for name, (flag, (ok, expected)) in ranges.items():
        value = getattr(args, name)
        if not ok(value):
            raise UserError(f"{flag} {value}: expected {expected}.")


@dataclass
class Eagle3ModelArguments:
    """Which verifier, data and vocabulary the draft is built from."""

    verifier_name_or_path: str = field(metadata={"help": "Verifier hub id or folder (the model the data came from)."})
    data_path: str = field(default="./data", metadata={"help": "Folder of datagen shards (or the seed's data_*.pt)."})
    data_format_version: int | None = field(
        default=None,
        metadata={"help": "0 or 1: the seed's data_*.pt formats; 2: datagen shards (default: detected)."},
    )
    from_pretrained: str | None = field(
        default=None,
        metadata={
            "help": "Continue a published EAGLE-3 draft (a folder, or a hub id: config and weights only): a train or "
            "export output, a vllm-project/speculators draft, or the EAGLE authors' research layout (midlayer.*). "
            "Its weights, shape, aux layers and vocabulary mapping are kept; shape flags left at their defaults "
            "follow it, others must equal it."
        },
    )
    num_layers: int = field(default=1, metadata={"help": "Draft decoder layers."})
    d2t_path: str | None = field(
        default=None,
        metadata={
            "help": "d2t.npy of the draft vocabulary (default: <data-path>/d2t.npy, else the full verifier "
            "vocabulary)."
        },
    )
    t2d_path: str | None = field(default=None, metadata={"help": "t2d.npy (default: next to d2t.npy)."})
    aux_layer_ids: list[int] | None = field(
        default=None,
        metadata={
            "help": "Aux layer ids, vLLM convention, ascending. Default: the ids recorded with the data (the flag "
            "must equal them); required for data that records none (the seed's .pt files without data_config.json)."
        },
    )
    norm_before_fc: bool = field(default=False, metadata={"help": "Eagle 3.1: RMSNorm over the fused aux states."})
    norm_output: bool = field(default=False, metadata={"help": "Eagle 3.1: carry the final-norm output."})
    fc_norm: bool = field(default=False, metadata={"help": "Eagle 3.1: one RMSNorm per aux state before fc."})
    draft_layer_type: str = field(
        default="llama",
        metadata={
            "help": "Draft decoder layer: llama, or qwen3 (q/k norms; vLLM's Eagle3Qwen3).",
            "choices": ["llama", "qwen3"],
        },
    )
    draft_hidden_size: int | None = field(
        default=None,
        metadata={"help": "Draft width if narrower than the verifier's (its embedding and lm_head then train)."},
    )
    draft_sliding_window: int | None = field(
        default=None, metadata={"help": "Draft attention over the last N positions only (long-context verifiers)."}
    )
    draft_intermediate_size: int | None = field(
        default=None, metadata={"help": "Draft MLP width (default: the verifier's)."}
    )
    train_lm_head: bool = field(default=True, metadata={"help": "Train the draft lm_head."})
    parallel_drafting: bool = field(
        default=False,
        metadata={
            "help": "P-EAGLE: train the draft to propose its K (--ttt-steps) tokens in one forward pass (the real "
            "context plus K-1 mask slots), exported as a 'peagle' draft that vLLM serves with parallel_drafting."
        },
    )
    mask_token_id: int | None = field(
        default=None,
        metadata={"help": "Parallel drafting: the mask slots' token id (default: the verifier's pad, else EOS id)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run a verifier folder's own code (auto_map): only code you trust."},
    )
    allow_incomplete_data: bool = field(
        default=False,
        metadata={"help": "Train on the output of an unfinished datagen run."},
    )
    verifier_hub_id: str | None = field(
        default=None,
        metadata={"help": "Verifier hub id recorded for `vllm serve`."},
    )
    # Online and hybrid training: hidden states streamed from `speculators-hf serve-hidden-states` servers
    hidden_states_source: str = field(
        default="offline",
        metadata={
            "help": "offline: states from datagen shards; online: fetched from --hidden-states-servers for every "
            "batch and deleted once read (every epoch fetches again); hybrid: fetched once, cached in datagen's "
            "shard format (--hidden-states-cache-dir) for later epochs and restarts.",
            "choices": list(HIDDEN_STATES_SOURCES),
        },
    )
    hidden_states_servers: list[str] | None = field(
        default=None, metadata={"help": "URLs of serve-hidden-states servers (round-robin), e.g. http://host:8000."}
    )
    hidden_states_api_key: str | None = field(
        default=None,
        metadata={"help": "The servers' --api-key (default: $SPECULATORS_HF_API_KEY: off the command line)."},
    )
    hidden_states_max_in_flight: int = field(
        default=8,
        metadata={"help": "Requests in flight per training process, shared by its DataLoader workers."},
    )
    hidden_states_timeout: float = field(
        default=300.0, metadata={"help": "Seconds without any server answering before training stops."}
    )
    hidden_states_cache_dir: str | None = field(
        default=None, metadata={"help": "Hybrid mode's cache (default: <save-path>/hidden_states_cache)."}
    )

    def __post_init__(self):
        if self.hidden_states_source not in HIDDEN_STATES_SOURCES:
            raise UserError(
                f"--hidden-states-source {self.hidden_states_source!r}: choose {', '.join(HIDDEN_STATES_SOURCES)}."
            )
        if self.hidden_states_source != "offline" and not self.hidden_states_servers:
            raise UserError(
                f"--hidden-states-source {self.hidden_states_source} needs --hidden-states-servers URL [URL ...] "
                "(start them with `speculators-hf serve-hidden-states`)."
            )
        require_ranges(self, MODEL_RANGES)


@dataclass
class Eagle3TrainingArguments(TrainingArguments):
    r"""
    `TrainingArguments` plus the EAGLE-3 training-time-test (TTT) objective.

    > Parameters of the objective

    ttt_steps (`int`, defaults to 3): draft steps unrolled per position (K).
    ttt_step_loss_decay (`float`, defaults to 1.0): the loss is `sum_k decay**k * loss_k`.
    loss (`str`, defaults to `"kl"`): the per-row objective `loss_k` averages: `kl` (KL(p || q)), `tv` (total
        variation; acceptance at temperature T is `1 - TV(p_T, q_T)`), `lk` (`-log(1 - TV)`) or `kl_tv`
        (`lambda KL + (1 - lambda) TV`, `lambda = exp(-eta * acceptance)`); formulas in `modeling/losses.py`.
    loss_temperature (`float`, defaults to 1.0): the temperature T both distributions are taken at (the serving
        temperature the objective aims at).
    loss_eta (`float`, defaults to 3.0): `kl_tv`'s eta.
    stage (`str`, defaults to `"ttt"`): `ttt` (the TTT objective on the data's tokens) or `on-policy` (continue a
        trained draft, `--from-pretrained`, on its own proposals scored by the verifier: `training/on_policy.py`).
    on_policy_temperature (`float`, defaults to 0.0): the serving temperature the on-policy stage drafts and accepts
        at (0: greedy proposals, accepted when they are the verifier's argmax).
    on_policy_draft_sample_method (`str`, defaults to `"greedy"`): at T > 0, the draft proposes its argmax (accepted
        with probability `p_T(d)`, vLLM's default) or a sample of `q_T` (`probabilistic`: `min(1, p_T(d) / q_T(d))`).
    on_policy_targets (`str`, defaults to `"verifier"`): where the verifier's distributions after proposals that
        left the data's tokens come from: `verifier` (the verifier, loaded in the training process, scores them in
        one extra forward pass per batch) or `shards` (none: those rows do not count).
    on_policy_rejected_loss (`str`, defaults to `"reverse_kl"`): the objective of a rejected proposal: `reverse_kl`
        (`KL(q || p)`, forward `--loss` where accepted) or `same` (`--loss` everywhere).
    total_seq_len (`int`, defaults to 8192): tokens per packed row.
    loss_mask_alignment (`str`, defaults to `"predicted"`): row t counts when the token it predicts (`l_{t+2}`,
        "predicted") or the token it reads (`l_{t+1}`, "input", vllm-project/speculators) is an assistant token.
    hidden_states_noise (`float`, defaults to 0.0): uniform noise `U(-a, a)` on the aux states while training (peers
        use 0.05).
    eval_split (`float`, defaults to 0.1): fraction of samples held out for evaluation (seeded by `data_seed`/`seed`).

    > Parameters of the run

    overwrite (`bool`): start over in `output_dir` (`no_resume_from_checkpoint` is its earlier name).
    replace_stale (`bool`): start over when `output_dir` holds a run with other inputs (the pipeline's own folders).
    max_skipped_fraction (`float`, defaults to 0.05): stop when more of an epoch's samples are skipped (unusable
        hidden states).
    """

    # The seed's flags, as aliases of the TrainingArguments fields they set.
    output_dir: str | None = field(
        default="./checkpoints",
        metadata={
            "aliases": ["--save-path", "--save_path"],
            "help": "The run's own folder: <epoch>/ drafts, checkpoint-<step>/ resume states, .speculators_hf/.",
        },
    )
    num_train_epochs: float = field(default=20, metadata={"aliases": ["--epochs"], "help": "Training epochs."})
    learning_rate: float = field(default=1e-4, metadata={"aliases": ["--lr"], "help": "Peak learning rate (AdamW)."})
    report_to: None | str | list[str] = field(
        default="none",
        metadata={"aliases": ["--logger"], "help": f"Logger: one of {', '.join(LOGGERS)} (empty or 'none': none)."},
    )
    log_dir: str = field(default="./logs", metadata={"help": "Local folder of the logger's files."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Start over, deleting only what the run in <save-path> wrote (else it resumes)."},
    )
    no_resume_from_checkpoint: bool = field(default=False, metadata={"help": "= --overwrite (its earlier name)."})
    replace_stale: bool = field(
        default=False,  # internal: how `launch` hands the pipeline's mode to its processes (not in --help)
        metadata={"help": argparse.SUPPRESS},
    )
    max_skipped_fraction: float = field(
        default=0.05,
        metadata={"help": "Stop when more of an epoch's samples are skipped (unusable hidden states)."},
    )
    # TTT objective and data
    ttt_steps: int = field(default=3, metadata={"help": "TTT steps K unrolled per position."})
    ttt_step_loss_decay: float = field(default=1.0, metadata={"help": "Loss weight decay**k of step k."})
    loss: str = field(
        default="kl",
        metadata={
            "help": "Per-row objective: kl (KL(p||q), EAGLE-3's), tv (total variation: acceptance at temperature T "
            "is 1 - TV(p_T, q_T)), lk (-log(1 - TV)), kl_tv (lambda KL + (1 - lambda) TV, lambda = exp(-eta * "
            "acceptance)).",  # no argparse `choices`: a bad value is the one line of __post_init__
        },
    )
    loss_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature T of both distributions in the loss (the serving temperature aimed at)."},
    )
    loss_eta: float = field(
        default=DEFAULT_LOSS_ETA,
        metadata={"help": "kl_tv: lambda = exp(-eta * acceptance) (KL while acceptance is low)."},
    )
    stage: str = field(
        default="ttt",
        metadata={
            "help": "ttt: the TTT objective on the data; on-policy: continue a trained draft (--from-pretrained) on "
            "its own chained proposals, scored by the verifier (forward --loss where accepted, reverse KL where "
            "rejected, nothing after a rejection).",
            "choices": list(TRAINING_STAGES),
        },
    )
    on_policy_temperature: float = field(
        default=0.0,
        metadata={"help": "On-policy: the temperature the draft proposes and the verifier accepts at (0: greedy)."},
    )
    on_policy_draft_sample_method: str = field(
        default="greedy",
        metadata={
            "help": "On-policy at T > 0: greedy (the draft's argmax, accepted with probability p(d): vLLM's default "
            "draft_sample_method) or probabilistic (a sample of q, accepted with probability min(1, p/q)).",
            "choices": list(DRAFT_SAMPLE_METHODS),
        },
    )
    on_policy_targets: str = field(
        default="verifier",
        metadata={
            "help": "On-policy: verifier (the verifier, loaded here, scores proposals that left the data's tokens: "
            "one extra forward per batch) or shards (no extra passes; such rows do not count).",
            "choices": list(ON_POLICY_TARGETS),
        },
    )
    on_policy_rejected_loss: str = field(
        default="reverse_kl",
        metadata={
            "help": "On-policy: the objective of a rejected proposal: reverse_kl (KL(q||p)) or same (--loss).",
            "choices": list(ON_POLICY_REJECTED_LOSSES),
        },
    )
    total_seq_len: int = field(default=8192, metadata={"help": "Tokens per packed row."})
    loss_mask_alignment: str = field(
        default="predicted",
        metadata={
            "help": "Row t is supervised when the token it predicts (predicted: l_{t+2}) or reads (input: "
            "l_{t+1}) is an assistant token.",
            "choices": list(LOSS_MASK_ALIGNMENTS),
        },
    )
    hidden_states_noise: float = field(
        default=0.0, metadata={"help": "Uniform noise U(-a, a) added to the aux states while training (peers: 0.05)."}
    )
    eval_split: float = field(default=0.1, metadata={"help": "Fraction of samples held out for evaluation."})
    # Draft-friendly defaults of TrainingArguments fields
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 autocast with fp32 master weights: --bf16 or --bf16 true|false (default: on CUDA only).",
            "nargs": "?",  # a plain flag as well as `--bf16 true/false`, as TrainingArguments' own bool flags
            "const": True,
        },
    )
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Packed rows per device and step."})
    per_device_eval_batch_size: int = field(default=1, metadata={"help": "Packed rows per device in evaluation."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint (epoch: one draft per epoch)."})
    save_total_limit: int | None = field(
        default=2,
        metadata={
            "help": "Keep the newest N <save-path>/checkpoint-<step>/ resume states and the newest N <save-path>/"
            "<epoch>/ drafts; 0 keeps all (for Llama-3.1-8B: a draft is ~4 GB in fp32, a resume state ~7 GB)."
        },
    )
    eval_strategy: str | None = field(default=None, metadata={"help": "Default: 'epoch' when --eval-split > 0."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    warmup_steps: float = field(default=0.01, metadata={"help": "Warmup steps (a fraction < 1 of all steps)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every batch key (needed)."})

    def __post_init__(self):
        if not torch.cuda.is_available():
            self.use_cpu = True  # so that `accelerate launch` on CPU processes forms one gloo group (MULTI_CPU)
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not self.use_cpu)
        if self.report_to in ("", None, []):
            self.report_to = "none"
        reporters = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        bad = [r for r in reporters if r not in (*LOGGERS, "none", "all", "mlflow", "comet_ml", "dvclive", "swanlab")]
        if bad:
            raise UserError(f"--logger {bad[0]!r}: choose one of {', '.join(LOGGERS)} (or leave it empty).")
        missing = [r for r in reporters if r in LOGGERS and not any(map(_installed, LOGGER_PACKAGES[r]))]
        if missing:
            raise UserError(
                f"--logger {missing[0]}: {missing[0]} is not installed; pip install 'speculators_hf[{missing[0]}]' "
                "or choose another --logger."
            )
        if self.eval_strategy is None:
            self.eval_strategy = "epoch" if self.eval_split > 0 else "no"
        for flag, value, choices in (
            ("--loss", self.loss, LOSSES),
            ("--stage", self.stage, TRAINING_STAGES),
            ("--on-policy-targets", self.on_policy_targets, ON_POLICY_TARGETS),
            ("--on-policy-rejected-loss", self.on_policy_rejected_loss, ON_POLICY_REJECTED_LOSSES),
            ("--on-policy-draft-sample-method", self.on_policy_draft_sample_method, DRAFT_SAMPLE_METHODS),
        ):
            if value not in choices:
                raise UserError(f"{flag} {value!r}: choose one of {', '.join(choices)}.")
        self.check_numbers()
        self.overwrite = self.overwrite or self.no_resume_from_checkpoint
        self.label_names = []  # the loss needs no labels; evaluation still computes it
        self.prediction_loss_only = True
        super().__post_init__()
        if self.gradient_checkpointing:  # (after super: it parses the JSON of --gradient-checkpointing-kwargs)
            gc_kwargs = dict(self.gradient_checkpointing_kwargs or {})
            if gc_kwargs.get("use_reentrant"):
                raise UserError(
                    "--gradient-checkpointing-kwargs use_reentrant=true would drop the gradient that flows between "
                    "TTT steps through the draft's KV cache: leave use_reentrant unset (non-reentrant)."
                )
            self.gradient_checkpointing_kwargs = {**gc_kwargs, "use_reentrant": False}

    def check_numbers(self) -> None:
        """Every number of the objective, the schedule and the batches against its range (one line naming the flag):
        `--epochs 0` would save an untrained draft, `--lr nan` a draft of NaNs."""
        epochs = self.num_train_epochs
        if self.max_steps <= 0 and not (_finite(epochs) and epochs > 0):
            raise UserError(f"--epochs {epochs}: expected a finite number > 0 (or --max-steps N).")
        require_ranges(self, TRAINING_RANGES)

    @cached_property
    def _setup_devices(self):
        """TrainingArguments', with `--ddp-timeout` for CPU process groups too: transformers hands it to accelerate
        only on accelerators, so a gloo group waited torch's 30 minutes for a stuck peer."""
        if self.use_cpu:
            # starts the process group (a no-op in one process); TrainingArguments then reuses it
            PartialState(cpu=True, backend=self.ddp_backend, timeout=self.ddp_timeout_delta)
        return super()._setup_devices

    def apply_logging_env(self) -> None:
        """Point the loggers at `log_dir` (their integrations read these variables), unless already set. The folder is
        created only for a logger that writes there (none with `--logger none`)."""
        log_dir = os.path.abspath(self.log_dir)
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(log_dir, "tensorboard", self.run_name or ""))
        os.environ.setdefault("WANDB_DIR", log_dir)
        os.environ.setdefault("TRACKIO_DIR", os.path.join(log_dir, "trackio"))
        reporters = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        if any(r in (*LOGGERS, "all") for r in reporters):
            os.makedirs(log_dir, exist_ok=True)
