"""`PipelineArguments`: the keys that cross stages. Everything else is a stage's own flag, set per stage (YAML
sections, `--<stage>.<flag>`); the flags the pipeline used to re-declare still work, each with one line telling its
new form (`MOVED`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils import UserError

STAGES = ("regenerate", "datagen", "vocab", "train", "on_policy", "evaluate", "export")
PRESETS = ("general", "embedded")

# Flags the pipeline used to declare for its stages -> the stage flags they set now.
MOVED: dict[str, tuple[str, ...]] = {
    "seq_length": ("datagen.seq_length",),
    "max_samples": ("datagen.max_samples",),
    "layer_ids": ("datagen.layer_ids",),
    "backend": ("datagen.backend",),
    "storage_dtype": ("datagen.storage_dtype",),
    "tensor_parallel_size": ("datagen.tensor_parallel_size",),
    "data_parallel_size": ("datagen.data_parallel_size",),
    "draft_vocab_size": ("vocab.draft_vocab_size",),
    "num_layers": ("train.num_layers",),
    "epochs": ("train.epochs",),
    "lr": ("train.lr",),
    "total_seq_len": ("train.total_seq_len",),
    "ttt_steps": ("train.ttt_steps",),
    "eval_engine": ("evaluate.engine",),
    "num_eval_prompts": ("evaluate.num_prompts",),
    "max_new_tokens": ("evaluate.max_new_tokens",),
    "eval_grid": ("evaluate.grid",),
    "eval_k": ("evaluate.k",),
    "eval_temperature": ("evaluate.temperature",),
    "eval_batch_size": ("evaluate.batch_size",),
    "train_args": ("train.<flag>",),
    "regenerate_args": ("regenerate.<flag>",),
    "force": ("overwrite",),
}


@dataclass
class PipelineArguments:
    """Run every stage (regenerate, datagen, vocab, train, evaluate, export, push) as one run. With no arguments it
    runs on the embedded tiny default (CPU, offline, a few minutes).

    Stage flags: `--<stage>.<flag> VALUE` (e.g. `--train.lr 3e-4`, `--evaluate.k 1 2 3`, `--datagen.backend vllm`),
    or a YAML file (`--config run.yaml`) with one section per stage whose keys are that stage's flags
    (`speculators-hf <stage> --help`) and this command's flags at the top level. Precedence: the preset's file
    (speculators_hf/pipeline/presets/), then yours, then the command line. Stages: regenerate, datagen, vocab, train,
    on_policy (train's flags; its values start from train's), evaluate, export."""

    verifier: str | None = field(
        default=None, metadata={"help": "Verifier hub id or folder (default: the offline kit's tiny peaked verifier)."}
    )
    verifier_hub_id: str | None = field(
        default=None, metadata={"help": "Hub id recorded in the draft for `vllm serve` when --verifier is a folder."}
    )
    train_data_path: str | None = field(
        default=None,
        metadata={
            "help": "Chats: sharegpt, ultrachat, a HF dataset id, a JSON/JSONL file or a save_to_disk folder "
            "(default: real chats from the chitchat-dataset wheel)."
        },
    )
    eval_prompts: str | None = field(
        default=None,
        metadata={
            "help": "JSONL of {'messages': [...]} rows for online evaluation (default: held-out chats of the "
            "embedded data; with a JSON/JSONL --train-data-path, its last evaluate.num_prompts usable rows, held out "
            "of training; required otherwise)."
        },
    )
    preset: str = field(
        default="auto",
        metadata={
            "help": "The stage values to start from: general (a real run) or embedded (the tiny default); auto: "
            "embedded when neither --verifier nor --train-data-path is given, else general.",
            "choices": ["auto", *PRESETS],
        },
    )
    output_dir: str = field(default="./runs/tiny-default", metadata={"help": "Where every stage writes."})
    regenerate: bool | None = field(
        default=None,
        metadata={
            "help": "First regenerate the chats' responses with the verifier (on-policy data), then run datagen on "
            "them (default from the preset: general off, embedded on; `--regenerate false` turns it off).",
            "nargs": "?",  # a bare `--regenerate` means true
            "const": True,
        },
    )
    on_policy: bool | None = field(
        default=None,
        metadata={
            "help": "After train, the on-policy stage (`train --stage on-policy`): the draft continues on its own "
            "proposals, scored by the verifier; evaluate and export read its draft. Its section `on_policy:` "
            "(`--on_policy.<flag>`) takes train's flags and starts from train's values (default from the preset).",
            "nargs": "?",
            "const": True,
        },
    )
    online: bool = field(
        default=False,
        metadata={
            "help": "Online training: datagen writes tokens only, the pipeline starts serve-hidden-states servers "
            "(vLLM) for the training stage and stops them after it; no hidden-state shards are written."
        },
    )
    online_mode: str = field(
        default="online",
        metadata={
            "help": "With --online: online (fetch every epoch) or hybrid (fetch once, cache for later epochs).",
            "choices": ["online", "hybrid"],
        },
    )
    online_gpus: str | None = field(
        default=None,
        metadata={
            "help": "With --online: GPUs for the servers, e.g. '0,1' (one server per datagen.tensor_parallel_size "
            "GPUs); training gets the other visible GPUs. Default: --online-servers servers on CPU (or vLLM's "
            "default)."
        },
    )
    online_servers: int = field(default=1, metadata={"help": "With --online and no --online-gpus: servers to start."})
    hidden_states_servers: list[str] | None = field(
        default=None,
        metadata={
            "help": "With --online: URLs of serve-hidden-states servers already running (started with the data's "
            "layer ids and --max-model-len above datagen.seq_length) to use instead of starting servers."
        },
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "Train under `accelerate launch --config_file` this YAML file or shipped config name "
            "(ddp, fsdp2, single_gpu, multi_node, cpu_ddp, cpu; `speculators-hf accelerate-config` lists them)."
        },
    )
    push_to_hub: str | None = field(default=None, metadata={"help": "Upload the exported draft to this hub repo."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Let every stage run code from the verifier's folder (its config's auto_map); off: refused."
        },
    )
    overwrite: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"Rerun these stages from scratch even if up to date: {', '.join(STAGES)}, all (only the files "
            "the stage wrote are replaced). Stages whose inputs changed rerun without it."
        },
    )
    stages: dict | str | None = field(
        default=None,
        metadata={
            "help": "Stage flags as a mapping {stage: {flag: value}} (what the YAML sections and --<stage>.<flag> "
            "fill in; a JSON string on the command line)."
        },
    )

    def __post_init__(self):
        bad = [s for s in self.overwrite if s not in (*STAGES, "all")]
        if bad:
            raise UserError(f"--overwrite {bad[0]!r}: choose from {', '.join(STAGES)} or all.")
        if self.online_servers < 1:
            raise UserError(f"--online-servers must be at least 1, got {self.online_servers}.")
        if (self.verifier is None) != (self.train_data_path is None):
            raise UserError("Give both --verifier and --train-data-path, or neither (the embedded default).")
        self.embedded = self.verifier is None and self.train_data_path is None
        if self.preset == "auto":
            self.preset = "embedded" if self.embedded else "general"
        if self.preset not in PRESETS:
            raise UserError(f"--preset {self.preset!r}: choose auto, {' or '.join(PRESETS)}.")
