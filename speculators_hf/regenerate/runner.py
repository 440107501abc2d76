"""`regenerate(args)`: chat source -> rollouts with the verifier -> a chat file datagen reads; resumable and atomic.

Two drivers share the `Conversation` state machine: in-process engines (transformers, vLLM) roll out `--chunk-size`
chats together, one `generate` call per turn depth (vLLM batches them continuously); `--server-url` runs each chat's
turns in its own worker, `--concurrency` of them at a time, so the servers always have requests of every depth.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..replicas import run_replicas
from ..utils import UserError, get_logger, write_json
from ..validation import describe, read_json, read_json_if_exists
from .arguments import RegenerateArguments
from .engines import Engine, make_engine, resolve_backend_name
from .provenance import CONFIG_VERSION, PROMPTS
from .rollout import Conversation, RolloutConfig
from .sampling import Sampling, resolve_sampling
from .sources import conversation_ids, source_conversation
from .writer import OutputLayout, PartialStore, read_records, remove_outputs, write_final

logger = get_logger(__name__)

# Flags that do not change what is generated, so a run may resume with other values.
NOT_FINGERPRINTED = (
    "output_path",
    "backend",
    "server_url",
    "server_api_key",
    "concurrency",
    "request_timeout",
    "max_retries",
    "retry_backoff",
    "tensor_parallel_size",
    "data_parallel_size",
    "gpu_memory_utilization",
    "batch_size",
    "chunk_size",
    "cache_dir",
    "overwrite",
    "rank",
    "world_size",
)


@dataclass
class Plan:
    args: RegenerateArguments
    layout: OutputLayout
    tokenizer: object
    model_config: object  # the verifier's text config
    verifier: dict
    dtype: str
    chat_template: str | None
    sampling: Sampling
    dataset: object  # datasets.Dataset: the source rows, shuffled and limited
    ids: list[str]
    source: dict
    fingerprint: str

    def conversation(self, index: int, config: RolloutConfig) -> Conversation:
        with config.lock:
            messages, tools = source_conversation(self.dataset[index])
        if messages is None:
            conv = Conversation(self.ids[index], index, [], config)
            conv.reason, conv.status = "unknown roles or empty conversation", "skipped"
            return conv
        return Conversation(self.ids[index], index, messages, config, tools=tools)


def prepare(args: RegenerateArguments) -> Plan:
    """Everything before an engine starts: verifier config and tokenizer, sampling, the source. Writes nothing."""
    from transformers import AutoConfig, AutoTokenizer

    from ..datagen.builder import _read_chat_template
    from ..datagen.metadata import resolve_dtype
    from ..datagen.sources import load_source
    from ..datagen.tokenize import tokenizer_fingerprint

    path = args.target_model_path
    try:
        config = AutoConfig.from_pretrained(path, revision=args.revision)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=args.revision)
    except Exception as err:
        problem = f"cannot load its config and tokenizer ({describe(err)})"
        raise UserError(f"--target-model-path {path}: {problem}.") from err
    from ..modeling.verifier_weights import check_verifier_weights

    check_verifier_weights(path, "--target-model-path")
    text_config = config.get_text_config()
    chat_template = _read_chat_template(args.chat_template)
    if chat_template is None and not tokenizer.chat_template:
        raise UserError(f"The tokenizer of {path} has no chat template: pass --chat-template.")
    config_dtype = getattr(text_config, "dtype", None) or getattr(config, "dtype", None)
    verifier = {
        "name_or_path": path,
        "revision": args.revision,
        "commit_hash": getattr(config, "_commit_hash", None),
        "architectures": list(getattr(config, "architectures", None) or []),
        "config_sha256": hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16],
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer, chat_template),
        "dtype": str(config_dtype).replace("torch.", "") if config_dtype is not None else None,
    }
    dtype = resolve_dtype(args.dtype, verifier)

    dataset = load_source(args.train_data_path, split=args.split, cache_dir=args.cache_dir)
    num_rows = len(dataset)
    if args.shuffle:
        dataset = dataset.shuffle(seed=args.seed)
    if args.max_samples is not None and args.max_samples < len(dataset):
        dataset = dataset.select(range(args.max_samples))
    source = {
        "train_data_path": args.train_data_path,
        "split": args.split,
        "num_rows": num_rows,
        "used_rows": len(dataset),
        "fingerprint": dataset._fingerprint,
    }
    if Path(args.train_data_path).is_file():
        from .writer import file_sha256

        source["sha256"] = file_sha256(Path(args.train_data_path))
    sampling = resolve_sampling(args, tokenizer, text_config)
    ids = conversation_ids(dataset)
    kept = {k: v for k, v in asdict(args).items() if k not in NOT_FINGERPRINTED}
    fingerprint = hashlib.sha256(
        json.dumps(
            [CONFIG_VERSION, kept, verifier, dtype, sampling.record(), source["fingerprint"], source.get("sha256")],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:16]
    layout = OutputLayout(Path(args.output_path))
    return Plan(
        args,
        layout,
        tokenizer,
        text_config,
        verifier,
        dtype,
        chat_template,
        sampling,
        dataset,
        ids,
        source,
        fingerprint,
    )


# ------------------------------------------------------------------------------------------------- the run


def regenerate(args: RegenerateArguments, engine: Engine | None = None) -> dict:
    """Regenerate (or resume, or skip when already complete); returns the summary also stored in the provenance.

    Args:
        args (`RegenerateArguments`): the flags.
        engine (`Engine`, *optional*): an already started engine to use (and not close), e.g. one vLLM engine shared
            by several runs; by default one is made from `--backend` / `--server-url`.
    """
    plan = prepare(args)
    coordinator = args.world_size == 1
    if coordinator:
        finished = _finished_summary(plan)
        if finished is not None:
            return finished
        _claim(plan)
    records = read_records(plan.layout)
    todo = [i for i, cid in enumerate(plan.ids) if i % args.world_size == args.rank and cid not in records]
    if records and coordinator:
        logger.warning(
            "Resuming %s: %d of %d conversations already done.", plan.layout.output, len(records), len(plan.ids)
        )
    this_run = {"conversations": 0, "generated_tokens": 0, "seconds": 0.0, "engine": None}
    try:
        if todo and args.data_parallel_size > 1:
            this_run = _run_replicas(args, plan.layout)
        elif todo:
            this_run = _run(plan, todo, engine)
    except BaseException:
        if coordinator and not read_records(plan.layout):
            shutil.rmtree(plan.layout.partial, ignore_errors=True)  # nothing done: leave nothing behind
        raise
    if not coordinator:
        write_json(plan.layout.partial / f"run-{args.rank:03d}.json", this_run)
        return this_run
    records = read_records(plan.layout)
    missing = [cid for cid in plan.ids if cid not in records]
    if missing:
        raise RuntimeError(f"{len(missing)} conversations not regenerated (e.g. {missing[0]!r}); rerun to resume.")
    summary = summarize(records.values())
    summary["this_run"] = {
        **this_run,
        "tokens_per_second": round(this_run["generated_tokens"] / max(this_run["seconds"], 1e-9), 1),
    }
    output = write_final(plan.layout, list(records.values()), provenance(plan, summary, records.values()))
    _log_summary(summary, output)
    return summary


def _run(plan: Plan, todo: list[int], engine: Engine | None) -> dict:
    args = plan.args
    owned = engine is None
    if owned:
        engine = make_engine(args, plan.sampling, plan.dtype, plan.model_config)
    max_model_len = min(x for x in (args.max_model_len, engine.max_model_len) if x) if engine.max_model_len else None
    max_model_len = max_model_len or args.max_model_len or getattr(plan.model_config, "max_position_embeddings", 2048)
    config = RolloutConfig(
        tokenizer=plan.tokenizer,
        sampling=plan.sampling,
        max_new_tokens=args.max_new_tokens,
        max_model_len=max_model_len,
        chat_template=plan.chat_template,
        turns=args.turns,
        reasoning=args.reasoning,
        max_turns=args.max_turns,
        drop_truncated=args.drop_truncated,
    )
    store = PartialStore(plan.layout, args.rank).open()
    progress = Progress(len(todo), f"Regenerating ({engine.name})", disable=args.rank != 0)
    engine_label = f"{engine.name} {engine.version}"
    try:
        if engine.name == "vllm-server":
            _drive_threaded(plan, engine, config, todo, store, progress, engine_label)
        else:
            _drive_batched(plan, engine, config, todo, store, progress, engine_label)
    finally:
        progress.close()
        store.close()
        if owned:
            engine.close()
    return {
        "conversations": progress.done,
        "generated_tokens": progress.tokens,
        "seconds": round(progress.elapsed, 3),
        "engine": engine_label,
        "max_model_len": max_model_len,
    }


class Progress:
    """A tqdm bar over conversations with the generated tokens/s (thread-safe)."""

    def __init__(self, total: int, desc: str, disable: bool = False):
        self.bar = tqdm(total=total, unit="chat", desc=desc, disable=disable)
        self.start = time.perf_counter()
        self.done = self.tokens = 0
        self._lock = threading.Lock()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.tokens += n
            self.bar.set_postfix_str(f"{self.tokens / max(self.elapsed, 1e-9):.0f} tok/s", refresh=False)

    def finished(self) -> None:
        with self._lock:
            self.done += 1
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _drive_batched(plan, engine, config, todo, store, progress, engine_label) -> None:
    """In-process engines: `--chunk-size` chats at once, one `generate` per turn depth."""
    size = plan.args.chunk_size
    for start in range(0, len(todo), size):
        active = [plan.conversation(i, config) for i in todo[start : start + size]]
        while active:
            pending = [(c, c.next_request()) for c in active]
            live = [(c, r) for c, r in pending if r is not None]
            if live:
                generations = engine.generate([r for _, r in live])
                for (conv, _), generation in zip(live, generations):
                    before = conv.generated_tokens
                    conv.accept(generation)
                    progress.add_tokens(conv.generated_tokens - before)
            for conv in active:
                if conv.done:
                    store.write(_record(conv, engine_label))
                    progress.finished()
            active = [c for c in active if not c.done]


def _drive_threaded(plan, engine, config, todo, store, progress, engine_label) -> None:
    """Servers: each chat's turns in a worker; `--concurrency` chats (= requests) in flight."""
    stop = threading.Event()
    errors: list[BaseException] = []
    slots = threading.Semaphore(2 * plan.args.concurrency)

    def work(index: int) -> None:
        try:
            if stop.is_set():
                return
            conv = plan.conversation(index, config)
            while not conv.done:
                request = conv.next_request()
                if request is None:
                    break
                generation = engine.complete(request)
                conv.accept(generation)
                progress.add_tokens(len(generation.token_ids))
                if stop.is_set():
                    return  # abandoned: regenerated again on resume
            store.write(_record(conv, engine_label))
            progress.finished()
        except BaseException as err:  # noqa: B036 - handed to the main thread
            errors.append(err)
            stop.set()
        finally:
            slots.release()

    with ThreadPoolExecutor(plan.args.concurrency) as pool:
        for index in todo:
            slots.acquire()
            if stop.is_set():
                slots.release()
                break
            pool.submit(work, index)
    if errors:
        raise errors[0]


