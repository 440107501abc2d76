"""Upload a served-format draft to the Hugging Face Hub with a model card.

    speculators-hf push --checkpoint ./draft --repo-id my-org/Llama-3.1-8B-Instruct-eagle3 --data-path ./data
    speculators-hf push --checkpoint ./checkpoints/19 --repo-id my-org/x --local-dir staged/   # write, don't upload

The card says what the draft is for (its verifier), the exact `vllm serve` commands, how it was trained and the eval
card. "How it was trained" comes from what a run writes: `training_config.json` in the epoch draft folder, Trainer's
`trainer_state.json` in the `checkpoint-<step>/` folder beside it, and datagen's `data_config.json` (`--data-path`).
`export` carries the first two into the exported folder, the pipeline all three. The folder that is uploaded is staged
first (`stage_upload`), so what would be uploaded can be inspected offline.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .evaluation.card import EVAL_CARD_JSON, render_eval_card
from .export import SIDE_FILES, check_checkpoint, read_config, weight_map
from .utils import UserError, get_logger
from .validation import bad_file, describe, read_json_if_exists

logger = get_logger(__name__)

WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
TRAINING_CONFIG = "training_config.json"  # written by Eagle3Trainer next to every saved draft
TRAINER_STATE = "trainer_state.json"  # written by Trainer in each checkpoint-<step>/
DATA_CONFIG = "data_config.json"  # written by datagen in its output folder
TRAINING_FILES = (TRAINING_CONFIG, TRAINER_STATE, DATA_CONFIG)
OBJECTIVE_KEYS = ("ttt_steps", "ttt_step_loss_decay", "loss_mask_alignment", "total_seq_len", "hidden_states_noise")
LAST_LOGGED_KEYS = ("loss", "tau_sim", "eval_loss", "eval_tau_sim", "eval_acc_0")


def _read_json(path: Path | None) -> dict | None:
    return read_json_if_exists(path, fix="rerun the stage that wrote it, or delete it") if path is not None else None


def _trainer_state_beside(checkpoint: Path) -> Path | None:
    """Trainer's state for the draft in `<save-path>/<epoch>/`: the `checkpoint-<step>/` saved at the end of that
    epoch (`epoch == <epoch> + 1`), else the run's latest checkpoint (older ones may have been rotated out)."""
    states = sorted(
        (p for p in checkpoint.parent.glob(f"checkpoint-*/{TRAINER_STATE}") if p.parent.name[11:].isdigit()),
        key=lambda p: int(p.parent.name[11:]),
    )
    if not states:
        return None
    if checkpoint.name.isdigit():
        for path in states:
            epoch = (_read_json(path) or {}).get("epoch")
            if epoch is not None and abs(epoch - (int(checkpoint.name) + 1)) < 1e-6:
                return path
    return states[-1]


def training_record(checkpoint: str | Path, data_path: str | Path | None = None) -> dict[str, Path]:
    """The files that describe how `checkpoint` was trained, by name: found in the folder itself (an exported draft
    carries them), else where a run writes them (`trainer_state.json` in the `checkpoint-*` beside an epoch draft,
    `data_config.json` in `data_path`, datagen's output folder)."""
    checkpoint = Path(checkpoint)
    found = {name: checkpoint / name for name in TRAINING_FILES if (checkpoint / name).is_file()}
    if TRAINER_STATE not in found and (state := _trainer_state_beside(checkpoint)) is not None:
        found[TRAINER_STATE] = state
    if data_path is not None:
        data_config = Path(data_path) / DATA_CONFIG if Path(data_path).is_dir() else Path(data_path)
        if not data_config.is_file():
            raise UserError(f"--data-path {data_path}: no {DATA_CONFIG} there (the folder datagen wrote).")
        found[DATA_CONFIG] = data_config
    return found


