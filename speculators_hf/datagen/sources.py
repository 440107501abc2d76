"""Chat sources -> a `datasets.Dataset`, and one row shape -> normalised `messages` (`role`/`content`).

`--train-data-path` is a built-in name (`sharegpt`, `ultrachat`), any Hugging Face dataset id, a local JSON/JSONL file
or a folder written by `save_to_disk`. Rows hold `messages` (role/content, UltraChat/OpenAI shape) or `conversations`
(from/value, ShareGPT shape; role/content is accepted there too).

Every row's shape is checked when the source is loaded (`check_chat_rows`): turns must be a list of objects whose
role and content are strings. A row of another shape stops the run with one line naming the file and the row; rows
with an unknown role or no content are skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from ..runstate import file_signature
from ..utils import UserError
from ..validation import bad_file, describe, parse_json, quiet_library_errors, read_text, type_name

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
# Tool results, read as context (never trained): the chat template renders them into the next prompt.
TOOL_ROLES = {"tool": "tool", "function": "tool", "ipython": "tool", "observation": "tool"}
# Keys a turn keeps for the chat template: an assistant turn's structured calls (context, not trained: the template
# renders them, the model did not produce that text), a tool result's call id and tool name.
TOOL_KEYS = ("tool_calls", "tool_call_id", "name")
# `finish_reason: "length"` on an assistant turn (what `regenerate` writes on a turn cut at --max-new-tokens): its
# tokens train, the end-of-turn token the template appends after it does not (the verifier never produced it).
CUT = "length"
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
    label = f"--train-data-path {path}"
    try:
        if local.is_file():
            if local.suffix not in (".json", ".jsonl"):
                raise UserError(f"--train-data-path {path}: local files must be .json or .jsonl.")
            if local.stat().st_size == 0:
                raise bad_file(label, "is empty", "give a JSON/JSONL file of chats")
            with quiet_library_errors("datasets"):  # its loader logs the error we report below
                dataset = load_dataset("json", data_files=str(local), split="train", cache_dir=cache_dir)
            # datasets fingerprints a local file by its path and modification time; the tokenization cache and the
            # run's fingerprint follow the content instead (a rewritten identical file is the same data)
            dataset._fingerprint = file_signature(local)["sha256"][:16]
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
        if local.is_file():
            _find_bad_json(local, label)  # names the row, where datasets' message does not
        raise bad_file(label, f"cannot load it ({describe(err)})") from err
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UserError(f"--train-data-path {path} has splits {list(dataset)}; choose one with --split.")
        dataset = dataset[split]
    if not any(c in dataset.column_names for c in MESSAGE_COLUMNS):
        raise UserError(
            f"--train-data-path {path}: rows have columns {dataset.column_names}; expected `messages` (role/content) "
            "or `conversations` (from/value)."
        )
    check_chat_rows(dataset, label)
    return dataset


def _find_bad_json(path: Path, label: str) -> None:
    """Raise a one-line error at the first place a local JSON/JSONL file stops being JSON (datasets' own message
    names no row); return when it parses (the problem is elsewhere)."""
    fix = "each row needs `messages` (role/content) or `conversations` (from/value)"
    if path.suffix == ".json":
        text = read_text(path, label, fix)
        try:
            parse_json(text, label, None, fix)
            return
        except UserError:
            if text.lstrip().startswith("["):  # one JSON document (a list of chats): where it breaks
                raise
    with open(path, "rb") as f:  # JSON Lines: the first row that is not a JSON object
        for number, line in enumerate(f, 1):
            if line.strip():
                parse_json(line, f"{label}: row {number}", expect=dict, fix=fix)


class ChatRowError(ValueError):
    """A chat row of the wrong shape (the caller names the file and the row)."""


def _string_value(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _typed_turns(feature) -> bool:
    """Whether an Arrow column is typed as a list of `{role|from: string, content|value: string, ...}` objects: then
    every row has the right shape (only null or unknown values remain, which are skipped)."""
    inner = feature[0] if isinstance(feature, list) else getattr(feature, "feature", None)
    if not isinstance(inner, dict):
        return False
    role = [inner[k] for k in ("role", "from") if k in inner]
    content = [inner[k] for k in ("content", "value") if k in inner]
    text = ("role", "from", "content", "value", *REASONING_KEYS)
    return bool(role and content) and all(_string_value(inner[k]) for k in text if k in inner)


def check_chat_rows(dataset: Dataset, label: str) -> None:
    """Check the shape of every row (`normalize_messages`), or once from the Arrow types when they guarantee it.

    Raises a one-line `UserError` naming the file (`label`) and the first bad row."""
    columns = [c for c in MESSAGE_COLUMNS if c in dataset.column_names]
    if all(_typed_turns(dataset.features[c]) for c in columns):
        return
    fix = 'each row needs `messages`: a list of {"role": ..., "content": "text"} objects'
    number = 0
    for batch in dataset.select_columns(columns).iter(batch_size=1000):
        for values in zip(*batch.values()):
            number += 1
            try:
                normalize_messages(dict(zip(batch, values)))
            except ChatRowError as err:
                raise bad_file(label, f"row {number}: {err}", fix) from None


def normalize_messages(row: dict) -> list[dict] | None:
    """One row -> `[{"role", "content"}, ...]` with roles user/assistant/system/tool, or None if a role is unknown, a
    turn has no content, or there are no turns (such rows are skipped and counted).

    Assistant turns with reasoning (`reasoning_content`, `thinking` or `reasoning`) also carry it as
    `reasoning_content` and `thinking`, for the templates that render it. Tool turns (role `tool`, `function`,
    `ipython` or `observation`) keep `tool_call_id` and `name`, assistant turns their `tool_calls` (content may then
    be empty) and a cut marker (`finish_reason: "length"`). Raises `ChatRowError` for a row of the wrong shape: turns
    that are not a list of objects, or a role, content or reasoning that is not a string.
    """
    turns = chat_turns(row)
    if not turns:
        return None
    messages = []
    for turn in turns:
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        role = (ROLE_ALIASES.get(role.lower()) or TOOL_ROLES.get(role.lower())) if role is not None else None
        if content is None and role == "assistant" and turn.get("tool_calls"):
            content = ""
        if role is None or content is None:
            return None
        message = {"role": role, "content": content}
        reasoning = next((turn.get(key) for key in REASONING_KEYS if turn.get(key)), None)
        if role == "assistant" and reasoning:
            message["reasoning_content"] = message["thinking"] = reasoning
        for key in TOOL_KEYS if role in ("assistant", "tool") else ():
            if turn.get(key) is not None:  # (Arrow fills keys other rows have with None)
                message[key] = turn[key]
        if role == "assistant" and turn.get("finish_reason") == CUT:
            message["finish_reason"] = CUT
        messages.append(message)
    return messages


def chat_tools(row: dict) -> list | None:
    """The row's `tools` (a list, or a JSON string of one) for the chat template; None when it has none."""
    tools = row.get("tools") if isinstance(row, Mapping) else None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            return None
    return tools if isinstance(tools, list) and tools else None


def chat_turns(row) -> list[dict] | None:
    """The row's turns (from its first non-null message column), checked for shape; None when it has none."""
    if not isinstance(row, Mapping):
        raise ChatRowError(f"is {type_name(row)}, expected an object with `messages`")
    column = next((c for c in MESSAGE_COLUMNS if row.get(c) is not None), None)
    if column is None:
        return None
    turns = row[column]
    if not isinstance(turns, list):
        raise ChatRowError(f"`{column}` is {type_name(turns)}, expected a list of turns")
    for k, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise ChatRowError(f"`{column}[{k}]` is {type_name(turn)}, expected an object with a role and content")
        for key in ("role", "from", "content", "value", *REASONING_KEYS):
            value = turn.get(key)
            if value is not None and not isinstance(value, str):
                hint = " (content parts are not supported: join their text)" if isinstance(value, list) else ""
                raise ChatRowError(f"`{column}[{k}].{key}` is {type_name(value)}, expected a string{hint}")
    return turns
