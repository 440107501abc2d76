"""The eval card: every number that moves tau, next to tau, as `eval_card.json` + `eval_card.md`."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

from ..utils import atomic_path, write_json
from .online import SpecDecodeResult

EVAL_CARD_JSON, EVAL_CARD_MD = "eval_card.json", "eval_card.md"
RUN_FIELDS = (
    "engine",
    "engine_version",
    "num_speculative_tokens",
    "temperature",
    "proposal",
    "tau",
    "acceptance_per_position",
    "speedup",
    "output_matches_verifier_greedy",
)


def hardware() -> dict:
    import torch

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


def build_eval_card(
    results: list[SpecDecodeResult],
    *,
    draft: str,
    verifier: str,
    dataset: dict,
    offline: dict | None = None,
) -> dict:
    """The eval card dict.

    Args:
        results: one run per engine (same draft, same prompts).
        dataset (`dict`): where the prompts came from: `path`, `num_prompts`, `offset`, `max_new_tokens`.
        offline (`dict`, *optional*): offline acceptance on held-out shards (`tau_sim`, `acc_k`, `cond_acc_k`).
    """
    runs = []
    for r in results:
        runs.append(
            {
                "temperature": 0.0,
                "proposal": "chain",
                "sampling": "greedy drafting, greedy verification",
                **r.summary(),
            }
        )
    return {
        "draft": str(draft),
        "verifier": str(verifier),
        "dataset": dataset,
        "hardware": hardware(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
        "offline": offline,
    }


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
                "chain (simulated)",
                _fmt(off.get("tau_sim")),
                _fmt(off.get("cond_acc_k")),
                "–",
                "–",
            ]
        )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def render_eval_card(card: dict) -> str:
    ds, hw = card["dataset"], card["hardware"]
    where = ", ".join(hw["gpus"]) if hw["gpus"] else f"{hw['cpu']} ({hw['cpu_cores']} cores, CPU only)"
    return "\n".join(
        [
            "## Evaluation",
            "",
            f"Draft `{card['draft']}` with verifier `{card['verifier']}`, {card['date']}.",
            f"Prompts: {ds.get('num_prompts')} from `{ds.get('path')}` (offset {ds.get('offset', 0)}), up to "
            f"{ds.get('max_new_tokens')} new tokens each. Hardware: {where}.",
            "tau is the mean accepted length per verification step (1 + accepted draft tokens / drafts); "
            "acceptance at position i is the fraction of steps whose first i+1 draft tokens were all accepted. "
            "Speed-up is wall-clock generation time of the verifier alone over that with the draft "
            "(same engine, batch as listed).",
            "",
            eval_table(card),
            "",
        ]
    )


def write_eval_card(card: dict, directory: str | Path) -> tuple[Path, Path]:
    """Write `eval_card.json` and `eval_card.md` into `directory` (next to the checkpoint)."""
    directory = Path(directory)
    write_json(directory / EVAL_CARD_JSON, card)
    with atomic_path(directory / EVAL_CARD_MD) as tmp:
        tmp.write_text(render_eval_card(card))
    return directory / EVAL_CARD_JSON, directory / EVAL_CARD_MD
