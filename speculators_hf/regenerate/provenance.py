"""`regenerate_config.json`: what produced a regenerated chat file, and the summary datagen records about it."""

from __future__ import annotations

from pathlib import Path

from ..utils import UserError
from ..validation import read_json, read_json_if_exists
from .writer import OutputLayout, config_path_for, file_sha256

CONFIG_VERSION = "speculators_hf.regenerate/1"
PROMPTS = (
    "token ids rendered by speculators_hf with the verifier's chat template and sent as ids to every engine "
    "(transformers generate, vllm.LLM, /v1/completions), so all engines see identical prompts"
)


def read_provenance(data_path: str | Path) -> dict | None:
    """The summary of `regenerate_config.json` next to a chat source, or None if it was not regenerated here.

    `matches_source` says whether the file (or folder) is still the one the provenance describes."""
    path = config_path_for(data_path)
    if path is None or not path.exists():
        return None
    try:  # a record only: an unreadable one is noted, not an error
        config = read_json(path)
        state = read_json_if_exists(Path(data_path) / "state.json") if Path(data_path).is_dir() else None
    except UserError as err:
        return {"config_path": str(path), "error": str(err)}
    output = config.get("output") if isinstance(config.get("output"), dict) else {}
    if OutputLayout(Path(data_path)).is_file:
        matches = output.get("sha256") == file_sha256(Path(data_path))
    else:
        fingerprint = state.get("_fingerprint") if state is not None else None
        matches = fingerprint is not None and fingerprint == output.get("fingerprint")
    keys = ("fingerprint", "generated_at", "verifier", "engine", "sampling", "limits", "source", "counts")
    return {"config_path": str(path), "matches_source": matches, **{k: config.get(k) for k in keys}}