def _training_section(checkpoint: Path, data_path: str | Path | None = None) -> list[str]:
    files = training_record(checkpoint, data_path)
    objective, state, data = (_read_json(files.get(name)) for name in TRAINING_FILES)
    fix = "rerun the stage that wrote it"
    if data is not None and not isinstance(data.get("data", {}), dict):
        raise bad_file(str(files[DATA_CONFIG]), "its `data` is not a JSON object", fix)
    history = state.get("log_history", []) if state is not None else []
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise bad_file(str(files[TRAINER_STATE]), "its `log_history` is not a list of objects", fix)
    lines = ["## Training", ""]
    if not (objective or state or data):
        return lines + [
            f"No training record (`{TRAINING_CONFIG}`, `{TRAINER_STATE}`, `{DATA_CONFIG}`) was found with this "
            "checkpoint.",
            "",
        ]
    if data:
        source = data.get("data", {})
        name = source.get("train_data_path") or data.get("data_path") or "see data_config.json"
        shown = f"`{name}`"
        if Path(name).is_absolute() or Path(name).exists():  # a public card shows no local paths (home folders)
            shown = f"`{Path(name).name}` (a local file)"
        lines.append(
            f"- Data: {shown}"
            + (f" (split `{source['split']}`)" if source.get("split") else "")
            + f", {source.get('num_samples', '?')} samples of up to {source.get('seq_length', '?')} tokens; "
            f"verifier hidden states of layers {data.get('layer_ids')} ({data.get('backend', '?')} backend)."
        )
    else:
        lines.append(f"- Data: not recorded (`push --data-path` names datagen's folder, whose `{DATA_CONFIG}` says).")
    if state:
        lines.append(
            f"- Steps: {state.get('global_step')} of {state.get('max_steps')} (epoch {state.get('epoch')} of "
            f"{state.get('num_train_epochs')}), {state.get('train_batch_size')} packed row(s) per device and step."
        )
        last = {}
        for entry in state.get("log_history", []):
            last.update({key: entry[key] for key in LAST_LOGGED_KEYS if key in entry})
        if last:
            lines.append("- Last logged: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()) + ".")
    if objective:
        picked = {key: objective[key] for key in OBJECTIVE_KEYS if key in objective}
        lines.append(f"- Objective (training-time test): `{json.dumps(picked)}` (all of it in `{TRAINING_CONFIG}`).")
    return lines + [""]


def _project_link() -> str:
    """The project's URL from the installed metadata (`[project.urls]`), or its bare name when there is none."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("speculators_hf").get_all("Project-URL") or []
    except PackageNotFoundError:
        urls = []
    url = next((u.split(",", 1)[1].strip() for u in urls if "," in u), None)
    return f"[speculators_hf]({url})" if url else "speculators_hf"


def serve_commands(checkpoint: str | Path, repo_id: str) -> tuple[list[str], str]:
    """`(vllm serve commands, a sentence about K)`: the explicit form uses the K the eval grid recommends, when the
    checkpoint's eval card has a grid, else the K in `config.json` (what `vllm serve <repo>` alone uses)."""
    checkpoint = Path(checkpoint)
    config = read_config(checkpoint)  # checked by check_checkpoint before
    verifier = config["speculators_config"]["verifier"]["name_or_path"]
    k_config = config["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    recommendation = (_read_json(checkpoint / EVAL_CARD_JSON) or {}).get("recommendation")
    if recommendation is not None and not (
        isinstance(recommendation, dict)
        and isinstance(recommendation.get("num_speculative_tokens"), int)
        and isinstance(recommendation.get("geomean_speedup"), (int, float))
    ):
        raise bad_file(
            str(checkpoint / EVAL_CARD_JSON),
            '"recommendation" lacks num_speculative_tokens or geomean_speedup',
            "rerun evaluate --grid, or delete the card",
        )
    k = recommendation["num_speculative_tokens"] if recommendation else k_config
    spec = json.dumps({"model": repo_id, "method": "eagle3", "num_speculative_tokens": k})
    commands = [f"vllm serve {repo_id}", f"vllm serve {verifier} --speculative-config '{spec}'"]
    note = (
        f"The first form reads the verifier and the number of speculative tokens ({k_config}) from this repo's "
        "`config.json`."
    )
    if recommendation:
        note += (
            f" The second uses K = {k}, the K the serving grid below recommends (best geometric-mean speed-up, "
            f"{recommendation['geomean_speedup']:.2f}x, over the temperatures and loads measured); its table gives "
            "the best K for each temperature and load."
        )
        if not recommendation.get("speculate", True):
            note += " On the hardware of that grid no K beat the verifier alone: serve the verifier alone there."
    return commands, note


def build_model_card(checkpoint: str | Path, repo_id: str, data_path: str | Path | None = None) -> str:
    """The README.md of the uploaded repo (YAML metadata + markdown); `data_path`: datagen's output folder."""
    checkpoint = Path(checkpoint)
    config = read_config(checkpoint)
    verifier = config["speculators_config"]["verifier"]["name_or_path"]
    k = config["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    (auto_command, explicit_command), serve_note = serve_commands(checkpoint, repo_id)
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
        auto_command,
        "# or, naming the verifier explicitly:",
        explicit_command,
        "```",
        "",
        serve_note,
        "",
        *_training_section(checkpoint, data_path),
    ]
    if eval_card:
        try:
            lines.append(render_eval_card(eval_card))
        except (KeyError, TypeError, AttributeError) as err:
            problem = f"is not an eval card (no {describe(err)})"
            raise bad_file(str(checkpoint / EVAL_CARD_JSON), problem, "rerun `speculators-hf evaluate`") from err
    else:
        lines += ["## Evaluation", "", "Not evaluated yet (`speculators-hf evaluate` writes `eval_card.json`).", ""]
    lines += [f"Trained with {_project_link()} (EAGLE-3, speculators checkpoint format).", ""]
    return "\n".join(lines)


def stage_upload(
    checkpoint: str | Path, repo_id: str, folder: str | Path, data_path: str | Path | None = None
) -> Path:
    """Write exactly the folder that `push_to_hub` uploads: the checked checkpoint, side files, the training record
    and README.md."""
    checkpoint, folder = Path(checkpoint), Path(folder)
    warnings = check_checkpoint(checkpoint)
    if any("local path" in w for w in warnings):
        raise UserError(
            f"{checkpoint} records a local verifier path; a hub repo needs a hub id: "
            "run `speculators-hf export --checkpoint ... --verifier-hub-id ORG/NAME` first."
        )
    card = build_model_card(checkpoint, repo_id, data_path)  # reads (and checks) every record before writing
    index = checkpoint / "model.safetensors.index.json"
    shards = sorted(set(weight_map(index).values())) if index.is_file() else []
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*WEIGHT_FILES, *shards, *(f for f in SIDE_FILES if f != "README.md")):
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, folder / name)
    for name, found in training_record(checkpoint, data_path).items():
        shutil.copy2(found, folder / name)
    (folder / "README.md").write_text(card)
    return folder


