"""What an evaluation reads before it runs: the prompts, and the eval card an earlier evaluation left."""

from __future__ import annotations

from pathlib import Path

from ..datagen.sources import ChatRowError, chat_turns
from ..utils import UserError, get_logger
from ..validation import bad_file, parse_json, read_json_if_exists, type_name
from .arguments import EvaluateArguments
from .card import EVAL_CARD_JSON

logger = get_logger(__name__)


def load_prompts(path: str | Path, tokenizer, num_prompts: int, offset: int = 0) -> list[list[int]]:
    """Prompt token ids from a chat JSONL file.

    Each row is `{"messages": [...]}` (the conversation up to its first assistant turn, rendered with the chat template
    and the generation prompt), `{"prompt": "text"}` or `{"prompt_token_ids": [...]}`. Rows `offset..offset+n-1`:
    use an offset past the training rows for held-out prompts. A row of another shape is a one-line error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path} does not exist (a JSONL file of {{'messages': [...]}} rows).")
    fix = (
        'each row is {"messages": [{"role": ..., "content": ...}]}, {"prompt": "text"} or {"prompt_token_ids": [...]}'
    )
    if path.stat().st_size == 0:
        raise bad_file(f"--prompts {path}", "is empty", fix)
    prompts = []
    for i, line in enumerate(_lines(path)):  # streamed: a large chat file may serve as prompts with an offset
        if i < offset or not line.strip():
            continue
        label = f"--prompts {path}: row {i + 1}"
        row = parse_json(line, label, dict, fix)
        if "prompt_token_ids" in row:
            ids = row["prompt_token_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise bad_file(label, "prompt_token_ids is not a non-empty list of token ids", fix)
            prompts.append(list(ids))
        elif "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise bad_file(label, f"prompt is {type_name(row['prompt'])}, expected text", fix)
            prompts.append(tokenizer(row["prompt"])["input_ids"])
        elif "messages" in row:
            try:
                turns = chat_turns({"messages": row["messages"]}) or []
            except ChatRowError as err:
                raise bad_file(label, str(err), fix) from None
            if any(not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str) for m in turns):
                raise bad_file(label, "a turn has no role or content", fix)
            first = next((j for j, m in enumerate(turns) if m["role"] == "assistant"), len(turns))
            if first == 0:
                continue
            prompts.append(
                tokenizer.apply_chat_template(
                    turns[:first], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        else:
            raise bad_file(label, "has none of 'messages', 'prompt' or 'prompt_token_ids'", fix)
        if len(prompts) == num_prompts:
            break
    if not prompts:
        raise UserError(f"--prompts {path} gave no prompts (offset {offset}).")
    return prompts


def _lines(path: Path):
    with open(path, "rb") as f:
        yield from f


def previous_card(folder: str | Path) -> dict | None:
    """The eval card already in `folder`, if any (checked: the parts a later evaluation reads or carries over)."""
    path = Path(folder) / EVAL_CARD_JSON
    fix = "delete it (an earlier evaluation's card) or evaluate into another --output-dir"
    card = read_json_if_exists(path, fix=fix)
    if card is None:
        return None
    grid = card.get("grid")
    parts = {
        "dataset": card.get("dataset"),
        "grid": grid,
        "grid.dataset": grid.get("dataset") if isinstance(grid, dict) else None,
    }
    for name, value in parts.items():
        if value is not None and not isinstance(value, dict):
            raise bad_file(str(path), f'"{name}" holds {type_name(value)}, expected an object', fix)
    runs = card.get("runs")
    if runs is not None and not (isinstance(runs, list) and all(isinstance(r, dict) for r in runs)):
        raise bad_file(str(path), '"runs" is not a list of objects', fix)
    return card


def default_prompts(args: EvaluateArguments, previous: dict | None) -> tuple[str, int]:
    """`(prompts file, offset)`: `--prompts`, else the held-out prompts named by the eval card in the output folder or
    the draft's folder (the pipeline's evaluate stage writes one naming its held-out chats)."""
    if args.prompts:
        return args.prompts, args.prompt_offset
    for card in (previous, previous_card(args.draft)):
        for dataset in ((card or {}).get("dataset"), ((card or {}).get("grid") or {}).get("dataset")):
            if dataset and dataset.get("path") and Path(dataset["path"]).is_file():
                logger.warning("--prompts: the held-out prompts of the previous evaluation, %s.", dataset["path"])
                return dataset["path"], int(dataset.get("offset") or 0)
    raise UserError(
        f"--prompts is needed: no eval card in {args.output_dir or args.draft} names held-out prompts (a chat JSONL "
        "file of {'messages': [...]} rows the draft was not trained on)."
    )
