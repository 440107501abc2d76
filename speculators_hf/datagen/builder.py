"""`run`: chats -> tokens + loss masks -> verifier hidden states -> shards, resumable and deterministic.

The work is planned up front (`plan.prepare`): kept samples in order, cut into shards of about `--shard-size-mb`. Shard
`k` always holds the same samples, batched the same way, so a killed run re-run with the same flags skips the shards
already on disk and ends with the same files as an uninterrupted run; `--rank/--world-size` give shard `k` to rank
`k % world_size`. Files appear only complete (temp file + rename); `index.json` lists them.

The output folder is claimed through `runstate` (manifest `.speculators_hf/datagen.json`): it records every file the
run writes before it is written; a finished run with the same inputs is not redone, other inputs are refused unless
`--overwrite` (which deletes only what the manifest records), and a folder holding files datagen did not write is
refused. Ranks sharing a folder claim it under the manifest's lock; only rank 0 replaces an earlier run.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from .. import runstate
from ..formats.shards import SHARD_FORMAT, SHARD_SCHEMA_VERSION, save_pt, write_index, write_shard, write_v1_sample
from ..replicas import run_replicas
from ..utils import RunFailed, UserError, check_writable, get_logger, write_json
from .arguments import DatagenArguments
from .backends import HiddenStatesBackend, make_backend
from .metadata import data_config
from .plan import DATA_CONFIG, TOKENS_ONLY_BACKEND, Plan, prepare

logger = get_logger(__name__)

KEY = "datagen"  # the run-state manifest's name in --output-dir
HELD = "data written with other flags or inputs"  # the refusal of a folder holding another run
RANK_WAIT_S = 1800.0  # how long ranks > 0 wait for rank 0 to replace a run with other inputs (--overwrite)
# data_config.json's "summary" (training and online read data_config.json: its contents stay as they were)
SUMMARY_KEYS = ("complete", "samples", "tokens", "skipped", "skip_reasons", "shards", "bytes", "seconds", "this_run")


@dataclass
class DatagenResult:
    """What a datagen run produced (recorded in its manifest; the pipeline and the next stages read it)."""

    output_dir: str
    data_config: str  # path of data_config.json
    token_freq: str  # path of token_freq.pt
    complete: bool  # every planned shard is written (all ranks)
    samples: int  # in the shards written so far (all ranks)
    tokens: int
    skipped: int  # chats left out (no assistant tokens, template errors), by reason below
    skip_reasons: dict[str, int]
    shards: int
    bytes: int
    seconds: float
    layer_ids: list[int]
    hidden_states_dtype: str  # as extracted
    storage_dtype: str  # as stored (fp8_e4m3: float8 with per-token scales)
    tokens_only: bool
    this_run: dict  # what this call wrote: shards, samples, tokens, seconds, tokens_per_second
    reused: bool = False  # True: the recorded result of a finished run with the same inputs (nothing ran)

    @classmethod
    def from_record(cls, record: dict) -> DatagenResult:
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})

    def summary(self) -> dict:
        return {key: getattr(self, key) for key in SUMMARY_KEYS}


def run(
    args: DatagenArguments, *, backend: HiddenStatesBackend | None = None, replace_stale: bool = False
) -> DatagenResult:
    """Run datagen end to end, resume it, or return the recorded result of the finished run with the same inputs.

    Args:
        args (`DatagenArguments`): the flags.
        backend (`HiddenStatesBackend`, *optional*): an already started backend to use (and not close), e.g. one vLLM
            engine shared by several runs; by default one is made from `--backend`.
        replace_stale (`bool`): replace an earlier run with other inputs in `--output-dir` (the pipeline, in its own
            folders) instead of refusing it.
    """
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    _check_writable_before_work(output_dir, "--output-dir")
    if args.rank == 0 and args.token_freq_path is not None:
        _check_writable_before_work(Path(args.token_freq_path).parent, "--token-freq-path")
    plan = prepare(args)
    claim = _claim(plan, replace_stale)
    if claim.finished:
        logger.warning("datagen %s: up to date (same inputs, complete), skipped; --overwrite reruns it.", output_dir)
        return DatagenResult.from_record({**claim.result, "this_run": _nothing_written(), "reused": True})
    claim.track(*plan.entries())  # before anything is written (other ranks write their shards into the same folder)
    if args.rank == 0 or not (output_dir / DATA_CONFIG).exists():
        write_json(output_dir / DATA_CONFIG, data_config(plan, status="running"))
    if args.rank == 0:
        _write_token_freq(plan, claim, replace_stale)
    if args.data_parallel_size > 1 and not args.tokens_only:
        _run_replicas(args)
        written = _nothing_written()  # counted by the replicas
    else:
        written = _extract_and_write(plan, backend)
    return _finish(plan, claim, written, time.perf_counter() - start)


def build_dataset(args: DatagenArguments, backend: HiddenStatesBackend | None = None) -> dict:
    """`run` with its result as a dict (the summary earlier versions returned)."""
    return asdict(run(args, backend=backend))


def _check_writable_before_work(folder: Path, label: str) -> None:
    """A folder that cannot take files fails now, before tokenizing; a folder that does not exist yet is not created
    here (a run refused later leaves nothing behind) when its nearest existing parent may be written."""
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if folder.exists() or not os.access(parent, os.W_OK | os.X_OK):
        check_writable(folder, label)  # one line: read-only file system, permission denied


def _claim(plan: Plan, replace_stale: bool) -> runstate.Claim:
    """Claim `--output-dir` for this run. Rank 0 may replace an earlier run (--overwrite, or `replace_stale`); the
    other ranks never delete: they wait for rank 0 to replace a run with other inputs, and otherwise resume with it."""
    args, folder = plan.args, plan.output_dir
    replacing = args.overwrite or replace_stale
    _refuse_other_storage(plan, replacing)
    if args.rank > 0 and replacing:
        _wait_for_rank_zero(plan)
    rank_zero = args.rank == 0
    return runstate.claim(
        folder,
        KEY,
        plan.inputs,
        overwrite=args.overwrite and rank_zero,
        replace_stale=replace_stale and rank_zero,
        owned=True,
        label="--output-dir",
        held=HELD,
    )


def _refuse_other_storage(plan: Plan, replacing: bool) -> None:
    """Hidden states of another storage dtype in the folder: the one line names both (rather than what changed)."""
    record = runstate.read_manifest(plan.output_dir, KEY)
    stored = ((record or {}).get("inputs") or {}).get("storage_dtype")
    storage = plan.storage_dtype or plan.dtype
    if stored and stored != storage and not replacing:
        raise UserError(
            f"--output-dir {plan.output_dir} holds hidden states stored as {stored}; --storage-dtype "
            f"{plan.args.storage_dtype} ({storage}) would mix two in one folder: use a new --output-dir or "
            "--overwrite."
        )


def _wait_for_rank_zero(plan: Plan) -> None:
    """Rank > 0 with --overwrite: wait while the folder holds a run with other inputs (rank 0 replaces it)."""
    deadline, told = time.monotonic() + RANK_WAIT_S, False
    while True:
        record = runstate.read_manifest(plan.output_dir, KEY)
        if record is None or record["fingerprint"] == runstate.fingerprint(plan.inputs):
            return
        if time.monotonic() > deadline:
            raise RunFailed(
                f"--rank {plan.args.rank}: {plan.output_dir} still holds a datagen run with other inputs after "
                f"{RANK_WAIT_S:.0f} s; start rank 0 with the same flags and --overwrite (it replaces that run)."
            )
        if not told:
            logger.warning("--rank %d: waiting for rank 0 to replace the run in %s.", plan.args.rank, plan.output_dir)
            told = True
        time.sleep(2.0)


def _write_token_freq(plan: Plan, claim: runstate.Claim, replace_stale: bool) -> None:
    """token_freq.pt in --output-dir (an entry of the claim), or at --token-freq-path under a claim of its own."""
    path = plan.token_freq
    if plan.token_freq_inside:
        write_token_freq(plan, path)
        return
    args = plan.args
    elsewhere = runstate.claim(
        path.parent,
        f"{KEY}-{path.name}",
        plan.inputs,
        overwrite=args.overwrite,
        replace_stale=replace_stale,
        owned=False,
        label="--token-freq-path",
    )
    if not elsewhere.finished:
        write_token_freq(plan, elsewhere.path(path.name))
        elsewhere.finish({"token_freq": str(path)})


def write_token_freq(plan: Plan, path: Path) -> dict[int, int]:
    """Counts of loss-masked tokens over every kept sample, as `{token_id: count}` (the seed's layout)."""
    counts = np.zeros(0, dtype=np.int64)  # [V seen so far]
    columns = plan.tokenized.select_columns(["input_ids", "loss_mask"]).with_format("arrow")
    for batch in columns.iter(batch_size=8192):  # Arrow batches: the token lists are counted in numpy, not Python
        ids = pc.list_flatten(batch["input_ids"]).to_numpy()
        mask = pc.list_flatten(batch["loss_mask"]).to_numpy()
        kept = np.bincount(ids[mask != 0])
        if len(kept) > len(counts):
            counts = np.pad(counts, (0, len(kept) - len(counts)))
        counts[: len(kept)] += kept
    freq = {int(t): int(counts[t]) for t in np.flatnonzero(counts)}
    save_pt(freq, path)
    return freq


def _nothing_written() -> dict:
    return {"shards": 0, "samples": 0, "tokens": 0, "seconds": 0.0}


def _extract_and_write(plan: Plan, backend: HiddenStatesBackend | None = None) -> dict:
    args = plan.args
    todo = [k for k in range(len(plan.shards)) if k % args.world_size == args.rank and not plan.is_done(k)]
    written = _nothing_written()
    if not todo:
        return written
    if args.tokens_only:
        backend = _TokensOnly(plan.layer_ids)
    owned = backend is None
    if owned:
        backend = make_backend(
            plan.backend,
            args.target_model_path,
            plan.layer_ids,
            plan.dtype,
            args.seq_length,
            args.tensor_parallel_size,
            args.gpu_memory_utilization,
            args.seed,
            trust_remote_code=args.trust_remote_code,
        )
    started = time.perf_counter()  # after the backend is up: tokens/s measures extraction + writing only
    total = sum(plan.lengths[i] for k in todo for i in plan.shards[k])
    bar = tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc="Token shards (tokens only)" if args.tokens_only else f"Hidden states ({backend.name})",
        disable=(args.rank != 0 and args.world_size > 1) or not hf_logging.is_progress_bar_enabled(),
    )
    # index.json is rewritten after every `every` shards (each rewrite looks at every planned shard: after each shard
    # that is O(shards^2), ~1e9 checks for a 31k-shard run), and when the loop ends, however it ends
    every = max(1, len(plan.shards) // INDEX_REWRITES)
    try:
        for k in todo:
            samples = _extract_shard(plan, backend, k)
            _write_shard(plan, k, samples)
            tokens = sum(len(s["input_ids"]) for s in samples)
            written["shards"] += 1
            written["samples"] += len(samples)
            written["tokens"] += tokens
            bar.update(tokens)
            if written["shards"] % every == 0:
                _update_index(plan)
    finally:
        bar.close()
        if written["shards"] % every:
            _index_what_was_written(plan)
        written["seconds"] = round(time.perf_counter() - started, 3)
        if owned:
            backend.close()
    return written


def _extract_shard(plan: Plan, backend, k: int) -> list[dict]:
    ids = plan.shards[k]
    rows = plan.tokenized.select(ids)
    samples = []
    for a in range(0, len(ids), plan.args.batch_size):
        batch = rows[a : a + plan.args.batch_size]
        states = backend.extract(batch["input_ids"])
        for input_ids, loss_mask, hs in zip(batch["input_ids"], batch["loss_mask"], states):
            sample = {
                "input_ids": torch.tensor(input_ids, dtype=torch.long),  # [T]
                "loss_mask": torch.tensor(loss_mask, dtype=torch.uint8),  # [T]
            }
            if hs is not None:  # None: --tokens-only
                sample["hidden_states"] = hs.to(getattr(torch, plan.dtype)).contiguous()  # [T, L, H]
            samples.append(sample)
    return samples


INDEX_REWRITES = 100  # index.json rewrites per run at most (plus the last): linear in the shards


class _TokensOnly:
    """The "backend" of `--tokens-only`: no verifier, no states (training fetches them from servers)."""

    name = TOKENS_ONLY_BACKEND

    def __init__(self, layer_ids: list[int]):
        self.layer_ids = layer_ids

    def extract(self, batch: list[list[int]]) -> list[None]:
        return [None] * len(batch)

    def close(self) -> None:
        return None


def _write_shard(plan: Plan, k: int, samples: list[dict]) -> None:
    if plan.args.data_format_version == 1:
        for path, sample in zip(plan.v1_paths(k), samples):
            write_v1_sample(path, sample, plan.storage_dtype)
        return
    write_shard(plan.shard_path(k), samples, plan.shards[k], plan.storage_dtype)


def _index_what_was_written(plan: Plan) -> None:
    """The last index rewrite of a loop that may be failing: a second error (the disk is still full) is logged, and
    the first one goes on up; a rerun rewrites the index from the shards on disk."""
    try:
        _update_index(plan)
    except OSError as err:
        logger.warning("index.json not updated (%s); rerun the same command to resume and rewrite it.", err)


def _update_index(plan: Plan) -> None:
    """Rewrite index.json from the shards on disk, under a lock (ranks may share the folder)."""
    if plan.args.data_format_version != 2:
        return  # format 1: one .pt file per sample, no index
    with runstate.lock(plan.output_dir, f"{KEY}-index"):
        done = [k for k in range(len(plan.shards)) if plan.is_done(k)]
        write_index(
            plan.output_dir,
            {
                "format": SHARD_FORMAT,
                "version": SHARD_SCHEMA_VERSION,
                "fingerprint": plan.fingerprint,
                "layer_ids": plan.layer_ids,
                "num_shards_planned": len(plan.shards),
                "complete": len(done) == len(plan.shards),
                "shards": [plan.index_entry(k) for k in done],
            },
        )


def _run_replicas(args: DatagenArguments) -> None:
    """`--data-parallel-size N`: N worker processes on this machine, each with its own GPUs and shard subset. They
    resume the run this process claimed (never --overwrite: that was done here)."""
    n = args.data_parallel_size
    children = [
        {"data_parallel_size": 1, "rank": args.rank * n + i, "world_size": args.world_size * n, "overwrite": False}
        for i in range(n)
    ]
    failed = run_replicas("speculators_hf.datagen", args, children, args.tensor_parallel_size)
    if failed:
        raise RunFailed(
            f"datagen replicas {failed} failed (their errors are above); rerun the same command to resume."
        )


def _finish(plan: Plan, claim: runstate.Claim, written: dict, seconds: float) -> DatagenResult:
    done = [k for k in range(len(plan.shards)) if plan.is_done(k)]
    files = [p for k in done for p in plan.files(k)]
    tokens_per_second = round(written["tokens"] / max(written["seconds"], 1e-9), 1)
    result = DatagenResult(
        output_dir=str(plan.output_dir),
        data_config=str(plan.output_dir / DATA_CONFIG),
        token_freq=str(plan.token_freq),
        complete=len(done) == len(plan.shards),
        samples=sum(len(plan.shards[k]) for k in done),
        tokens=sum(plan.lengths[i] for k in done for i in plan.shards[k]),
        skipped=plan.token_stats["num_skipped"],
        skip_reasons=plan.token_stats["skip_reasons"],
        shards=len(done),
        bytes=sum(p.stat().st_size for p in files),
        seconds=round(seconds, 2),
        layer_ids=plan.layer_ids,
        hidden_states_dtype=plan.dtype,
        storage_dtype=plan.storage_dtype or plan.dtype,
        tokens_only=plan.args.tokens_only,
        this_run={**written, "tokens_per_second": tokens_per_second},
    )
    _update_index(plan)
    if result.complete:
        write_json(plan.output_dir / DATA_CONFIG, data_config(plan, status="complete", summary=result.summary()))
        claim.finish(asdict(result), produced=result.samples, what="samples")
    logger.warning(
        "datagen %s: %d samples, %d tokens, %d skipped, %d shards, %.1f MB in %s, %.1f s (%.0f tokens/s extracting)",
        "complete" if result.complete else "partial",
        result.samples,
        result.tokens,
        result.skipped,
        result.shards,
        result.bytes / 1e6,
        plan.output_dir,
        seconds,
        tokens_per_second,
    )
    return result


__all__ = ["DatagenResult", "build_dataset", "run", "write_token_freq"]
