"""The round trip: the tokens datagen will train on must be the tokens the verifier produced, in the context it saw.

datagen re-renders a saved conversation with the chat template and masks each assistant turn (`tokenize_conversation`).
Templates may render history differently from what was generated: Qwen3 drops the reasoning of earlier turns and adds
an empty `<think></think>` to the last one; a byte-level BPE may tokenise decoded text into other ids than sampled.
So every regenerated conversation is tokenised here exactly as datagen will, and turn `j` round-trips when

- the tokens before its span are exactly the prompt the verifier was given (the context matches), and
- its masked span starts there and begins with the ids the verifier produced (`--reasoning strip`: the answer ids,
  after datagen's own skip of an inserted empty `<think></think>`).

The span ends where the produced ids end: at the stop token (`<|im_end|>`), or, for a turn cut at the token limit
(marked `finish_reason: "length"`), at its last token; what a template appends after that is never generated and not
trained.
A turn that does not round-trip is first retried without the turns after it (a template may render an earlier turn
differently once a later one follows: Qwen3 drops its reasoning); if it still fails it is cut off with everything
after it. Cut turns are counted.
"""

from __future__ import annotations

from ..datagen.tokenize import tokenize_conversation

NO_LIMIT = 1 << 62


def first_failing_turn(conversation) -> tuple[int | None, str]:
    """`(index of the first turn that does not round-trip, why)`, or `(None, "")` when all do."""
    c = conversation.config
    end = conversation.turns[-1].message_index + 1
    result = tokenize_conversation(
        c.tokenizer, conversation.messages[:end], NO_LIMIT, c.chat_template, conversation.tools
    )
    if result["skip_reason"]:
        return len(conversation.turns) - 1, result["skip_reason"]
    ids, mask = result["input_ids"], result["loss_mask"]
    exact_start = c.reasoning != "strip"
    for j, turn in enumerate(conversation.turns):
        n, expected = len(turn.prompt_ids), turn.trained_ids
        if ids[:n] != turn.prompt_ids:
            return j, "the template renders this turn's context differently from the prompt the verifier saw"
        start = n
        while not exact_start and start < len(mask) and not mask[start]:
            start += 1
        stop = start + len(expected)
        if (
            (n and mask[n - 1])
            or ids[start:stop] != expected
            or not all(mask[start:stop])
            or any(mask[stop : stop + 1])
        ):
            return j, "the template or tokenizer turns the generated answer into other tokens"
    return None, ""


def keep_round_trip_turns(conversation) -> tuple[int, str]:
    """Cut `conversation` after its last turn that round-trips (re-checking after each cut, since the rendering of
    earlier turns may depend on what follows). Returns `(turns removed, the first reason)`."""
    removed, first_reason = 0, ""
    while conversation.turns:
        bad, why = first_failing_turn(conversation)
        if bad is None:
            break
        first_reason = first_reason or why
        # A later turn may change how this one renders: end the conversation with it first, then without it.
        keep = bad + 1 if bad < len(conversation.turns) - 1 else bad
        removed += len(conversation.turns) - keep
        if keep:
            del conversation.messages[conversation.turns[keep - 1].message_index + 1 :]
        del conversation.turns[keep:]
    return removed, first_reason
