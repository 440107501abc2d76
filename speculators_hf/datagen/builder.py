"""`build_dataset`: chats -> tokens + loss masks -> verifier hidden states -> shards, resumable and deterministic.

The work is planned up front from the tokenized data: kept samples in order, cut into shards of about
`--shard-size-mb`. Shard `k` always holds the same samples, batched the same way, so a killed run re-run with the same
flags skips the shards already on disk and ends with the same files as an uninterrupted run; `--rank/--world-size`
give shard `k` to rank `k % world_size`. Files appear only complete (temp file + rename); `index.json` lists them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..replicas import run_replicas
from ..utils import UserError, atomic_path, get_logger, write_json
from ..validation import bad_file, describe, read_json, read_text
from .arguments import DatagenArguments
from .backends import HiddenStatesBackend, make_backend, resolve_backend_name, resolve_layer_ids
from .metadata import data_config, load_verifier_config, resolve_dtype, resolve_storage_dtype, storage_bytes_per_value
from .shards import SHARD_FORMAT, SHARD_SCHEMA_VERSION, shard_name, write_index, write_shard, write_v1_sample
from .sources import load_source
from .tokenize import tokenize_dataset

logger = get_logger(__name__)

DATA_CONFIG = "data_config.json"
TOKENS_ONLY_BACKEND = "none"  # --tokens-only: no verifier runs; the states come from servers while training
# Flags that do not change the data, so a run may resume with other values.
NOT_FINGERPRINTED = (
    "output_dir",
    "cache_dir",
    "token_freq_path",
    "rank",
    "world_size",
    "data_parallel_size",
    "gpu_memory_utilization",
    "overwrite",
)


@dataclass
class Plan:
    args: DatagenArguments
    verifier: dict
    layer_ids: list[int]
    dtype: str
    backend: str
    tokenized: object  # datasets.Dataset, one row per input chat
    token_stats: dict
    shards: list[list[int]]  # sample ids (rows of `tokenized`) per shard
    lengths: dict[int, int]
    fingerprint: str
    storage_dtype: str | None = None  # how hidden states are stored (`--storage-dtype` resolved; None: as `dtype`)

    def shard_path(self, k: int) -> Path:
        return Path(self.args.output_dir) / shard_name(k)

    def v1_paths(self, k: int) -> list[Path]:
        first = sum(len(s) for s in self.shards[:k])
        return [Path(self.args.output_dir) / f"data_{first + j}.pt" for j in range(len(self.shards[k]))]

    def is_done(self, k: int) -> bool:
        if self.args.data_format_version == 1:
            return all(p.exists() for p in self.v1_paths(k))
        return self.shard_path(k).exists()

    def index_entry(self, k: int) -> dict:
        ids = self.shards[k]
        return {
            "file": shard_name(k),
            "num_samples": len(ids),
            "num_tokens": sum(self.lengths[i] for i in ids),
            "first_sample_id": ids[0],
            "last_sample_id": ids[-1],
        }


def prepare(args: DatagenArguments) -> Plan:
    """Everything before the verifier runs: validate inputs, tokenize (cached), plan the shards. Writes nothing."""
    from transformers import AutoTokenizer

    from ..modeling.verifier_weights import check_verifier_weights

    verifier = load_verifier_config(args.target_model_path)
    check_verifier_weights(args.target_model_path, "--target-model-path")
    layer_ids = resolve_layer_ids(args.layer_ids, verifier["num_hidden_layers"])
    dtype = resolve_dtype(args.dtype, verifier)
    storage_dtype = resolve_storage_dtype(args.storage_dtype, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.target_model_path)
    except Exception as err:
        raise UserError(
            f"--target-model-path {args.target_model_path}: cannot load its tokenizer ({describe(err)})."
        ) from err
    chat_template = _read_chat_template(args.chat_template)
    if chat_template is None and not tokenizer.chat_template:
        raise UserError(f"The tokenizer of {args.target_model_path} has no chat template: pass --chat-template.")

    raw = load_source(args.train_data_path, split=args.split, cache_dir=args.cache_dir)
    if args.shuffle:
        raw = raw.shuffle(seed=args.seed)
    if args.max_samples is not None and args.max_samples < len(raw):
        raw = raw.select(range(args.max_samples))
    tokenized, token_stats = tokenize_dataset(
        raw,
        tokenizer,
        args.seq_length,
        chat_template,
        args.cache_dir,
        source=f"--train-data-path {args.train_data_path}",
    )

    num_tokens = tokenized["num_tokens"]
    kept = [i for i, n in enumerate(num_tokens) if n > 0]
    lengths = {i: num_tokens[i] for i in kept}
    bytes_per_token = int(len(layer_ids) * verifier["hidden_size"] * storage_bytes_per_value(storage_dtype)) + 9
    if args.tokens_only:
        bytes_per_token = 9  # input_ids int64 + loss_mask uint8
    shards = _plan_shards(kept, lengths, args.shard_size_mb * 2**20 // bytes_per_token)
    backend = TOKENS_ONLY_BACKEND if args.tokens_only else resolve_backend_name(args.backend)
    excluded = {k: v for k, v in asdict(args).items() if k not in NOT_FINGERPRINTED}
    excluded.pop("storage_dtype", None)  # fingerprinted resolved (below): auto == the dtype it stands for
    storage = [storage_dtype] if storage_dtype != dtype else []  # fingerprints of plain runs stay as they were
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                excluded,
                token_stats["fingerprint"],
                verifier,
                layer_ids,
                dtype,
                backend,
                SHARD_SCHEMA_VERSION,
                *storage,
            ],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:16]
    return Plan(
        args, verifier, layer_ids, dtype, backend, tokenized, token_stats, shards, lengths, fingerprint, storage_dtype
    )


def _read_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a Jinja template, or a file holding one; checked to compile."""
    if value is None:
        return None
    path = Path(value)
    label = "--chat-template"
    if "{" not in value and len(value) < 4096 and path.exists():
        label = f"--chat-template {path}"
        value = read_text(path, label, "give a Jinja chat template file")
        if not value.strip():
            raise bad_file(label, "is empty", "give a Jinja chat template file")
    elif "{" not in value:
        raise UserError(f"--chat-template {value!r} is neither a Jinja template nor an existing file.")
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(value)  # as transformers compiles it (its {% generation %} tag included)
    except jinja2.TemplateSyntaxError as err:
        raise bad_file(label, f"is not a valid Jinja template (line {err.lineno}: {err.message})") from err
    return value


