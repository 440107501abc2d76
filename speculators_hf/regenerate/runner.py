"""`run(args)`: chat source -> rollouts with the verifier -> a chat file datagen reads; resumable and atomic.

The run state (`runstate`) claims the output's names in the user's folder before anything is written: a finished run
with the same inputs returns its recorded result without loading an engine, an unfinished one resumes from the
conversations saved so far (by conversation id), one with other inputs is refused unless `--overwrite`, and a user's
file at any of the output's names is never replaced.

Two drivers share the `Conversation` state machine: in-process engines (transformers, vLLM) roll out `--chunk-size`
chats together, one `generate` call per turn depth (vLLM batches them continuously); `--server-url` runs each chat's
turns in its own worker, `--concurrency` of them at a time, so the servers always have requests of every depth.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from tqdm.auto import tqdm

from ..formats.provenance import output_matches
from ..replicas import run_replicas
from ..runstate import Claim, changed_keys, claim, manifest_path, read_manifest
from ..utils import RunFailed, UserError, check_writable, get_logger, write_json
from ..validation import bad_file, read_json
from .arguments import RegenerateArguments
from .engines import make_engine
from .generation import Engine
from .plan import Plan, prepare
from .result import RegenerateResult, make_result, provenance_record, summarize
from .rollout import Conversation, RolloutConfig
from .writer import OutputLayout, PartialStore, read_records, write_final

logger = get_logger(__name__)
NOTHING_RUN = {"conversations": 0, "generated_tokens": 0, "seconds": 0.0, "engine": None}


def run(args: RegenerateArguments, *, replace_stale: bool = False, engine: Engine | None = None) -> RegenerateResult:
    """Regenerate the chats of `args`, resume an unfinished run, or return the result of a finished one.

    Args:
        args (`RegenerateArguments`): the flags.
        replace_stale (`bool`): changed inputs replace the earlier run's files (the pipeline, in its own folder);
            otherwise they are refused unless `--overwrite`.
        engine (`Engine`, *optional*): an already started engine to use (and not close), e.g. one vLLM engine shared
            by several runs; by default one is made from `--backend` / `--server-url`.
    """
    if args.world_size > 1:
        raise ValueError("a --data-parallel-size replica runs through `run_replica`")
    plan = prepare(args)
    layout = plan.layout
    check_writable(layout.folder, "--output-path")  # a read-only or full folder fails before any engine loads
    decision = _claim(plan, replace_stale, readonly=True)  # refusals first; nothing written yet
    if decision.finished:
        return _finished(plan, decision, replace_stale)
    records = read_records(layout) if decision.resumed else ()
    todo = [i for i, cid in enumerate(plan.ids) if cid not in records]
    if records:
        logger.warning("Resuming %s: %d of %d conversations already done.", layout.output, len(records), len(plan.ids))
    owned = engine is None and bool(todo) and args.data_parallel_size == 1
    if owned:
        engine = make_engine(args, plan.sampling, plan.dtype, plan.model_config)
    try:
        state = _claim(plan, replace_stale)  # after the engine started: one that cannot start leaves nothing
        this_run = dict(NOTHING_RUN)
        if todo and args.data_parallel_size > 1:
            this_run = _run_replicas(args, layout)
        elif todo:
            this_run = _generate(plan, todo, engine)
    finally:
        if owned:
            engine.close()
    return _complete(plan, state, this_run)


def run_replica(args: RegenerateArguments) -> None:
    """One of the `--data-parallel-size` worker processes: regenerates its share of the conversations into the
    partial folder the coordinating `run` claimed (with the same inputs), and records what it did there."""
    plan = prepare(args)
    _claim(plan, replace_stale=False, readonly=True)  # the coordinator's claim, or a refusal
    records = read_records(plan.layout)
    todo = [i for i, cid in enumerate(plan.ids) if i % args.world_size == args.rank and cid not in records]
    this_run = dict(NOTHING_RUN)
    if todo:
        engine = make_engine(args, plan.sampling, plan.dtype, plan.model_config)
        try:
            this_run = _generate(plan, todo, engine)
        finally:
            engine.close()
    write_json(plan.layout.partial / f"run-{args.rank:03d}.json", this_run)


# ---------------------------------------------------------------------------------------------------- run state


def _claim(plan: Plan, replace_stale: bool, readonly: bool = False) -> Claim:
    """Claim the output's names in its folder (`readonly`: decide and refuse without writing)."""
    layout, args = plan.layout, plan.args
    _refuse_other_output(plan, args.overwrite or replace_stale)
    state = claim(
        layout.folder,
        layout.key,
        plan.inputs,
        overwrite=args.overwrite,
        replace_stale=replace_stale,
        owned=False,
        label="--output-path",
        readonly=readonly,
    )
    if not state.finished:
        for path in layout.entries():  # a user's file at any of these names is refused now, not at the end
            state.path(path.name)
    return state


