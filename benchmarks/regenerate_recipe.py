"""Regeneration recipes over training seeds: what a turn cut at `--max-new-tokens` costs, on the embedded default.

    .venv/bin/python benchmarks/regenerate_recipe.py                          # 3 recipes x 3 seeds, ~20 min on 2 cores
    .venv/bin/python benchmarks/regenerate_recipe.py --max-new-tokens 12 --seeds 0 1 2 --out /tmp/recipes

Each recipe runs `python -m speculators_hf.pipeline` (the embedded default: tiny peaked verifier, 360 chitchat chats,
regenerate -> datagen -> vocab -> train -> evaluate -> export) in its own folder, once per training seed
(`--train.seed`; regenerate, datagen and vocab are reused across seeds), with the transformers engine only
(`--evaluate.engine transformers --evaluate.grid false`: greedy, K=3, the 12 held-out prompts); regeneration runs
in vLLM (`--regenerate-backend`; greedy, the same chats as transformers). Recipes:

- `end`: `--regenerate.after-truncation end --regenerate.max-new-tokens N` (the old recipe: a cut turn ends the chat),
- `next-turn`: `--regenerate.after-truncation next-turn --regenerate.max-new-tokens N` (the cut turn is kept, marked,
  and the rollout goes on with the next user turn),
- `unbounded`: the default `--max-new-tokens` (2048: no turn of the tiny verifier is cut there), i.e. what continuing a
  cut turn until it stops would give.

Printed: per recipe, τ (transformers, T=0, K=3) and τ_sim (on that run's own held-out split) as mean ± half the
min-max spread with the min-max range, trained tokens, chats and turns cut; one JSON line per run goes to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "end": ["--regenerate.after-truncation", "end"],
    "next-turn": ["--regenerate.after-truncation", "next-turn"],
    "unbounded": [],
}


def run_once(recipe: str, seed: int, max_new_tokens: int, out: Path, backend: str) -> dict:
    folder = out / recipe
    command = [sys.executable, "-m", "speculators_hf.pipeline", "--output-dir", str(folder), "--train.seed", str(seed)]
    command += ["--evaluate.engine", "transformers", "--evaluate.grid", "false", *RECIPES[recipe]]
    command += ["--regenerate.backend", backend]
    if recipe != "unbounded":
        command += ["--regenerate.max-new-tokens", str(max_new_tokens)]
    start = time.perf_counter()
    log = out / f"{recipe}-{seed}.log"
    with open(log, "w") as f:
        code = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=os.environ).returncode
    if code:
        raise SystemExit(f"{recipe} seed {seed} failed ({code}): see {log}")
    card = json.loads((folder / "draft" / "eval_card.json").read_text())
    (run,) = [r for r in card["runs"] if r["engine"] == "transformers" and r["temperature"] == 0.0]
    counts = json.loads((folder / "regenerated.regenerate_config.json").read_text())["counts"]
    return {
        "recipe": recipe,
        "seed": seed,
        "max_new_tokens": None if recipe == "unbounded" else max_new_tokens,
        "tau": run["tau"],
        "k": run["num_speculative_tokens"],
        "tau_sim": card["offline"]["tau_sim"],
        "trained_tokens": counts["trained_tokens"],
        "turns": counts["turns"],
        "truncated_turns": counts["truncated_turns"],
        "truncated_chats": counts["truncated"],
        "context_full": counts["context_full"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def spread(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{sum(values) / len(values):.3f} ± {(hi - lo) / 2:.3f} ({lo:.3f}-{hi:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", default="/tmp/regenerate_recipe")
    parser.add_argument(
        "--regenerate-backend", default="vllm", help="vllm: same chats as transformers (greedy), faster on loaded CPUs"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:  # recipes interleaved: a run cut short still compares them seed for seed
        for recipe in args.recipes:
            row = run_once(recipe, seed, args.max_new_tokens, out, args.regenerate_backend)
            rows.append(row)
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print("\n| recipe | τ transformers (T=0, K=3) | τ_sim | trained tokens | turns | cut turns | cut chats | n |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes:
        mine = [r for r in rows if r["recipe"] == recipe]
        first = mine[0]
        print(
            f"| {recipe} | {spread([r['tau'] for r in mine])} | {spread([r['tau_sim'] for r in mine])} | "
            f"{first['trained_tokens']} | {first['turns']} | {first['truncated_turns']} | {first['truncated_chats']} "
            f"| {len(mine)} |"
        )


if __name__ == "__main__":
    main()