def _plan_shards(kept: list[int], lengths: dict[int, int], max_tokens: int) -> list[list[int]]:
    shards, current, tokens = [], [], 0
    for i in kept:
        if current and tokens + lengths[i] > max_tokens:
            shards.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        shards.append(current)
    return shards


def build_dataset(args: DatagenArguments, backend: HiddenStatesBackend | None = None) -> dict:
    """Run datagen end to end (or resume it); returns the summary that is also stored in `data_config.json`.

    Args:
        args (`DatagenArguments`): the flags.
        backend (`HiddenStatesBackend`, *optional*): an already started backend to use (and not close), e.g. one vLLM
            engine shared by several runs; by default one is made from `--backend`.
    """
    start = time.perf_counter()
    plan = prepare(args)
    output_dir = Path(args.output_dir)
    _claim_output_dir(output_dir, plan)
    if args.rank == 0:
        write_token_freq(plan, Path(args.token_freq_path or output_dir / "token_freq.pt"))
    if args.data_parallel_size > 1 and not args.tokens_only:
        _run_replicas(args)
        written = {"shards": 0, "samples": 0, "tokens": 0, "seconds": 0.0}  # counted by the replicas
    else:
        written = _extract_and_write(plan, backend)
    summary = _finish(plan, written, time.perf_counter() - start)
    return summary


def _claim_output_dir(output_dir: Path, plan: Plan) -> None:
    """Start or resume in `output_dir`; refuse to mix data written with other flags (unless --overwrite)."""
    path = output_dir / DATA_CONFIG
    if path.exists():
        fix = "delete it, or pass --overwrite (which removes the folder's data files)"
        try:
            previous = read_json(path, fix=fix)
        except UserError:
            if not plan.args.overwrite:
                raise
            previous = {}
        storage_record, model = previous.get("hidden_states_storage"), previous.get("model")
        stored = (storage_record.get("dtype") if isinstance(storage_record, dict) else None) or (
            model.get("hidden_states_dtype") if isinstance(model, dict) else None
        )
        storage = plan.storage_dtype or plan.dtype
        if stored and stored != storage and not plan.args.overwrite:
            raise UserError(
                f"--output-dir {output_dir} holds hidden states stored as {stored}; --storage-dtype "
                f"{plan.args.storage_dtype} ({storage}) would mix two in one folder: use a new --output-dir or "
                "--overwrite."
            )
        if previous.get("fingerprint") == plan.fingerprint:
            done = sum(plan.is_done(k) for k in range(len(plan.shards)))
            if done:
                logger.warning("Resuming in %s: %d of %d shards already written.", output_dir, done, len(plan.shards))
            return
        if not plan.args.overwrite:
            raise UserError(
                f"--output-dir {output_dir} holds data written with other flags or inputs (fingerprint "
                f"{previous.get('fingerprint')} != {plan.fingerprint}); use a new --output-dir or --overwrite."
            )
        _remove_outputs(output_dir)
    elif any(output_dir.glob("data[-_]*")):
        raise UserError(f"--output-dir {output_dir} holds data files but no {DATA_CONFIG}; use an empty folder.")
    if plan.args.rank == 0 or not path.exists():
        write_json(path, data_config(plan, status="running"))


