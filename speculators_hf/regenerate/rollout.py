"""One conversation's rollout: which turns the verifier answers, what it sees, what is kept for training.

`Conversation` is a small state machine driven by an engine loop: `next_request()` renders the prompt for the next
assistant turn (token ids, with the verifier's chat template), `accept(generation)` records the answer and moves on,
`finalize()` returns the record to save. Rules:

- `--turns all`: every user turn in order, answered given the *regenerated* prefix; system turns kept; the source's
  assistant turns dropped (one with nothing to answer before it is dropped too). A trailing user turn is answered.
- `--turns last`: the source history up to the final assistant turn, then one regenerated answer.
- Reasoning (`<think>...</think>`): the history later turns see holds only the final answer, as at inference; the
  trained turn keeps the reasoning (`keep`) or not (`strip`); `disable` asks the template not to think.
- Tool calls (rows with `tools`, `tool_calls` or `tool` turns): the model's call is parsed from its answer and compared
  with the source's call; when equal, the source's cached tool results are spliced in (tools never run), otherwise the
  conversation ends with the model's call.
- A turn cut at `--max-new-tokens` is kept and marked `finish_reason: "length"` in the output (datagen trains its
  tokens, not the end-of-turn token the template appends after it: the verifier never produced one). Then
  `--after-truncation next-turn` (default) goes on to the next user turn, the cut answer in the history as a client
  would send it back; `end` ends the conversation there. `--drop-truncated` drops the cut turn and ends the
  conversation. A turn cut because the context is full (`--max-model-len`) always ends it.
- `finalize()` keeps only turns whose trained tokens round-trip through datagen's tokenisation (see `roundtrip`).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field

from ..datagen.sources import CUT
from .generation import Generation, GenerationRequest
from .roundtrip import keep_round_trip_turns
from .sampling import Sampling

THINK_END = "</think>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass
class RolloutConfig:
    """What every conversation of a run shares."""

    tokenizer: object
    sampling: Sampling
    max_new_tokens: int
    max_model_len: int
    chat_template: str | None = None
    turns: str = "all"
    reasoning: str = "keep"
    max_turns: int | None = None
    drop_truncated: bool = False
    after_truncation: str = "next-turn"  # or "end"
    lock: threading.Lock = field(default_factory=threading.Lock)  # fast tokenizers are not safe across threads


@dataclass
class Turn:
    """One regenerated assistant turn."""

    message_index: int  # its index in `Conversation.messages`
    prompt_ids: list[int]  # what the verifier was given
    token_ids: list[int]  # what it produced (the stop token included when one ended the turn)
    trained_ids: list[int]  # the produced ids kept for training (`strip`: those after the reasoning)
    finish_reason: str


@dataclass
class Conversation:
    id: str
    index: int  # position in the (shuffled, limited) source
    source: list[dict]
    config: RolloutConfig
    tools: list | None = None
    messages: list[dict] = field(default_factory=list)  # the output: trained content
    history: list[dict] = field(default_factory=list)  # what the verifier sees: reasoning stripped
    turns: list[Turn] = field(default_factory=list)
    done: bool = False
    status: str = "ok"  # ok | failed | skipped
    reason: str = ""  # why the rollout ended (or failed)
    truncated_turns: int = 0
    context_cut_turns: int = 0  # of those, cut because the context was full (--max-model-len)
    answered: int = 0  # answers accepted from the engine (written or not)
    generated_tokens: int = 0
    tool_call_stop: bool = False
    context_full: bool = False

    def __post_init__(self):
        self.tool_mode = bool(self.tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in self.source)
        self._pos = 0
        self._answering: dict | None = None  # the source assistant turn being replaced (None: a trailing user turn)
        self._prompt: list[int] | None = None
        self._limit = 0
        if not any(m["role"] == "user" for m in self.source):
            self._end("no user turn", status="skipped")
        elif self.config.turns == "last":
            self._start_last()
        else:
            self._advance()

    # ---------------------------------------------------------------------------------------------- walking

    def _add(self, message: dict) -> None:
        self.messages.append(dict(message))
        self.history.append(dict(message))

    def _needs_answer(self) -> bool:
        for message in reversed(self.history):
            if message["role"] == "assistant":
                return False
            if message["role"] in ("user", "tool"):
                return True
        return False

    def _advance(self) -> None:
        """Copy source turns until the verifier has to answer (or the source ends)."""
        while self._pos < len(self.source):
            message = self.source[self._pos]
            if message["role"] == "assistant":
                if self._needs_answer():
                    self._answering = message
                    return
                self._pos += 1  # nothing to answer before it: dropped
                continue
            self._add(message)
            self._pos += 1
        if self._needs_answer():
            self._answering = None
            return
        self._end("end of source")

    def _start_last(self) -> None:
        last = max((i for i, m in enumerate(self.source) if m["role"] == "assistant"), default=len(self.source))
        for message in self.source[:last]:
            self._add(message)
        self._pos = last
        self._answering = self.source[last] if last < len(self.source) else None
        if not self._needs_answer():
            self._end("no user turn before the last assistant turn", status="skipped")

    def _end(self, reason: str, status: str = "ok") -> None:
        self.done, self.reason, self.status = True, reason, status

    # --------------------------------------------------------------------------------------------- engine API

    def next_request(self) -> GenerationRequest | None:
        """The prompt for the next assistant turn, or None when the conversation is finished."""
        if self.done:
            return None
        c = self.config
        try:
            with c.lock:
                self._prompt = render_prompt(c.tokenizer, self.history, c.chat_template, self.tools, c.reasoning)
        except Exception as err:  # template errors (role order checks, missing variables): this row only
            self._end(f"chat template: {_first_line(err)}", status="failed")
            return None
        room = c.max_model_len - len(self._prompt)
        if room < 1:
            if not self.turns:
                self._end(f"the first prompt has {len(self._prompt)} tokens, over --max-model-len", status="failed")
            else:
                self.context_full = True
                self._end("context full (--max-model-len)")
            return None
        self._limit = min(c.max_new_tokens, room)
        return GenerationRequest(self._prompt, self._limit, c.sampling.request_seed(self.id, len(self.turns)))

    def accept(self, generation: Generation) -> None:
        """Record the verifier's answer to the last `next_request()` and move to the next turn."""
        c = self.config
        if generation.error is not None:
            self._end(f"engine: {generation.error}", status="failed")
            return
        self.answered += 1
        self.generated_tokens += len(generation.token_ids)
        ids = list(generation.token_ids)
        stopped = generation.finish_reason == "stop"
        content_ids = ids[:-1] if stopped else ids
        with c.lock:
            text = decode(c.tokenizer, content_ids)
            start = answer_start(c.tokenizer, content_ids) if c.reasoning == "strip" else 0
        answer = strip_reasoning(text)
        trained_ids = ids[start:]
        truncated = generation.finish_reason == "length"
        full = truncated and self._limit < c.max_new_tokens  # cut for want of room: nothing can follow
        if truncated:
            self.truncated_turns += 1
            self.context_full = self.context_full or full
            self.context_cut_turns += full
            if c.drop_truncated:
                self._end("truncated (turn dropped: --drop-truncated)")
                return
        message = {"role": "assistant", "content": answer if c.reasoning == "strip" else text}
        if truncated:
            message["finish_reason"] = CUT  # datagen trains no end-of-turn token after it
        self.messages.append(message)
        self.history.append({"role": "assistant", "content": answer})
        self.turns.append(Turn(len(self.messages) - 1, self._prompt, ids, trained_ids, generation.finish_reason))
        if truncated and (full or c.after_truncation == "end"):
            self._end("truncated at the token limit")
            return
        if self.tool_mode:
            expected = source_tool_calls(self._answering)
            produced = parse_tool_calls(answer)
            if (expected or produced) and produced != expected:
                self.tool_call_stop = True
                self._end("the model's tool call differs from the source's (no cached result)")
                return
        if c.turns == "last":
            self._end("last turn regenerated")
            return
        if c.max_turns is not None and len(self.turns) >= c.max_turns:
            self._end("--max-turns reached")
            return
        if self._answering is not None:
            self._pos += 1  # the source's answer is replaced
        self._advance()

    def finalize(self) -> dict:
        """The record to save: the output row, or why the conversation is not in the output; its `stats` count every
        turn the verifier answered, written or dropped (call under `config.lock`)."""
        base = {"index": self.index, "id": self.id}
        if self.status != "ok":
            return {**base, "status": self.status, "reason": self.reason, "stats": self._stats(written=False)}
        not_round_trip, why = keep_round_trip_turns(self)
        if not self.turns:
            status, reason = "truncated", self.reason
            if not self.truncated_turns:
                status, reason = "failed", f"no turn round-trips through the chat template ({why})"
            return {**base, "status": status, "reason": reason, "stats": self._stats(False, not_round_trip)}
        row = {"id": self.id, "messages": self.messages}
        if self.tools is not None:
            row["tools"] = self.tools
        return {**base, "status": "ok", "row": row, "stats": self._stats(True, not_round_trip)}

    def _stats(self, written: bool, not_round_trip: int = 0) -> dict:
        return {
            "turns": len(self.turns) if written else 0,  # in the output
            "answered": self.answered,  # answers the verifier gave: the output's turns and every dropped one
            "truncated": bool(self.truncated_turns),
            "truncated_turns": self.truncated_turns,
            "context_cut_turns": self.context_cut_turns,
            "generated_tokens": self.generated_tokens,
            "trained_tokens": sum(len(t.trained_ids) for t in self.turns) if written else 0,
            "turns_not_round_trip": not_round_trip,
            "tool_call_stop": self.tool_call_stop,
            "context_full": self.context_full,
            "end": self.reason,
        }


