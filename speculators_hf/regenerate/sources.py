"""Source rows -> stable conversation ids and `messages` (datagen's readers; tool turns kept for the rollout)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

from ..datagen.sources import MESSAGE_COLUMNS, ROLE_ALIASES, TOOL_ROLES, chat_tools, chat_turns, normalize_messages

ID_COLUMNS = ("id", "conversation_id", "prompt_id")


def _has_tools(turns) -> bool:
    return any(
        turn.get("tool_calls") or str(turn.get("role") or turn.get("from") or "").lower() in TOOL_ROLES
        for turn in turns
    )


def source_conversation(row: dict) -> tuple[list[dict] | None, list | None]:
    """`(messages, tools)` of a source row; messages is None when a role is unknown or the row is empty.

    Rows without tool turns go through datagen's `normalize_messages` unchanged. Rows with `tool_calls` or `tool`
    turns keep those (`tool_calls`, `tool_call_id`, `name`), and `tools` (a list, or a JSON string of one) is returned
    for the chat template."""
    tools = chat_tools(row)
    turns = chat_turns(row)  # checked for shape (as every row was when the source was loaded)
    if not turns or not _has_tools(turns):
        return normalize_messages(row), tools or None
    messages = []
    for turn in turns:
        raw = str(turn.get("role") if turn.get("role") is not None else turn.get("from")).lower()
        role = TOOL_ROLES.get(raw) or ROLE_ALIASES.get(raw)
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if role is None or (content is None and not turn.get("tool_calls")):
            return None, tools or None
        message = {"role": role, "content": "" if content is None else str(content)}
        for key in ("tool_calls", "tool_call_id", "name"):
            if turn.get(key) is not None:
                message[key] = turn[key]
        messages.append(message)
    return messages, tools or None


def conversation_ids(dataset) -> list[str]:
    """One id per row: the row's own `id` (or `conversation_id`, `prompt_id`), else a hash of its conversation.

    Repeated ids get `#2`, `#3`, ... in source order, so every conversation has its own resume key."""
    column = next((c for c in ID_COLUMNS if c in dataset.column_names), None)
    values = dataset[column] if column else [None] * len(dataset)
    ids: list[str | None] = [None if v is None else str(v) for v in values]
    missing = [i for i, v in enumerate(ids) if v is None]
    if missing:
        turns_column = next(c for c in MESSAGE_COLUMNS if c in dataset.column_names)
        subset = dataset.select(missing).select_columns([turns_column])
        position = 0
        for batch in subset.iter(batch_size=1000):
            for turns in batch[turns_column]:
                digest = hashlib.sha256(json.dumps(turns, sort_keys=True, default=str).encode()).hexdigest()
                ids[missing[position]] = f"sha-{digest[:16]}"
                position += 1
    seen: Counter = Counter()
    unique = []
    for value in ids:
        seen[value] += 1
        unique.append(value if seen[value] == 1 else f"{value}#{seen[value]}")
    return unique
