"""Evaluation prompts held out of a local chat file: the pipeline's default when no `--eval-prompts` is given.

The last `num_prompts` rows with distinct prompts are held out, and so is every other row with one of those prompts
(evaluating on a prompt the draft trained on would measure training data). The split is recorded and reused while
the source is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..runstate import file_signature
from ..utils import UserError, atomic_path, get_logger, write_json
from ..validation import bad_file, parse_json, read_json, read_json_if_exists
from .sources import ChatRowError, normalize_messages

logger = get_logger(__name__)


def _prompt_key(messages: list[dict]) -> str:
    """The prompt evaluation renders from a chat: every turn before the first assistant turn."""
    first = next((j for j, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return json.dumps(messages[:first], sort_keys=True)


def hold_out_prompts(source: Path, folder: Path, num_prompts: int) -> tuple[Path, Path]:
    """Split a local chat file (JSONL, or a JSON list) into training rows and evaluation prompts: its last
    `num_prompts` rows with distinct prompts are held out, and so is every other row with one of those prompts.

    Writes `folder/train_chats.jsonl` (the other rows, as they were), `folder/eval_prompts.jsonl` (`{"messages"}`
    rows) and `folder/held_out.json` (the source's hash, the held-out row numbers); an unchanged source is not split
    again. Returns `(train file, prompts file)`.
    """
    train_path, prompts_path, record_path = (
        folder / "train_chats.jsonl",
        folder / "eval_prompts.jsonl",
        folder / "held_out.json",
    )
    signature = file_signature(source)
    record = read_json_if_exists(record_path, fix="delete it (the chats are then split again)") or {}
    if (
        record.get("source") == signature
        and record.get("num_prompts") == num_prompts
        and train_path.is_file()
        and prompts_path.is_file()
    ):
        return train_path, prompts_path

    label = f"--train-data-path {source}"
    if source.stat().st_size == 0:
        raise bad_file(label, "is empty", "give a JSON/JSONL file of chats")

    def parse(line: bytes, number: int) -> dict:
        return parse_json(line, f"{label}: row {number + 1}", expect=None)

    def messages_of(chat, number: int) -> list[dict] | None:
        try:
            return normalize_messages(chat)
        except ChatRowError as err:
            raise bad_file(
                f"{label}: row {number + 1}", str(err), "each row needs `messages` (role/content)"
            ) from None

    if source.suffix == ".jsonl":  # rows by byte offset: the file is never held in memory
        with open(source, "rb") as f:
            offsets, position = [], 0
            for line in f:
                if line.strip():
                    offsets.append(position)
                position += len(line)

        def row(i: int) -> dict:
            with open(source, "rb") as f:
                f.seek(offsets[i])
                return parse(f.readline(), i)

        num_rows = len(offsets)
    else:
        rows = read_json(source, label, expect=list, fix="give a JSON list of chats, or pass --eval-prompts")
        row, num_rows = rows.__getitem__, len(rows)
    held_out: dict[str, tuple[int, list[dict]]] = {}  # prompt -> (row, messages), from the end of the file
    for i in range(num_rows - 1, -1, -1):
        messages = messages_of(row(i), i)
        if messages and messages[0]["role"] != "assistant" and _prompt_key(messages) not in held_out:
            held_out[_prompt_key(messages)] = (i, messages)
            if len(held_out) == num_prompts:
                break
    if len(held_out) < num_prompts or num_rows - len(held_out) < len(held_out):
        raise UserError(
            f"--train-data-path {source}: {num_rows} rows are too few to hold out {num_prompts} evaluation prompts "
            "and train on the rest; pass --eval-prompts (or lower --num-eval-prompts)."
        )
    held = {i for i, _ in held_out.values()}
    with atomic_path(prompts_path) as tmp, open(tmp, "w") as out:
        out.writelines(json.dumps({"messages": m}) + "\n" for _, m in sorted(held_out.values(), key=lambda r: r[0]))
    dropped = 0
    with atomic_path(train_path) as tmp, open(tmp, "wb") as out, open(source, "rb") as f:
        if source.suffix == ".jsonl":
            lines = (line for line in f if line.strip())  # numbered as `offsets` numbers them
            numbered = ((i, parse(line, i), line.rstrip(b"\r\n") + b"\n") for i, line in enumerate(lines))
        else:
            numbered = ((i, r, (json.dumps(r) + "\n").encode()) for i, r in enumerate(rows))
        for i, chat, text in numbered:
            if i in held:
                continue
            messages = messages_of(chat, i)
            if messages and _prompt_key(messages) in held_out:
                dropped += 1  # the same prompt as a held-out row: evaluating on it would measure training data
                continue
            out.write(text)
    write_json(
        record_path,
        {
            "source": signature,
            "num_rows": num_rows,
            "num_prompts": num_prompts,
            "held_out_rows": sorted(held),
            "dropped_duplicates": dropped,
        },
    )
    logger.warning(
        "[inputs] %d evaluation prompts held out of %s (rows %s, + %d rows with the same prompts) -> %s; training "
        "reads the other %d rows -> %s.",
        len(held),
        source,
        sorted(held),
        dropped,
        prompts_path,
        num_rows - len(held) - dropped,
        train_path,
    )
    return train_path, prompts_path