def _refuse_other_output(plan: Plan, replacing: bool) -> None:
    """The output exists from a run with other inputs: one line naming it (the claim refuses it too, naming only
    the folder)."""
    layout = plan.layout
    previous = read_manifest(layout.folder, layout.key)
    if replacing or previous is None or previous["fingerprint"] == plan.fingerprint or not layout.output.exists():
        return
    changed = ", ".join(changed_keys(previous.get("inputs") or {}, plan.inputs)[:6]) or "unknown inputs"
    raise UserError(
        f"--output-path {layout.output} exists, regenerated with other flags or inputs ({changed} changed): use "
        "another --output-path, or --overwrite to replace it (only the files regenerate wrote are deleted)."
    )


def _finished(plan: Plan, decision: Claim, replace_stale: bool) -> RegenerateResult:
    """A finished run with the same inputs: its recorded result, once the output is checked to be the one written."""
    layout = plan.layout
    fix = f"pass --overwrite to regenerate {layout.output.name}"
    if not output_matches(layout.output, read_json(layout.config, fix=fix)):
        raise UserError(
            f"--output-path {layout.output} changed since regenerate wrote it ({layout.config.name}): {fix}."
        )
    result = RegenerateResult.from_record(decision.result)
    if result is None:
        raise bad_file(str(manifest_path(layout.folder, layout.key)), "records no regenerate result", fix)
    if decision.owns(layout.partial.name):  # killed between finishing and removing the partial folder
        _claim(plan, replace_stale).remove(layout.partial.name)
    logger.warning("%s: up to date (same flags and inputs), skipped; --overwrite regenerates it.", layout.output)
    result.reused = True
    return result


def _complete(plan: Plan, state: Claim, this_run: dict) -> RegenerateResult:
    """Every conversation has a record: write the output, mark the run finished, drop the partial folder."""
    layout = plan.layout
    records = read_records(layout)
    missing = [cid for cid in plan.ids if cid not in records]
    if missing:
        raise RunFailed(f"{len(missing)} conversations were not regenerated (e.g. {missing[0]!r}); rerun to resume.")
    summary = summarize(records)
    result = make_result(plan, summary, this_run)
    write_final(state, layout, records, provenance_record(plan, summary, result))
    nothing = f"conversations ({result.truncated} truncated, {result.failed} failed, {result.skipped} skipped of "
    nothing += f"{result.conversations}: see {layout.failures})"
    state.finish(asdict(result), produced=result.written, what=nothing)
    state.remove(layout.partial.name)
    logger.warning(result.line())
    return result


# ---------------------------------------------------------------------------------------------------- generation


def _generate(plan: Plan, todo: list[int], engine: Engine) -> dict:
    """Regenerate conversations `todo` with `engine`, each saved to the partial folder as it finishes."""
    args = plan.args
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
        after_truncation=args.after_truncation,
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
        self.bar = tqdm(total=total, unit="chat", desc=desc, **({"disable": True} if disable else {}))  # TQDM_DISABLE
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
        raise RunFailed(f"regenerate replicas {failed} failed (see above); rerun the same command to resume.")
    runs = [read_json(layout.partial / f"run-{i:03d}.json", fix="rerun the same command") for i in range(n)]
    return {
        "conversations": sum(r["conversations"] for r in runs),
        "generated_tokens": sum(r["generated_tokens"] for r in runs),
        "seconds": max(r["seconds"] for r in runs),
        "engine": next((r["engine"] for r in runs if r["engine"]), None),
        "max_model_len": next((r.get("max_model_len") for r in runs if r.get("max_model_len")), None),
        "replicas": n,
    }
