"""`regenerate_config.json`: what produced a regenerated chat file, where it lives beside the chats, and the summary
datagen records about it.

    out.jsonl                     the chats datagen reads
    out.regenerate_config.json    this provenance (a `save_to_disk` folder holds it: `regenerate_config.json`)
    out.failures.jsonl            every conversation not in out.jsonl (in a folder: `failures.jsonl`)
"""

from __future__ import annotations

from pathlib import Path

from ..runstate import file_signature
from ..utils import UserError
from ..validation import read_json, read_json_if_exists

CONFIG_VERSION = "speculators_hf.regenerate/1"
CONFIG_NAME = "regenerate_config.json"
FAILURES_NAME = "failures.jsonl"
PROMPTS = (
    "token ids rendered by speculators_hf with the verifier's chat template and sent as ids to every engine "
    "(transformers generate, vllm.LLM, /v1/completions), so all engines see identical prompts"
)


def is_chat_file(path: str | Path) -> bool:
    """A regenerated output is a `.jsonl` file; anything else is a `save_to_disk` folder."""
    return Path(path).suffix == ".jsonl"


def side_file(output: str | Path, name: str) -> Path:
    """`out.jsonl` -> `out.<name>` beside it; a folder -> `<folder>/<name>`."""
    output = Path(output)
    return output.with_name(f"{output.stem}.{name}") if is_chat_file(output) else output / name


def config_path_for(data_path: str | Path) -> Path | None:
    """Where the provenance of a chat file/folder would be (None when `data_path` is neither)."""
    path = Path(data_path)
    if path.is_file():
        return side_file(path, CONFIG_NAME) if is_chat_file(path) else None
    return path / CONFIG_NAME if path.is_dir() else None


def file_sha256(path: str | Path) -> str:
    return file_signature(Path(path))["sha256"]


def output_matches(data_path: str | Path, config: dict) -> bool:
    """Whether the chats at `data_path` are still the ones the provenance `config` describes (checksum of a file, the
    `datasets` fingerprint of a folder)."""
    output = config.get("output") if isinstance(config.get("output"), dict) else {}
    path = Path(data_path)
    if is_chat_file(path):
        return path.is_file() and output.get("sha256") == file_sha256(path)
    state = read_json_if_exists(path / "state.json")
    return (
        state is not None
        and state.get("_fingerprint") is not None
        and state["_fingerprint"] == output.get("fingerprint")
    )


def read_provenance(data_path: str | Path) -> dict | None:
    """The summary of `regenerate_config.json` next to a chat source, or None if it was not regenerated here.

    `matches_source` says whether the file (or folder) is still the one the provenance describes."""
    path = config_path_for(data_path)
    if path is None or not path.exists():
        return None
    try:  # a record only: an unreadable one is noted, not an error
        config = read_json(path)
        matches = output_matches(data_path, config)
    except UserError as err:
        return {"config_path": str(path), "error": str(err)}
    keys = ("fingerprint", "generated_at", "verifier", "engine", "sampling", "limits", "source", "counts")
    return {"config_path": str(path), "matches_source": matches, **{k: config.get(k) for k in keys}}
