"""From a run's description to the stages' own argument dataclasses.

A stage's values come, in this order (later wins), from: the preset's section (`presets/<preset>.yaml`), the user's
YAML section or `--stages` mapping, and `--<stage>.<flag>` on the command line. Then the pipeline wires the stages:
each one's input paths are the previous one's outputs under `--output-dir` (`WIRED`: a user value there is an error),
and a few values follow another stage's unless set (`follow`).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from importlib import resources

from transformers import HfArgumentParser

from ..commandline import typed_section
from ..datagen import DatagenArguments
from ..evaluation import EvaluateArguments
from ..export import ExportArguments
from ..regenerate import RegenerateArguments
from ..training import Eagle3ModelArguments, Eagle3TrainingArguments
from ..utils import UserError, get_logger
from ..validation import parse_json, read_yaml
from ..vocab import VocabArguments
from .arguments import MOVED, PRESETS, STAGES, PipelineArguments

logger = get_logger(__name__)

# Flags the pipeline sets itself (paths between stages, the verifier); a user value for one is refused.
WIRED = {
    "regenerate": ("target_model_path", "train_data_path", "output_path"),
    "datagen": ("target_model_path", "train_data_path", "output_dir", "tokens_only"),
    "vocab": ("token_freq_path", "target_model_path", "output_path"),
    "train": ("verifier_name_or_path", "data_path", "output_dir", "hidden_states_source", "hidden_states_servers"),
    "on_policy": (
        "verifier_name_or_path",
        "data_path",
        "output_dir",
        "hidden_states_source",
        "hidden_states_servers",
        "from_pretrained",  # the train stage's final draft
        "stage",
    ),
    "evaluate": ("draft", "verifier", "prompts", "shards", "held_out_fraction", "held_out_seed"),
    "export": ("checkpoint", "output_dir", "data_path"),
}
# Values a stage takes from another stage's unless its own section sets them: {stage: {flag: (stage, flag)}}.
FOLLOW = {
    "regenerate": {
        "max_model_len": ("datagen", "seq_length"),  # datagen keeps seq_length tokens: generating more is wasted
        "max_samples": ("datagen", "max_samples"),
        "backend": ("datagen", "backend"),
        "tensor_parallel_size": ("datagen", "tensor_parallel_size"),
        "data_parallel_size": ("datagen", "data_parallel_size"),
    },
    "evaluate": {
        "num_speculative_tokens": ("train", "ttt_steps"),
        "total_seq_len": ("train", "total_seq_len"),
    },
}


STAGE_TYPES: dict[str, tuple[type, ...]] = {
    "regenerate": (RegenerateArguments,),
    "datagen": (DatagenArguments,),
    "vocab": (VocabArguments,),
    "train": (Eagle3ModelArguments, Eagle3TrainingArguments),
    "on_policy": (Eagle3ModelArguments, Eagle3TrainingArguments),
    "evaluate": (EvaluateArguments,),
    "export": (ExportArguments,),
}


def preset_sections(preset: str) -> dict[str, dict]:
    """`{"pipeline": {...}, stage: {...}}` of a shipped preset file."""
    path = resources.files(__package__) / "presets" / f"{preset}.yaml"
    with resources.as_file(path) as file:
        return read_yaml(file, f"preset {preset}")


def translate_moved(argv: list[str]) -> list[str]:
    """Old pipeline flags on the command line -> their stage form, with one line each telling it."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token[2:].split("=", 1)[0].replace("-", "_") if token.startswith("--") else ""
        if name not in MOVED:
            out.append(token)
            i += 1
            continue
        values = [token.split("=", 1)[1]] if "=" in token else []
        i += 1
        if not values and name.endswith("_args") and i < len(argv):  # one string of flags: "--lr 1e-3 ..."
            values.append(argv[i])
            i += 1
        while "=" not in token and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if name in ("train_args", "regenerate_args"):
            stage = name.removesuffix("_args")
            tokens = shlex.split(" ".join(values))
            new = [f"--{stage}.{t[2:]}" if t.startswith("--") else t for t in tokens]
        elif name == "force":
            new = ["--overwrite", *values]
        else:
            new = [f"--{MOVED[name][0]}", *values]
        logger.warning("--%s is now %s (it still works).", name.replace("_", "-"), shlex.join(new))
        out += new
    return out


