"""What a regenerate run produced: `RegenerateResult` (returned by `run`, recorded by the run state), the counts over
every record, the provenance written beside the output, and the summary line."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

from ..datagen.metadata import package_versions
from ..formats.provenance import CONFIG_VERSION, PROMPTS
from .engines import resolve_backend_name
from .plan import Plan


@dataclass
class RegenerateResult:
    """Counts cover the whole output (earlier, resumed runs included); `this_run_*`, `tokens_per_second`, `seconds`
    and `engine` cover this run only. regenerated + truncated + failed + skipped == conversations."""

    output_path: str  # the chats datagen reads (a .jsonl file or a save_to_disk folder)
    provenance_path: str  # what produced them (`regenerate_config.json`)
    failures_path: str  # every conversation not in the output, with why
    conversations: int = 0  # in the source, after --shuffle and --max-samples
    written: int = 0  # conversations in the output
    regenerated: int = 0  # written, no turn cut at the token limit
    truncated: int = 0  # ended at the token limit (written, or dropped with --drop-truncated)
    failed: int = 0
    skipped: int = 0
    turns: int = 0  # assistant turns in the output
    dropped_turns: int = 0  # answered by the verifier but not in the output (cut, dropped, or in a failed chat)
    turns_not_round_trip: int = 0  # of those, cut because they do not round-trip through the chat template
    truncated_turns: int = 0  # cut at the token limit (--max-new-tokens, or a full context), written or not
    answered_turns: int = 0  # every answer the verifier gave (turns + dropped_turns)
    context_cut_turns: int = 0  # of the truncated turns, those cut because the context was full (--max-model-len)
    tool_call_stops: int = 0
    context_full: int = 0
    generated_tokens: int = 0  # by the verifier, over every conversation
    trained_tokens: int = 0  # of those, in the output's assistant turns
    engine: str | None = None  # "<engine> <version>" of this run (None when there was nothing left to generate)
    engines: dict = field(default_factory=dict)  # conversations in the output per engine, over every run
    this_run_conversations: int = 0
    this_run_generated_tokens: int = 0
    tokens_per_second: float = 0.0  # generated tokens per second of this run
    seconds: float = 0.0  # this run's generation time
    reused: bool = False  # True: the recorded result of a finished run with the same inputs (nothing ran)
    max_model_len: int | None = None  # the longest conversation this run allowed
    max_new_tokens: int | None = None
    replicas: int = 1
    reasons: dict = field(default_factory=dict)  # why conversations are not in the output (the 10 most common)

    @classmethod
    def from_record(cls, record) -> RegenerateResult | None:
        """Rebuilt from what the run state recorded (keys of other versions ignored); None if it is not one."""
        if not isinstance(record, dict) or not {"output_path", "provenance_path", "failures_path"} <= set(record):
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})

    def line(self) -> str:
        """The one summary line of a finished run."""
        return (
            f"regenerate complete: {self.conversations} conversations -> {self.regenerated} regenerated, "
            f"{self.truncated} truncated, {self.failed} failed, {self.skipped} skipped; {self.turns} turns written, "
            f"{self.dropped_turns} dropped ({self.turns_not_round_trip} cut: not round-tripping through the "
            f"template); {self.truncated_turns} of {self.answered_turns} answered turns "
            f"({100 * self.truncated_turns / max(self.answered_turns, 1):.1f}%) cut at --max-new-tokens "
            f"{self.max_new_tokens} ({self.context_cut_turns} for want of context), {self.tool_call_stops} tool-call "
            f"stops; {self.tokens_per_second:.0f} generated tokens/s this run ({self.engine or 'nothing to generate'})"
            f" -> {self.output_path}"
        )


def summarize(records) -> dict:
    """Counts over every record (the `counts` of the provenance): regenerated + truncated + failed + skipped ==
    conversations, and every turn the verifier answered is written or counted as dropped. One pass over `records`
    (an iterable: a large run's records are streamed from disk)."""
    statuses, reasons, engines = Counter(), Counter(), Counter()
    every = dict.fromkeys(
        ("answered", "truncated_turns", "context_cut_turns", "turns_not_round_trip", "generated_tokens"), 0
    )
    written = dict.fromkeys(("turns", "tool_call_stop", "context_full", "trained_tokens"), 0)
    conversations = ok = truncated_written = 0
    for r in records:
        conversations += 1
        stats = r.get("stats", {})
        statuses[r["status"]] += 1
        for key in every:
            every[key] += stats.get(key, 0)
        if r["status"] == "ok":
            ok += 1
            truncated_written += r["stats"]["truncated"]
            for key in written:
                written[key] += stats.get(key, 0)
            engines[r.get("engine")] += 1
        else:
            reasons[r["reason"][:120]] += 1
    return {
        "conversations": conversations,
        "written": ok,
        "regenerated": ok - truncated_written,
        "truncated": truncated_written + statuses["truncated"],
        "failed": statuses["failed"],
        "skipped": statuses["skipped"],
        "turns": int(written["turns"]),
        "dropped_turns": int(every["answered"]) - int(written["turns"]),
        "truncated_turns": int(every["truncated_turns"]),
        "answered_turns": int(every["answered"]),
        "context_cut_turns": int(every["context_cut_turns"]),
        "turns_not_round_trip": int(every["turns_not_round_trip"]),
        "tool_call_stops": int(written["tool_call_stop"]),
        "context_full": int(written["context_full"]),
        "generated_tokens": int(every["generated_tokens"]),
        "trained_tokens": int(written["trained_tokens"]),
        "engines": dict(engines),
        "reasons": dict(reasons.most_common(10)),
    }


def make_result(plan: Plan, summary: dict, this_run: dict) -> RegenerateResult:
    layout = plan.layout
    counts = {k: v for k, v in summary.items() if k != "this_run"}
    return RegenerateResult(
        output_path=str(layout.output),
        provenance_path=str(layout.config),
        failures_path=str(layout.failures),
        **counts,
        engine=this_run["engine"],
        this_run_conversations=this_run["conversations"],
        this_run_generated_tokens=this_run["generated_tokens"],
        tokens_per_second=round(this_run["generated_tokens"] / max(this_run["seconds"], 1e-9), 1),
        seconds=this_run["seconds"],
        max_model_len=this_run.get("max_model_len"),
        max_new_tokens=plan.args.max_new_tokens,
        replicas=this_run.get("replicas", 1),
    )


def provenance_record(plan: Plan, summary: dict, result: RegenerateResult) -> dict:
    """`regenerate_config.json` (its `output` section is added when the output is written)."""
    args = plan.args
    this_run = {
        "conversations": result.this_run_conversations,
        "generated_tokens": result.this_run_generated_tokens,
        "seconds": result.seconds,
        "engine": result.engine,
        "max_model_len": result.max_model_len,
        "tokens_per_second": result.tokens_per_second,
    }
    return {
        "version": CONFIG_VERSION,
        "status": "complete",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fingerprint": plan.fingerprint,
        "verifier": plan.verifier,
        "engine": {
            "backend": resolve_backend_name(args),
            "used": summary["engines"],
            "server_urls": args.server_url,
            "tensor_parallel_size": args.tensor_parallel_size,
            "data_parallel_size": args.data_parallel_size,
            "dtype": plan.dtype,
        },
        "prompts": PROMPTS,
        "sampling": plan.sampling.record(),
        "limits": {
            "max_new_tokens": args.max_new_tokens,
            "max_model_len": args.max_model_len,
            "max_model_len_used": result.max_model_len,
            "max_turns": args.max_turns,
            "max_samples": args.max_samples,
            "turns": args.turns,
            "reasoning": args.reasoning,
            "drop_truncated": args.drop_truncated,
            "after_truncation": args.after_truncation,
            "shuffle": args.shuffle,
            "seed": args.seed,
        },
        "source": plan.source,
        "counts": {**summary, "this_run": this_run},
        "package_versions": package_versions(),
        "arguments": {k: v for k, v in asdict(args).items() if k != "server_api_key"},  # a secret: not recorded
    }
