"""Chat sources -> a `datasets.Dataset`, and one row shape -> normalised `messages` (`role`/`content`).

`--train-data-path` is a built-in name (`sharegpt`, `ultrachat`), any Hugging Face dataset id, a local JSON/JSONL file
or a folder written by `save_to_disk`. Rows hold `messages` (role/content, UltraChat/OpenAI shape) or `conversations`
(from/value, ShareGPT shape; role/content is accepted there too).
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from ..utils import UserError

# name -> (dataset id, split); the same public datasets the seed uses.
BUILTIN_SOURCES = {
    "sharegpt": ("Aeala/ShareGPT_Vicuna_unfiltered", "train"),
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", "train_sft"),
}
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
MESSAGE_COLUMNS = ("messages", "conversations", "conversation")
# An assistant turn's reasoning, under the names datasets use; templates read `reasoning_content` (Qwen3) or
# `thinking` (gpt-oss), so a normalised message carries it under both.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def load_source(path: str, split: str = "train", cache_dir: str | None = None) -> Dataset:
    """Load `--train-data-path` as a `Dataset` (not yet normalised; see `normalize_messages`)."""
    name = path.lower()
    if name in BUILTIN_SOURCES:
        path, split = BUILTIN_SOURCES[name]
    local = Path(path).expanduser()
    try:
        if local.is_file():
            if local.suffix not in (".json", ".jsonl"):
                raise UserError(f"--train-data-path {path}: local files must be .json or .jsonl.")
            dataset = load_dataset("json", data_files=str(local), split="train", cache_dir=cache_dir)
        elif local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
            dataset = load_from_disk(str(local))
        elif local.is_dir():
            dataset = load_dataset(str(local), split=split, cache_dir=cache_dir)
        elif path.startswith((".", "/", "~")) or local.suffix in (".json", ".jsonl"):
            raise UserError(f"--train-data-path {path} does not exist.")
        else:
            dataset = load_dataset(path, split=split, cache_dir=cache_dir)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types; the user needs one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--train-data-path {path}: cannot load it ({first}).") from err
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UserError(f"--train-data-path {path} has splits {list(dataset)}; choose one with --split.")
        dataset = dataset[split]
    if not any(c in dataset.column_names for c in MESSAGE_COLUMNS):
        raise UserError(
            f"--train-data-path {path}: rows have columns {dataset.column_names}; expected `messages` (role/content) "
            "or `conversations` (from/value)."
        )
    return dataset


def normalize_messages(row: dict) -> list[dict] | None:
    """One row -> `[{"role", "content"}, ...]` with roles user/assistant/system, or None if a role is unknown.

    Assistant turns with reasoning (`reasoning_content`, `thinking` or `reasoning`) also carry it as
    `reasoning_content` and `thinking`, for the templates that render it.
    """
    turns = next((row[c] for c in MESSAGE_COLUMNS if row.get(c) is not None), None)
    if not turns:
        return None
    messages = []
    for turn in turns:
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        role = ROLE_ALIASES.get(str(role).lower())
        if role is None or content is None:
            return None
        message = {"role": role, "content": str(content)}
        reasoning = next((turn.get(key) for key in REASONING_KEYS if turn.get(key)), None)
        if role == "assistant" and reasoning:
            message["reasoning_content"] = message["thinking"] = str(reasoning)
        messages.append(message)
    return messages