def _record(conv: Conversation, engine_label: str) -> dict:
    with conv.config.lock:
        record = conv.finalize()
    if record["status"] == "ok":
        record["engine"] = engine_label
    return record


def _run_replicas(args: RegenerateArguments, layout: OutputLayout) -> dict:
    """`--data-parallel-size N`: N worker processes on this machine, each with its own GPUs and chats."""
    n = args.data_parallel_size
    children = [{"data_parallel_size": 1, "rank": i, "world_size": n, "overwrite": False} for i in range(n)]
    failed = run_replicas("speculators_hf.regenerate", args, children, args.tensor_parallel_size)
    if failed:
        raise UserError(f"regenerate replicas {failed} failed (see above); rerun the same command to resume.")
    runs = [read_json(layout.partial / f"run-{i:03d}.json", fix="rerun the same command") for i in range(n)]
    return {
        "conversations": sum(r["conversations"] for r in runs),
        "generated_tokens": sum(r["generated_tokens"] for r in runs),
        "seconds": max(r["seconds"] for r in runs),
        "engine": next((r["engine"] for r in runs if r["engine"]), None),
        "max_model_len": next((r.get("max_model_len") for r in runs if r.get("max_model_len")), None),
        "replicas": n,
    }


# ------------------------------------------------------------------------------------- bookkeeping and records


