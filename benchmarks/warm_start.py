"""Warm start (`train --from-pretrained`) vs from scratch at equal steps, over seeds, on a variation of the embedded
default: a draft pretrained on one half of the chats (domain A) is continued on the other half (domain B), beside
drafts trained on B from scratch with the same flags and steps.

    .venv/bin/python benchmarks/warm_start.py                    # CPU, 3 seeds, the embedded preset's flags
    .venv/bin/python benchmarks/warm_start.py --epochs 0.5       # a shorter budget on B
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/warm_start.py --no-regenerate --pretrain-steps 48 --steps 24

Both halves go through the embedded preset's stages (regenerate unless --no-regenerate, with the tiny peaked
verifier; datagen at 512 tokens; vocab 1024; train 2 epochs at lr 3e-3, total_seq_len 512). A: chitchat chats from
0; B: chats from 600 (disjoint); evaluation: the embedded default's 12 held-out prompts (offset 6000), 48 new tokens,
transformers engine, T=0, K=3, batch 1; τ_sim on B's held-out shards (eval_split 0.1, the same samples for every
draft). The warm draft keeps A's vocabulary mapping (its lm_head rows are tied to it); the scratch drafts use B's.
Outputs: `benchmarks/.work/warm_start/`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from speculators_hf import datagen, evaluation, regenerate, training, vocab
from speculators_hf.datagen import DatagenArguments
from speculators_hf.evaluation import EvaluateArguments
from speculators_hf.regenerate import RegenerateArguments
from speculators_hf.tiny_kit import tiny_verifier, write_chat_jsonl
from speculators_hf.training import Eagle3ModelArguments, Eagle3TrainingArguments
from speculators_hf.vocab import VocabArguments

HALVES = {"A": 0, "B": 600}  # chitchat offsets of the two domains
SAMPLES, EVAL_OFFSET, EVAL_PROMPTS = 360, 6000, 12


def prepare(work: Path, verifier: str, name: str, offset: int, regenerated: bool) -> Path:
    """[Regenerate ->] datagen -> vocab for one half, as the embedded preset runs them."""
    chats = work / f"chats_{name}.jsonl"
    if not chats.exists():  # several seeds may run at once (one process each): written once
        write_chat_jsonl(chats, SAMPLES, offset=offset)
    source = work / f"regenerated_{name}.jsonl" if regenerated else chats
    if not regenerated:
        return _datagen_and_vocab(work, verifier, name, source)
    regenerate.run(
        RegenerateArguments(
            target_model_path=verifier,
            train_data_path=str(chats),
            output_path=str(source),
            backend="transformers",
            max_model_len=512,
            max_samples=SAMPLES,
        )
    )
    return _datagen_and_vocab(work, verifier, name, source)


def _datagen_and_vocab(work: Path, verifier: str, name: str, chats: Path) -> Path:
    data = work / f"data_{name}"
    datagen.run(
        DatagenArguments(
            target_model_path=verifier,
            train_data_path=str(chats),
            output_dir=str(data),
            seq_length=512,
            backend="transformers",
            max_samples=SAMPLES,
        )
    )
    vocab.run(
        VocabArguments(
            token_freq_path=str(data / "token_freq.pt"),
            target_model_path=verifier,
            output_path=str(data),
            draft_vocab_size=1024,
        )
    )
    return data


def train(verifier: str, data: Path, out: Path, seed: int, epochs: float, steps: int, pretrained: str | None = None):
    model_args = Eagle3ModelArguments(verifier_name_or_path=verifier, data_path=str(data), from_pretrained=pretrained)
    args = Eagle3TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        max_steps=steps,  # -1: the epochs decide
        learning_rate=3e-3,
        total_seq_len=512,
        seed=seed,
        report_to="none",
        disable_tqdm=True,
        logging_steps=8,
    )
    return training.run(model_args, args)


def evaluate(verifier: str, draft: str, data: Path, prompts: Path, out: Path) -> tuple[float, float]:
    result = evaluation.run(
        EvaluateArguments(
            draft=draft,
            prompts=str(prompts),
            verifier=verifier,
            engine="transformers",
            k=[3],
            temperature=[0.0],
            batch_size=[1],
            num_speculative_tokens=3,
            num_prompts=EVAL_PROMPTS,
            max_new_tokens=48,
            shards=str(data),
            held_out_fraction=0.1,
            held_out_seed=0,
            total_seq_len=512,
            output_dir=str(out),
        )
    )
    return result.rows[0].tau, result.offline_tau_sim


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=2.0, help="Epochs on B (A: always 2).")
    parser.add_argument("--steps", type=int, default=-1, help="Optimizer steps on B instead of --epochs.")
    parser.add_argument("--pretrain-steps", type=int, default=-1, help="Steps on A instead of 2 epochs.")
    parser.add_argument("--work", default="benchmarks/.work/warm_start")
    parser.add_argument("--no-regenerate", action="store_true", help="Train on the human chats (faster).")
    a = parser.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    verifier = str(tiny_verifier("peaked"))
    prompts = work / "eval_chats.jsonl"
    if not prompts.exists():
        write_chat_jsonl(prompts, 64, offset=EVAL_OFFSET)
    data = {name: prepare(work, verifier, name, offset, not a.no_regenerate) for name, offset in HALVES.items()}
    pretrained = train(verifier, data["A"], work / f"pretrained_A_{a.pretrain_steps}", 0, 2.0, a.pretrain_steps).draft
    rows: dict[str, list[dict]] = {"pretrained on A only": [], "scratch on B": [], "warm start A -> B": []}
    tau, tau_sim = evaluate(verifier, pretrained, data["B"], prompts, work / f"eval_pretrained_{a.pretrain_steps}")
    rows["pretrained on A only"].append({"tau": tau, "tau_sim": tau_sim, "steps": 0, "seconds": 0.0})
    for seed in a.seeds:
        for recipe, source in (("scratch on B", None), ("warm start A -> B", pretrained)):
            tag = f"{'warm' if source else 'scratch'}_e{a.epochs:g}_n{a.steps}_s{seed}"
            start = time.perf_counter()
            result = train(verifier, data["B"], work / tag, seed, a.epochs, a.steps, source)
            seconds = time.perf_counter() - start
            tau, tau_sim = evaluate(verifier, result.draft, data["B"], prompts, work / f"eval_{tag}")
            rows[recipe].append({"tau": tau, "tau_sim": tau_sim, "steps": result.global_step, "seconds": seconds})
            print(json.dumps({"recipe": recipe, "seed": seed, **rows[recipe][-1]}), flush=True)
    (work / f"results_e{a.epochs:g}_n{a.steps}.json").write_text(json.dumps(rows, indent=1))
    how = "human" if a.no_regenerate else "regenerated"
    budget = f"steps on B {a.steps}, on A {a.pretrain_steps} (-1: epochs on B {a.epochs:g}, on A 2)"
    print(f"\n{budget}; seeds {a.seeds}; {how} chats; tiny peaked verifier; transformers engine, T=0, K=3.")
    print("| recipe | steps on B | τ (mean ± min-max) | τ_sim held-out B | train s |")
    print("|---|---|---|---|---|")
    for recipe, runs in rows.items():
        taus, sims = [r["tau"] for r in runs], [r["tau_sim"] for r in runs]
        secs = statistics.mean(r["seconds"] for r in runs)
        print(f"| {recipe} | {runs[0]['steps']} | {spread(taus)} | {spread(sims)} | {secs:.0f} |")


if __name__ == "__main__":
    main()