def push_to_hub(
    checkpoint: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload EAGLE-3 draft",
    local_dir: str | Path | None = None,
    data_path: str | Path | None = None,
) -> str:
    """Stage the upload folder and upload it; with `local_dir`, only stage it there (nothing is uploaded).

    Returns:
        `str`: the repo URL, or the staged folder when `local_dir` is given.
    """
    if local_dir is not None:
        folder = stage_upload(checkpoint, repo_id, local_dir, data_path)
        logger.warning("Staged the upload in %s; nothing was uploaded (local_dir given).", folder)
        return str(folder)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="speculators_hf_push_") as tmp:
        folder = stage_upload(checkpoint, repo_id, tmp, data_path)
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
    data_path: str | None = field(
        default=None,
        metadata={
            "help": "Datagen's output folder: its data_config.json describes the data in the card (default: the "
            "data_config.json carried in --checkpoint, if any)."
        },
    )


def run(args: PushArguments) -> str:
    where = push_to_hub(
        args.checkpoint, args.repo_id, private=args.private, local_dir=args.local_dir, data_path=args.data_path
    )
    print(f"staged (not uploaded): {where}" if args.local_dir else f"uploaded: {where}")
    commands, note = serve_commands(args.checkpoint, args.repo_id)
    print("Serve it:\n  " + "\n  ".join(commands) + f"\n{note}")
    return where


def main(argv: list[str] | None = None) -> int:
    from .cli.parser import run_command

    return run_command(PushArguments, run, argv, prog="speculators-hf push")


if __name__ == "__main__":
    raise SystemExit(main())