def _finished_summary(plan: Plan) -> dict | None:
    """The summary of a complete earlier run with the same fingerprint (nothing to do), else None."""
    layout, args = plan.layout, plan.args
    fix = f"delete it, or pass --overwrite to regenerate {layout.output}"
    config = None if args.overwrite else read_json_if_exists(layout.config, fix=fix)
    if config is not None and layout.output.exists() and config.get("fingerprint") == plan.fingerprint:
        if not isinstance(config.get("counts"), dict):
            raise UserError(f"{layout.config}: has no counts; {fix}.")
        if not args.overwrite:
            shutil.rmtree(layout.partial, ignore_errors=True)  # left by a kill just before its removal
            logger.warning("%s is complete with the same flags and inputs: nothing to do.", layout.output)
            return config["counts"]
    state = None if args.overwrite else _read_state(layout)
    finishing = state is not None and state.get("fingerprint") == plan.fingerprint  # killed while writing the end
    if layout.output.exists() and not args.overwrite and not finishing:
        why = "other flags or inputs" if config is not None else "no regenerate_config.json"
        raise UserError(
            f"--output-path {layout.output} exists ({why}); use another --output-path or --overwrite to replace it."
        )
    return None


def _claim(plan: Plan) -> None:
    """Start or resume the partial folder; refuse one written with other flags (unless --overwrite)."""
    layout = plan.layout
    state = None if plan.args.overwrite else _read_state(layout)
    if plan.args.overwrite or (state is not None and state.get("fingerprint") != plan.fingerprint):
        if state is not None and not plan.args.overwrite:
            raise UserError(
                f"{layout.partial} holds an unfinished run with other flags or inputs (fingerprint "
                f"{state.get('fingerprint')} != {plan.fingerprint}); rerun with those flags, or pass --overwrite."
            )
        remove_outputs(layout)
        state = None
    if state is None:
        write_json(layout.state, {"fingerprint": plan.fingerprint, "arguments": _recorded(plan.args)})


