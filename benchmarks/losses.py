"""Training losses over seeds on the embedded default: `train --loss` recipes x seeds, each scored the same way.

    .venv/bin/python benchmarks/losses.py --work-dir /tmp/losses --recipes kl tv kl_tv --seeds 42 1 2

The embedded default's stages before training (regenerate, datagen, vocab) run once in `<work-dir>` (reused when up to
date: the pipeline's own run state); then, per recipe and seed, the pipeline's training arguments with `--seed` and
the recipe's flags (`kl` = today's default, `tv` = `--loss tv`, `name=--flag value ...` for any other) train a draft in
`<work-dir>-losses/<recipe>-s<seed>/`, and the evaluation stage scores it: the transformers engine (exact acceptance
rule) at K = 3 on the held-out prompts at T = 0 (tau) and T = 1 (tau and acceptance per position, seeded), and
tau_sim on the held-out shards. Each run's numbers go to `<work-dir>-losses/losses.json` as it finishes (a rerun
skips the runs recorded there); the table gives mean and spread (min-max) per recipe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from speculators_hf import evaluation, training
from speculators_hf.evaluation import EvaluateArguments
from speculators_hf.pipeline import Pipeline, PipelineArguments, compose
from speculators_hf.tiny_kit import tiny_verifier

RECIPES = {"kl": [], "tv": ["--loss", "tv"], "lk": ["--loss", "lk"], "kl_tv": ["--loss", "kl_tv"]}


def recipe_values(flags: list[str]) -> dict:
    """`--flag value` pairs as training-argument fields (`--loss-temperature 0.5` -> `loss_temperature: 0.5`)."""
    values = {}
    for flag, value in zip(flags[::2], flags[1::2]):
        try:
            value = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            pass
        values[flag.lstrip("-").replace("-", "_")] = value
    return values


def runs_dir(work_dir: Path) -> Path:
    """Where the recipes' runs go: beside the pipeline's folder (which holds only what the pipeline writes)."""
    return work_dir.parent / f"{work_dir.name}-losses"


def prepare(work_dir: Path, *, run: bool = True) -> Pipeline:
    """The embedded default's stages up to the vocabulary (each skipped when up to date); with `run=False` only the
    pipeline's inputs, for a process that trains one recipe and seed after another process prepared the data."""
    pipeline = Pipeline(PipelineArguments(output_dir=str(work_dir)))
    if not run:
        pipeline.args.verifier = str(tiny_verifier("peaked"))
        pipeline.args.eval_prompts = str(pipeline.out / "eval_chats.jsonl")
        return pipeline
    pipeline.resolve_inputs()
    pipeline.regenerate()
    pipeline.datagen()
    pipeline.vocab()
    return pipeline


def run_one(pipeline: Pipeline, name: str, flags: list[str], seed: int) -> dict:
    folder = runs_dir(pipeline.out) / f"{name}-s{seed}"
    model_args, _ = pipeline.train_arguments()
    values = {
        **pipeline._values("train"),
        "verifier_name_or_path": pipeline.args.verifier,
        "data_path": str(pipeline.data_dir),
        "output_dir": str(folder),
        "log_dir": str(pipeline.log_dir),
        "seed": seed,
        **recipe_values(flags),
    }
    model_args, train_args = compose.build("train", values)
    start = time.perf_counter()
    trained = training.run(model_args, train_args, replace_stale=True)
    train_seconds = time.perf_counter() - start
    evaluate = pipeline._values("evaluate")
    args = EvaluateArguments(
        draft=trained.draft,
        prompts=pipeline.args.eval_prompts,
        verifier=pipeline.args.verifier,
        engine="transformers",
        grid=False,
        temperature=[0.0, 1.0],
        num_speculative_tokens=3,
        max_new_tokens=evaluate["max_new_tokens"],
        num_prompts=evaluate["num_prompts"],
        shards=str(pipeline.data_dir),
        held_out_fraction=train_args.eval_split or None,
        held_out_seed=train_args.data_seed or 0,
        total_seq_len=train_args.total_seq_len,
        output_dir=str(folder / "eval"),
    )
    result = evaluation.run(args, replace_stale=True)
    rows = {row.temperature: row for row in result.rows}
    return {
        "recipe": name,
        "flags": flags,
        "seed": seed,
        "tau_t0": rows[0.0].tau,
        "tau_t1": rows[1.0].tau,
        "acceptance_t1": rows[1.0].acceptance_per_position,
        "tau_sim": result.offline_tau_sim,
        "eval_loss": (trained.eval or {}).get("loss"),
        "train_seconds": round(train_seconds, 1),
        "draft": trained.draft,
    }


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def table(records: list[dict]) -> str:
    lines = [
        "| recipe | n | tau T=0 | tau T=1 | acceptance per position T=1 | tau_sim | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["recipe"] for r in records):
        rs = [r for r in records if r["recipe"] == name]
        positions = zip(*(r["acceptance_t1"] for r in rs))
        acceptance = " / ".join(spread(list(p)) for p in positions)
        lines.append(
            f"| {name} | {len(rs)} | {spread([r['tau_t0'] for r in rs])} | {spread([r['tau_t1'] for r in rs])} | "
            f"{acceptance} | {spread([r['tau_sim'] for r in rs])} | {spread([r['train_seconds'] for r in rs])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/losses"))
    parser.add_argument("--recipes", nargs="+", default=["kl", "tv", "kl_tv"], help="names or name=--flag value ...")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument(
        "--parallel", action="store_true", help="Prepare the data, then one process per recipe and seed."
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: RECIPE:SEED in this process, data prepared
    args = parser.parse_args()
    recipes = {}
    for recipe in args.recipes:
        name, _, flags = recipe.partition("=")
        recipes[name] = flags.split() if flags else RECIPES[name]
    out = runs_dir(args.work_dir) / "losses.json"
    if args.one:
        name, seed = args.one.rsplit(":", 1)
        record = run_one(prepare(args.work_dir, run=False), name, recipes[name], int(seed))
        (runs_dir(args.work_dir) / f"{name}-s{seed}.json").write_text(json.dumps(record, indent=1))
        return
    records = json.loads(out.read_text()) if out.exists() else []
    pipeline = prepare(args.work_dir)
    todo = [
        (name, seed)
        for seed in args.seeds  # seed-major: every recipe gets its first seed before any gets a third
        for name in recipes
        if not any(r["recipe"] == name and r["seed"] == seed for r in records)
    ]
    if args.parallel:
        argv = [sys.executable, __file__, "--work-dir", str(args.work_dir), "--recipes", *args.recipes]
        procs = [subprocess.Popen([*argv, "--one", f"{name}:{seed}"]) for name, seed in todo]
        if any(p.wait() for p in procs):
            raise SystemExit("a run failed")
        records += [json.loads((runs_dir(args.work_dir) / f"{n}-s{s}.json").read_text()) for n, s in todo]
        out.write_text(json.dumps(records, indent=1))
    for name, seed in [] if args.parallel else todo:
        records.append(run_one(pipeline, name, recipes[name], seed))
        out.write_text(json.dumps(records, indent=1))
        print(table(records), flush=True)
    print(table([r for r in records if r["recipe"] in recipes and r["seed"] in args.seeds]))


if __name__ == "__main__":
    main()