def _remove_outputs(output_dir: Path) -> None:
    for pattern in ("data-*.safetensors", "data_*.pt", "index*.json", DATA_CONFIG, "token_freq.pt"):
        for file in output_dir.glob(pattern):
            file.unlink()


def write_token_freq(plan: Plan, path: Path) -> dict[int, int]:
    """Counts of loss-masked tokens over every kept sample, as `{token_id: count}` (the seed's layout)."""
    counts: Counter = Counter()
    for batch in plan.tokenized.select_columns(["input_ids", "loss_mask"]).iter(batch_size=1024):
        for ids, mask in zip(batch["input_ids"], batch["loss_mask"]):
            counts.update(t for t, m in zip(ids, mask) if m)
    freq = {int(t): int(c) for t, c in sorted(counts.items())}
    with atomic_path(path) as tmp:
        torch.save(freq, tmp)
    return freq


def _extract_and_write(plan: Plan, backend: HiddenStatesBackend | None = None) -> dict:
    args = plan.args
    todo = [k for k in range(len(plan.shards)) if k % args.world_size == args.rank and not plan.is_done(k)]
    written = {"shards": 0, "samples": 0, "tokens": 0, "seconds": 0.0}
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
        )
    started = time.perf_counter()  # after the backend is up: tokens/s measures extraction + writing only
    total = sum(plan.lengths[i] for k in todo for i in plan.shards[k])
    bar = tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc="Token shards (tokens only)" if args.tokens_only else f"Hidden states ({backend.name})",
        disable=args.rank != 0 and args.world_size > 1,
    )
    try:
        for k in todo:
            samples = _extract_shard(plan, backend, k)
            _write_shard(plan, k, samples)
            tokens = sum(len(s["input_ids"]) for s in samples)
            written["shards"] += 1
            written["samples"] += len(samples)
            written["tokens"] += tokens
            bar.update(tokens)
    finally:
        bar.close()
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
    _update_index(plan)


def _update_index(plan: Plan) -> None:
    """Rewrite index.json from the shards on disk, under a lock (ranks may share the folder)."""
    output_dir = Path(plan.args.output_dir)
    with open(output_dir / ".index.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = [k for k in range(len(plan.shards)) if plan.is_done(k)]
        write_index(
            output_dir,
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
    """`--data-parallel-size N`: N worker processes on this machine, each with its own GPUs and shard subset."""
    n = args.data_parallel_size
    children = [
        {"data_parallel_size": 1, "rank": args.rank * n + i, "world_size": args.world_size * n} for i in range(n)
    ]
    failed = run_replicas("speculators_hf.datagen", args, children, args.tensor_parallel_size)
    if failed:
        raise RuntimeError(f"datagen replicas {failed} failed; re-run the same command to resume.")


def _finish(plan: Plan, written: dict, seconds: float) -> dict:
    output_dir = Path(plan.args.output_dir)
    done = [k for k in range(len(plan.shards)) if plan.is_done(k)]
    complete = len(done) == len(plan.shards)
    v2 = plan.args.data_format_version == 2
    files = [p for k in done for p in ([plan.shard_path(k)] if v2 else plan.v1_paths(k))]
    summary = {
        "complete": complete,
        "samples": sum(len(plan.shards[k]) for k in done),
        "tokens": sum(plan.lengths[i] for k in done for i in plan.shards[k]),
        "skipped": plan.token_stats["num_skipped"],
        "skip_reasons": plan.token_stats["skip_reasons"],
        "shards": len(done),
        "bytes": sum(p.stat().st_size for p in files),
        "seconds": round(seconds, 2),
        "this_run": {**written, "tokens_per_second": round(written["tokens"] / max(written["seconds"], 1e-9), 1)},
    }
    if plan.args.data_format_version == 2:
        _update_index(plan)
    if complete:
        write_json(output_dir / DATA_CONFIG, data_config(plan, status="complete", summary=summary))
    logger.warning(
        "datagen %s: %d samples, %d tokens, %d skipped, %d shards, %.1f MB in %s, %.1f s (%.0f tokens/s extracting)",
        "complete" if complete else "partial",
        summary["samples"],
        summary["tokens"],
        summary["skipped"],
        summary["shards"],
        summary["bytes"] / 1e6,
        output_dir,
        seconds,
        summary["this_run"]["tokens_per_second"],
    )
    return summary


__all__ = ["build_dataset", "prepare", "Plan", "write_token_freq"]