def _read_state(layout: OutputLayout) -> dict | None:
    """The unfinished run's `state.json` (None when there is none)."""
    return read_json_if_exists(layout.state, fix=f"delete {layout.partial}, or pass --overwrite to start over")


def summarize(records) -> dict:
    """Counts over every record: regenerated + truncated + failed + skipped == conversations."""
    records = list(records)
    statuses = Counter(r["status"] for r in records)
    ok = [r for r in records if r["status"] == "ok"]
    truncated_written = sum(r["stats"]["truncated"] for r in ok)

    def total(key: str) -> int:
        return int(sum(r["stats"][key] for r in ok))

    reasons = Counter(r["reason"][:120] for r in records if r["status"] != "ok")
    return {
        "conversations": len(records),
        "written": len(ok),
        "regenerated": len(ok) - truncated_written,
        "truncated": truncated_written + statuses["truncated"],
        "failed": statuses["failed"],
        "skipped": statuses["skipped"],
        "turns": total("turns"),
        "truncated_turns": total("truncated_turns") + statuses["truncated"],
        "turns_not_round_trip": total("turns_not_round_trip"),
        "tool_call_stops": total("tool_call_stop"),
        "context_full": total("context_full"),
        "generated_tokens": total("generated_tokens"),
        "trained_tokens": total("trained_tokens"),
        "engines": dict(Counter(r.get("engine") for r in ok)),
        "reasons": dict(reasons.most_common(10)),
    }


def provenance(plan: Plan, summary: dict, records) -> dict:
    from ..datagen.metadata import package_versions

    args = plan.args
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
            "max_model_len_used": summary["this_run"].get("max_model_len"),
            "max_turns": args.max_turns,
            "max_samples": args.max_samples,
            "turns": args.turns,
            "reasoning": args.reasoning,
            "drop_truncated": args.drop_truncated,
            "shuffle": args.shuffle,
            "seed": args.seed,
        },
        "source": plan.source,
        "counts": summary,
        "package_versions": package_versions(),
        "arguments": _recorded(args),
    }


def _recorded(args) -> dict:
    """The arguments as the run's records keep them: never the servers' API key."""
    return {k: v for k, v in asdict(args).items() if k != "server_api_key"}


def _log_summary(summary: dict, output: dict) -> None:
    s, run = summary, summary["this_run"]
    logger.warning(
        "regenerate complete: %d conversations -> %d regenerated, %d truncated, %d failed, %d skipped; %d turns "
        "(%d cut: not round-tripping through the template), %d tool-call stops; %.0f generated tokens/s this run "
        "(%s) -> %s",
        s["conversations"],
        s["regenerated"],
        s["truncated"],
        s["failed"],
        s["skipped"],
        s["turns"],
        s["turns_not_round_trip"],
        s["tool_call_stops"],
        run["tokens_per_second"],
        run["engine"] or "nothing to generate",
        output["path"],
    )
