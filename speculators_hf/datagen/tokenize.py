"""Chat template -> `input_ids` + an assistant-only `loss_mask`, as a fingerprint-cached `datasets.map`.

The mask does not rely on `{% generation %}` (most released templates lack it and silently give all-zero masks).
Each assistant turn `j` spans the text between `render(messages[:j], add_generation_prompt=True)` and
`render(messages[:j + 1])`; both must be prefixes of the full rendering. The full rendering is tokenized once (these
are the ids vLLM sees); the text is also tokenized segment by segment, and when the concatenation equals the full
tokenization the mask follows the segments exactly. Otherwise (a token merges across a turn boundary) the mask comes
from the fast tokenizer's character offsets (a token that overlaps an assistant turn is supervised), and the sample is
counted in `boundary_merges`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

from datasets import Dataset

from ..utils import UserError, get_logger
from .sources import normalize_messages

logger = get_logger(__name__)

TOKENIZE_VERSION = 1  # bump when the function below changes what it produces, so old caches are not reused
_EMPTY_THINK = re.compile(r"\s*<think>\s*</think>\s*")  # an empty reasoning block is not supervised


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, chat_template: str | None = None) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
    )


def assistant_spans(tokenizer, messages: list[dict], chat_template: str | None = None) -> tuple[str, list[tuple]]:
    """The full rendering and the `(start, end)` character spans of its assistant turns."""
    full = render(tokenizer, messages, False, chat_template)
    spans = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:j], True, chat_template) if j else ""
        through = render(tokenizer, messages[: j + 1], False, chat_template)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise ValueError("the template does not render conversation prefixes as prefixes of the full chat")
        start = len(before)
        think = _EMPTY_THINK.match(full, start, len(through))
        spans.append((think.end() if think else start, len(through)))
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], seq_length: int, chat_template: str | None = None) -> dict:
    """One chat -> `{"input_ids", "loss_mask", "num_tokens", "skip_reason", "boundary_merge"}`, truncated."""
    try:
        full, spans = assistant_spans(tokenizer, messages, chat_template)
    except Exception as err:  # template errors (e.g. role order checks) skip the sample; they are counted
        return _skipped(f"template: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    if not spans:
        return _skipped("no assistant turn")
    input_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    cuts = sorted({0, len(full), *(c for span in spans for c in span)})
    segment_ids, segment_mask = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        ids = tokenizer(full[a:b], add_special_tokens=False)["input_ids"] if b > a else []
        inside = any(s <= a and b <= e for s, e in spans)
        segment_ids += ids
        segment_mask += [int(inside)] * len(ids)
    boundary_merge = segment_ids != input_ids
    if not boundary_merge:
        loss_mask = segment_mask
    elif getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        loss_mask = [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]  # overlaps an assistant turn
    else:
        return _skipped("tokens merge across a turn boundary (slow tokenizer: no offsets)")
    input_ids, loss_mask = input_ids[:seq_length], loss_mask[:seq_length]
    if not any(loss_mask):
        return _skipped("no assistant tokens within --seq-length")
    return {
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "num_tokens": len(input_ids),
        "skip_reason": "",
        "boundary_merge": boundary_merge,
    }


def _skipped(reason: str) -> dict:
    return {"input_ids": [], "loss_mask": [], "num_tokens": 0, "skip_reason": reason, "boundary_merge": False}


def tokenizer_fingerprint(tokenizer, chat_template: str | None) -> str:
    """A hash of everything about the tokenizer that changes the tokens: vocab, merges, specials, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()
    )
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update((chat_template or tokenizer.chat_template or "").encode())
    return h.hexdigest()[:16]


def _map_batch(batch: dict, tokenizer, seq_length: int, chat_template: str | None) -> dict:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out = {"input_ids": [], "loss_mask": [], "num_tokens": [], "skip_reason": [], "boundary_merge": []}
    for row in rows:
        messages = normalize_messages(row)
        result = (
            tokenize_conversation(tokenizer, messages, seq_length, chat_template)
            if messages
            else _skipped("unknown roles or empty conversation")
        )
        for key in out:
            out[key].append(result[key])
    return out


def tokenize_dataset(
    dataset: Dataset, tokenizer, seq_length: int, chat_template: str | None = None, cache_dir: str | None = None
) -> tuple[Dataset, dict]:
    """Tokenize every chat; returns the tokenized dataset (one row per input row, skipped rows empty) and stats.

    The result is cached under `<cache_dir>/speculators_hf/tokenized-<fingerprint>.arrow`; the fingerprint covers the
    input dataset's own fingerprint, the tokenizer, the chat template, `seq_length` and this module's version.
    """
    import datasets

    fingerprint = hashlib.sha256(
        json.dumps(
            [
                dataset._fingerprint,
                tokenizer_fingerprint(tokenizer, chat_template),
                seq_length,
                TOKENIZE_VERSION,
            ]
        ).encode()
    ).hexdigest()[:16]
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "speculators_hf"
    root.mkdir(parents=True, exist_ok=True)
    cache_file = root / f"tokenized-{fingerprint}.arrow"
    cache_hit = cache_file.exists()
    tokenized = dataset.map(
        _map_batch,
        fn_kwargs={"tokenizer": tokenizer, "seq_length": seq_length, "chat_template": chat_template},
        batched=True,
        batch_size=256,
        remove_columns=dataset.column_names,
        new_fingerprint=fingerprint,
        cache_file_name=str(cache_file),
        load_from_cache_file=True,
        desc="Tokenizing chats",
    )
    reasons = Counter(r for r in tokenized["skip_reason"] if r)
    stats = {
        "fingerprint": fingerprint,
        "cache_file": str(cache_file),
        "cache_hit": cache_hit,
        "num_rows": len(tokenized),
        "num_skipped": sum(reasons.values()),
        "skip_reasons": dict(reasons),
        "boundary_merges": int(sum(tokenized["boundary_merge"])),
    }
    if stats["num_skipped"] == len(tokenized):
        raise UserError(_all_skipped_message(dataset, tokenizer, chat_template, reasons))
    logger.info(
        "Tokenized %d chats (%d skipped, cache %s): %s",
        len(tokenized),
        stats["num_skipped"],
        "hit" if cache_hit else "miss",
        os.fspath(cache_file),
    )
    return tokenized, stats


def _all_skipped_message(dataset: Dataset, tokenizer, chat_template: str | None, reasons: Counter) -> str:
    sample = ""
    messages = normalize_messages(dataset[0]) if len(dataset) else None
    if messages:
        try:
            sample = render(tokenizer, messages, False, chat_template)[:160]
        except Exception as err:
            sample = f"<template error: {err}>"
    roles = sorted({m["role"] for m in messages}) if messages else []
    return (
        f"all {len(dataset)} chats were skipped ({dict(reasons)}); the first has roles {roles} and the template "
        f"rendered {sample!r}. Check that chats have assistant turns (roles user/assistant, or ShareGPT human/gpt) "
        "and that the chat template renders them, or pass --chat-template."
    )
