"""Upload a served-format draft to the Hugging Face Hub with a model card.

    speculators-hf push --checkpoint out/checkpoint --repo-id my-org/Llama-3.1-8B-Instruct-eagle3
    speculators-hf push --checkpoint out/checkpoint --repo-id my-org/x --local-dir staged/   # write, don't upload

The card says what the draft is for (its verifier), the exact `vllm serve` commands, how it was trained (data, steps,
arguments, from `training_args.json` / `trainer_state.json` / `data_config.json` when present) and the eval card.
The folder that is uploaded is staged first (`stage_upload`), so what would be uploaded can be inspected offline.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .evaluation.card import EVAL_CARD_JSON, render_eval_card
from .export import SIDE_FILES, check_checkpoint
from .utils import UserError, get_logger

logger = get_logger(__name__)

WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
TRAINING_FILES = ("training_args.json", "trainer_state.json", "data_config.json")
TRAINING_ARG_KEYS = (
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "ttt_steps",
    "ttt_step_loss_decay",
    "total_seq_len",
    "seed",
    "lr_scheduler_type",
    "warmup_ratio",
)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _find(checkpoint: Path, name: str) -> Path | None:
    """A training file in the checkpoint folder or its parent (the trainer's output dir)."""
    for folder in (checkpoint, checkpoint.parent):
        if (folder / name).is_file():
            return folder / name
    return None


def _training_section(checkpoint: Path) -> list[str]:
    files = {name: _find(checkpoint, name) for name in TRAINING_FILES}
    args = _read_json(files["training_args.json"]) if files["training_args.json"] else None
    state = _read_json(files["trainer_state.json"]) if files["trainer_state.json"] else None
    data = _read_json(files["data_config.json"]) if files["data_config.json"] else None
    lines = ["## Training", ""]
    if not (args or state or data):
        return lines + [
            "No training record (`training_args.json`, `trainer_state.json`, `data_config.json`) was "
            "found next to this checkpoint.",
            "",
        ]
    if data:
        source = data.get("data_path") or data.get("dataset") or data.get("data") or "see data_config.json"
        lines.append(
            f"- Data: `{source}`; hidden states from layers {data.get('layer_ids')} "
            f"({data.get('num_samples', '?')} samples)."
        )
    if state:
        lines.append(f"- Steps: {state.get('global_step')} (epoch {state.get('epoch')}).")
    if args:
        picked = {k: args[k] for k in TRAINING_ARG_KEYS if k in args}
        lines.append(f"- Arguments: `{json.dumps(picked)}` (all of them in `training_args.json`).")
    return lines + [""]


def build_model_card(checkpoint: str | Path, repo_id: str) -> str:
    """The README.md of the uploaded repo (YAML metadata + markdown)."""
    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    verifier = config["speculators_config"]["verifier"]["name_or_path"]
    k = config["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    spec = json.dumps({"model": repo_id, "method": "eagle3", "num_speculative_tokens": k})
    layer = config["transformer_layer_config"]
    eval_card = _read_json(checkpoint / EVAL_CARD_JSON)
    lines = [
        "---",
        f"base_model: {verifier}",
        "library_name: vllm",
        "tags:",
        "- speculative-decoding",
        "- eagle3",
        "- speculators",
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"An EAGLE-3 draft model for [`{verifier}`](https://huggingface.co/{verifier}): it proposes {k} tokens per "
        "step from the verifier's hidden states and the verifier checks them, so the output is the verifier's own "
        "output, faster. It is not a standalone language model.",
        "",
        f"- Draft: {layer['num_hidden_layers']} decoder layer(s) of width {layer['hidden_size']}, draft vocabulary "
        f"{config['draft_vocab_size']} of {layer['vocab_size']} (`d2t`/`t2d` in the checkpoint).",
        f"- Verifier layers fused (vLLM convention, id i = input of layer i): "
        f"{config['eagle_aux_hidden_state_layer_ids']}.",
        "",
        "## Serve it with vLLM",
        "",
        "```bash",
        f"vllm serve {repo_id}",
        "# or, naming the verifier explicitly:",
        f"vllm serve {verifier} --speculative-config '{spec}'",
        "```",
        "",
        "The first form reads the verifier and the number of speculative tokens from this repo's `config.json`.",
        "",
        *_training_section(checkpoint),
    ]
    if eval_card:
        lines.append(render_eval_card(eval_card))
    else:
        lines += ["## Evaluation", "", "Not evaluated yet (`speculators-hf evaluate` writes `eval_card.json`).", ""]
    lines += ["Trained with [speculators_hf](https://github.com/) (EAGLE-3, speculators checkpoint format).", ""]
    return "\n".join(lines)


def stage_upload(checkpoint: str | Path, repo_id: str, folder: str | Path) -> Path:
    """Write exactly the folder that `push_to_hub` uploads: the checked checkpoint, side files and README.md."""
    checkpoint, folder = Path(checkpoint), Path(folder)
    warnings = check_checkpoint(checkpoint)
    if any("local path" in w for w in warnings):
        raise UserError(
            f"{checkpoint} records a local verifier path; a hub repo needs a hub id: "
            "run `speculators-hf export --checkpoint ... --verifier-hub-id ORG/NAME` first."
        )
    folder.mkdir(parents=True, exist_ok=True)
    index = _read_json(checkpoint / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values())) if index else []
    for name in (*WEIGHT_FILES, *shards, *(f for f in SIDE_FILES if f != "README.md")):
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, folder / name)
    for name in TRAINING_FILES:
        found = _find(checkpoint, name)
        if found is not None:
            shutil.copy2(found, folder / name)
    (folder / "README.md").write_text(build_model_card(checkpoint, repo_id))
    return folder


def push_to_hub(
    checkpoint: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload EAGLE-3 draft",
    local_dir: str | Path | None = None,
) -> str:
    """Stage the upload folder and upload it; with `local_dir`, only stage it there (nothing is uploaded).

    Returns:
        `str`: the repo URL, or the staged folder when `local_dir` is given.
    """
    if local_dir is not None:
        folder = stage_upload(checkpoint, repo_id, local_dir)
        logger.warning("Staged the upload in %s; nothing was uploaded (local_dir given).", folder)
        return str(folder)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="speculators_hf_push_") as tmp:
        folder = stage_upload(checkpoint, repo_id, tmp)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return str(url)


# ------------------------------------------------------------------------------------------------------------ CLI


@dataclass
class PushArguments:
    """Upload a served-format draft with its model card (verifier, vllm serve command, training, eval card)."""

    checkpoint: str = field(metadata={"help": "Draft checkpoint folder (checked with the export checks first)."})
    repo_id: str = field(metadata={"help": "Hub repo, e.g. my-org/Llama-3.1-8B-Instruct-eagle3."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    local_dir: str | None = field(
        default=None, metadata={"help": "Write the folder that would be uploaded here and upload nothing."}
    )


def run(args: PushArguments) -> str:
    where = push_to_hub(args.checkpoint, args.repo_id, private=args.private, local_dir=args.local_dir)
    print(f"staged (not uploaded): {where}" if args.local_dir else f"uploaded: {where}")
    return where


def main(argv: list[str] | None = None) -> int:
    from .cli.parser import run_command

    return run_command(PushArguments, run, argv, prog="speculators-hf push")


if __name__ == "__main__":
    raise SystemExit(main())