def stage_sections(args: PipelineArguments, cli_sections: dict | None = None) -> dict[str, dict]:
    """Every stage's typed values: preset, then `args.stages` (YAML/JSON), then the command line's; wired keys
    refused, followed keys filled in; `on_policy` starts from `train`'s values."""
    given = args.stages
    if isinstance(given, str):
        given = parse_json(given, "--stages", fix="give a JSON object {stage: {flag: value}}")
    given = given or {}
    unknown = sorted(set(given) - set(STAGES)) + sorted(set(cli_sections or {}) - set(STAGES))
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r} in the stage flags: choose from {', '.join(STAGES)}.")
    preset = preset_sections(args.preset)
    sections: dict[str, dict] = {}
    for stage in STAGES:
        types = STAGE_TYPES[stage]
        merged: dict = {}
        for source, label in ((preset, f"preset {args.preset}: {stage}"), (given, stage), (cli_sections, stage)):
            values = (source or {}).get(stage) or {}
            if not isinstance(values, dict):
                raise UserError(f"{label}: expected a mapping of {stage} flags, got {type(values).__name__}.")
            typed = typed_section(types, values, f"--{stage}" if source is cli_sections else label)
            wired = [k for k in typed if k in WIRED[stage]]
            if wired:
                raise UserError(
                    f"{stage}.{wired[0]} is set by the pipeline (it wires each stage to the previous one's output "
                    "under --output-dir); remove it."
                )
            merged.update(typed)
        sections[stage] = merged
    if args.regenerate is None:
        args.regenerate = bool(preset.get("pipeline", {}).get("regenerate", False))
    if args.on_policy is None:
        args.on_policy = bool(preset.get("pipeline", {}).get("on_policy", False))
    sections["on_policy"] = {**sections["train"], **sections["on_policy"]}  # train's values unless set
    for stage, follows in FOLLOW.items():
        for flag, (source, source_flag) in follows.items():
            if flag not in sections[stage]:
                value = sections[source].get(source_flag, _default(STAGE_TYPES[source], source_flag))
                sections[stage][flag] = value
    return sections


def _default(types: tuple[type, ...], flag: str):
    """A stage flag's default when no section sets it."""
    for cls in types:
        for f in dataclasses.fields(cls):
            if f.name == flag:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
    return None


def build(stage: str, values: dict):
    """The stage's argument dataclass(es) from typed values (validation runs in their `__post_init__`)."""
    types = STAGE_TYPES[stage]
    built = HfArgumentParser(types).parse_dict(values)
    return built if len(types) > 1 else built[0]


def presets_help() -> str:
    """Every value the presets set, both presets side by side (the end of `pipeline --help`)."""
    presets = {name: preset_sections(name) for name in PRESETS}
    keys: dict[str, None] = {}
    for sections in presets.values():
        for section, values in sections.items():
            keys.update({f"{section}.{k}": None for k in values})

    def value(name: str, key: str):
        section, flag = key.split(".", 1)
        found = presets[name].get(section, {}).get(flag, "-")
        return " ".join(map(str, found)) if isinstance(found, list) else found

    rows = [f"{key}: " + ", ".join(f"{name} {value(name, key)}" for name in PRESETS) for key in keys]
    return "The presets' values (`-`: the stage's own default): " + "; ".join(rows) + "."


def describe(sections: dict[str, dict]) -> str:
    """The stage values of a run, as YAML-like JSON (for `--verbose` and the report)."""
    return json.dumps(sections, indent=1, default=str)


__all__ = [
    "FOLLOW",
    "STAGE_TYPES",
    "WIRED",
    "build",
    "describe",
    "presets_help",
    "stage_sections",
    "translate_moved",
]
