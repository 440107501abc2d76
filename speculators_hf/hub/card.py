"""The model card of an uploaded draft: what it is for (its verifier), the exact `vllm serve` commands, how it was
trained and the eval card.

"How it was trained" comes from what a run writes (`formats.checkpoint.training_record`): `training_config.json` in
the epoch draft folder, Trainer's `trainer_state.json` in the `checkpoint-<step>/` folder beside it, and datagen's
`data_config.json` (`--data-path`). `export` carries them into the exported folder.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path

from ..evaluation.card import EVAL_CARD_JSON, render_eval_card, serving_sentence, serving_settings
from ..formats.checkpoint import (
    DATA_CONFIG,
    DRAFT_SAMPLE_METHODS,
    DRAFTING,
    LOSS_KEYS,
    TRAINER_STATE,
    TRAINING_CONFIG,
    read_config,
    read_training_record,
    speculative_config,
    training_record,
)
from ..validation import bad_file, describe, read_json_if_exists

OBJECTIVE_KEYS = (
    "ttt_steps",
    "ttt_step_loss_decay",
    "loss_mask_alignment",
    "total_seq_len",
    "hidden_states_noise",
    *LOSS_KEYS,
)
LAST_LOGGED_KEYS = ("loss", "tau_sim", "eval_loss", "eval_tau_sim", "eval_acc_0")


def _read_json(path: Path) -> dict | None:
    return read_json_if_exists(path, fix="rerun the stage that wrote it, or delete it")


def _training_section(checkpoint: Path, data_path: str | Path | None = None) -> list[str]:
    files = training_record(checkpoint, data_path)
    objective, state, data = read_training_record(files)
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
    try:
        urls = metadata("speculators_hf").get_all("Project-URL") or []
    except PackageNotFoundError:
        urls = []
    url = next((u.split(",", 1)[1].strip() for u in urls if "," in u), None)
    return f"[speculators_hf]({url})" if url else "speculators_hf"


def serve_commands(checkpoint: str | Path, repo_id: str) -> tuple[list[str], str]:
    """`(vllm serve commands, a sentence about K)`: the explicit form uses what the eval grid recommends (K, batch-size
    schedule, drafting mode, draft_sample_method), when the checkpoint's eval card has a grid, else the K in
    `config.json` (what `vllm serve <repo>` alone uses)."""
    checkpoint = Path(checkpoint)
    config = read_config(checkpoint)  # checked by check_checkpoint before
    verifier = config["speculators_config"]["verifier"]["name_or_path"]
    k_config = config["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    card = _read_json(checkpoint / EVAL_CARD_JSON) or {}
    recommendation = card.get("recommendation")
    if recommendation is not None and not (
        isinstance(recommendation, dict)
        and isinstance(recommendation.get("num_speculative_tokens"), int)
        and isinstance(recommendation.get("geomean_speedup"), (int, float))
        and recommendation.get("drafting", "chain") in DRAFTING
        and recommendation.get("draft_sample_method", "greedy") in DRAFT_SAMPLE_METHODS
    ):
        raise bad_file(
            str(checkpoint / EVAL_CARD_JSON),
            '"recommendation" lacks num_speculative_tokens or geomean_speedup, or names a drafting mode or '
            "draft_sample_method vLLM does not take",
            "rerun evaluate --grid, or delete the card",
        )
    settings = serving_settings(recommendation, k_config)
    k, schedule = settings["num_speculative_tokens"], settings.get("per_batch_size")
    spec = json.dumps(speculative_config(config, repo_id, **settings))
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
        if schedule:
            ranges = ", ".join(f"{a}-{b}: K={n}" for a, b, n in schedule)
            note += (
                f" Since the best K differs across batch sizes, it sets K per batch size ({ranges}; K=0: no "
                "drafting) with `num_speculative_tokens_per_batch_size`."
            )
        if isinstance(card.get("grid"), dict) and "drafting" in recommendation:
            note += f" {serving_sentence(card['grid'], recommendation)}"
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