# -------------------------------------------------------------------------------------------------- helpers


def render_prompt(tokenizer, history: list[dict], chat_template: str | None, tools, reasoning: str) -> list[int]:
    """Token ids of `history` plus the generation prompt, as every engine receives them."""
    kwargs = {}
    if tools:
        kwargs["tools"] = tools
    if reasoning == "disable":
        kwargs["enable_thinking"] = False
    text = tokenizer.apply_chat_template(
        history, tokenize=False, add_generation_prompt=True, chat_template=chat_template, **kwargs
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def strip_reasoning(text: str) -> str:
    """The final answer: what follows the last `</think>` (the whole text when there is none)."""
    return text.rsplit(THINK_END, 1)[-1].lstrip() if THINK_END in text else text


def answer_start(tokenizer, content_ids: list[int]) -> int:
    """Index of the first answer token: after the token completing the last `</think>` and any blank tokens."""
    count = decode(tokenizer, content_ids).count(THINK_END)
    if not count:
        return 0
    lo, hi = 1, len(content_ids)
    while lo < hi:  # smallest prefix holding every `</think>`
        mid = (lo + hi) // 2
        if decode(tokenizer, content_ids[:mid]).count(THINK_END) >= count:
            hi = mid
        else:
            lo = mid + 1
    while lo < len(content_ids) and not decode(tokenizer, content_ids[lo : lo + 1]).strip():
        lo += 1
    return lo


def _json_value(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def source_tool_calls(message: dict | None) -> list[tuple]:
    """`[(name, arguments), ...]` of a source assistant turn (OpenAI `tool_calls` shape, or flat name/arguments)."""
    calls = []
    for call in (message or {}).get("tool_calls") or []:
        function = call.get("function", call)
        calls.append((function.get("name"), _json_value(function.get("arguments", function.get("parameters")))))
    return calls


def parse_tool_calls(text: str) -> list[tuple]:
    """Tool calls in a model's answer: `<tool_call>{json}</tool_call>` blocks (Hermes/Qwen), or one bare JSON object
    with a `name` (Llama 3). A block that is not JSON becomes `(None, text)`, which matches no source call."""
    blocks = _TOOL_CALL.findall(text)
    if not blocks and text.strip().startswith("{"):
        blocks = [text.strip()]
    calls = []
    for block in blocks:
        value = _json_value(block)
        if isinstance(value, dict) and "name" in value:
            calls.append((value["name"], _json_value(value.get("arguments", value.get("parameters")))))
        elif _TOOL_CALL.search(text):
            calls.append((None, block))
    return calls


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
