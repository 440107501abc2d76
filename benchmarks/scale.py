"""Scale by simulation: N synthetic chats through every stage's own code that needs no real model.

    .venv/bin/python benchmarks/scale.py                          # N = 10k and 100k, every stage (~15 min on 2 cores)
    .venv/bin/python benchmarks/scale.py --sizes 1000000 --stages holdout source eval_prompts train_data
    .venv/bin/python benchmarks/scale.py --sizes 2000 --stages datagen   # one stage, a small N (~30 s)

Each stage runs in a fresh subprocess (`--child`), so its peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is
its own; `base MiB` is the RSS after its imports and before its work, `peak MiB` the process peak, `grown` their
difference (what the stage itself held at most). Inputs are made once per N under `--work-dir` and reused:

* `holdout`       `datagen.holdout.hold_out_prompts`: the pipeline's split of a local chat file (64 held out)
* `source`        `datagen.sources.load_source`: JSONL -> Arrow (datasets' own cache in the work dir) + row checks
* `tokenize`      `datagen.tokenize.tokenize_dataset` with the tiny kit's tokenizer and ChatML template (cache miss;
                  `--num-proc` processes: the peak RSS is the parent's)
* `datagen`       `datagen.run --tokens-only` (tokenization cached by the stage above): plan, shards of
                  --shard-size-mb 1 (~116k tokens, where a 1 GiB bf16 shard of Llama-3.1-8B holds 32k), index.json,
                  data_config.json, token_freq.pt
* `vocab`         `vocab.run` on that token_freq.pt (draft vocabulary 1,024 of 2,048)
* `train_data`    training's reader on those shards: `ShardDataset` (tokens only), `train_eval_split`, `PackedDataset`
                  (lengths + `pack`, rows of 8,192) and one epoch of a seeded `RandomSampler` over the packs, every
                  pack read (tokens and masks; the hidden states are `loader.py`'s part)
* `resume`        the data side of a training resume: `records.data_fingerprint` of the folder, and accelerate's
                  `skip_first_batches` skipping half an epoch of that sampler (what `Trainer` does on resume)
* `regenerate_store` `regenerate.run` with an in-process fake engine (answers of 24 tokens): the first run is cut
                  after half the chats (the engine raises), the second resumes from the partial store and writes the
                  output; times and RSS of both runs together
* `eval_prompts`  `evaluation.prompts.load_prompts`: the last 64 prompts of the chat file (offset N - 64)

Chats are synthetic (seeded): 1-3 user/assistant exchanges of 8-60 words each, ~220 tokens of the tiny tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = (
    "holdout",
    "source",
    "tokenize",
    "datagen",
    "vocab",
    "train_data",
    "resume",
    "regenerate_store",
    "eval_prompts",
)
NUM_PROC = 1  # tokenize's and datagen's --num-proc (a child sets it from its own --num-proc)
WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or had by hot "
    "word but what some we can out other were all there when up use your how said an each she which do their time if "
    "will way about many then them write would like so these her long make thing see him two has look more day could "
    "go come did number sound no most people my over know water than call first who may down side been now find any "
    "new work part take get place made live where after back little only round man year came show every good me give "
    "our under name very through just form sentence great think say help low line differ turn cause much mean before "
    "move right boy old too same tell does set three want air well also play small end put home read hand port large"
).split()


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def anon_rss_mib() -> float:
    """Resident memory that is not a mapped file (mmap'd shards count in the peak RSS, but are page cache)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def write_chats(path: Path, n: int, seed: int = 0) -> Path:
    """`n` JSONL rows `{"messages": [...]}`: 1-3 exchanges of 8-60 words; every 8th row without an id, others with."""
    if path.exists():
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            messages = []
            for _ in range(rng.randint(1, 3)):
                for role in ("user", "assistant"):
                    words = rng.choices(WORDS, k=rng.randint(8, 60))
                    messages.append({"role": role, "content": " ".join(words).capitalize() + "."})
            row = {"messages": messages} if i % 8 == 0 else {"id": f"c{i}", "messages": messages}
            f.write(json.dumps(row) + "\n")
    tmp.rename(path)
    return path


# --------------------------------------------------------------------------------------------- the stages (children)


def stage_holdout(n: int, work: Path, chats: Path) -> dict:
    from speculators_hf.datagen.holdout import hold_out_prompts

    folder = work / "holdout"
    folder.mkdir(exist_ok=True)
    (folder / "held_out.json").unlink(missing_ok=True)
    return lambda: {"train_file_mb": round(hold_out_prompts(chats, folder, 64)[0].stat().st_size / 2**20, 1)}


def stage_source(n: int, work: Path, chats: Path):
    import shutil

    from speculators_hf.datagen.sources import load_source

    shutil.rmtree(work / "hf-source", ignore_errors=True)
    return lambda: {"rows": len(load_source(str(chats), cache_dir=str(work / "hf-source")))}


def _tokenizer():
    from transformers import AutoTokenizer

    from speculators_hf.tiny_kit import tiny_verifier

    return AutoTokenizer.from_pretrained(tiny_verifier("random"))


def stage_tokenize(n: int, work: Path, chats: Path):
    from speculators_hf.datagen.sources import load_source
    from speculators_hf.datagen.tokenize import tokenize_dataset

    tokenizer = _tokenizer()
    for old in (work / "hf").glob("speculators_hf/tokenized-*"):
        old.unlink()

    def go():
        raw = load_source(str(chats), cache_dir=str(work / "hf"))
        tokenized, stats = tokenize_dataset(raw, tokenizer, 2048, None, str(work / "hf"), num_proc=NUM_PROC)
        return {"tokens": int(sum(tokenized["num_tokens"])), "skipped": stats["num_skipped"]}

    return go


def _datagen_args(work: Path, chats: Path):
    from speculators_hf.datagen.arguments import DatagenArguments
    from speculators_hf.tiny_kit import tiny_verifier

    return DatagenArguments(
        target_model_path=str(tiny_verifier("random")),
        train_data_path=str(chats),
        output_dir=str(work / "shards"),
        cache_dir=str(work / "hf"),
        tokens_only=True,
        shard_size_mb=1,
        overwrite=True,
        num_proc=NUM_PROC,
    )


def stage_datagen(n: int, work: Path, chats: Path):
    from speculators_hf.datagen import run

    args = _datagen_args(work, chats)

    def go():
        result = run(args)
        return {"shards": result.shards, "tokens": result.tokens, "samples": result.samples}

    return go


def stage_vocab(n: int, work: Path, chats: Path):
    from speculators_hf.vocab import VocabArguments, run

    args = VocabArguments(
        token_freq_path=str(work / "shards" / "token_freq.pt"),
        draft_vocab_size=1024,
        target_vocab_size=2048,
        output_path=str(work / "vocab"),
        overwrite=True,
    )
    return lambda: {"coverage": run(args).coverage}


def _packed(work: Path):
    from speculators_hf.formats.shards import ShardDataset  # imported by the stages before their clock starts
    from speculators_hf.training.data import PackedDataset, train_eval_split

    dataset = ShardDataset(work / "shards")
    train_idx, _ = train_eval_split(len(dataset), 0.01, 0)
    return dataset, PackedDataset(dataset, train_idx, 8192)


def stage_train_data(n: int, work: Path, chats: Path):
    import torch

    import speculators_hf.training.data  # noqa: F401  (imports before the clock starts)

    def go():
        dataset, packed = _packed(work)
        sampler = torch.utils.data.RandomSampler(packed, generator=torch.Generator().manual_seed(0))
        tokens = 0
        for i in sampler:
            tokens += sum(len(dataset[j]["input_ids"]) for j in packed.packs[i])  # tokens only: no placeholders
        return {"samples": len(dataset), "packs": len(packed), "tokens_read": tokens}

    return go


def stage_resume(n: int, work: Path, chats: Path):
    import torch
    from accelerate.data_loader import skip_first_batches

    import speculators_hf.training.data  # noqa: F401
    from speculators_hf.training.records import data_fingerprint

    def go():
        dataset, packed = _packed(work)
        fingerprint = data_fingerprint(work / "shards", dataset)
        sampler = torch.utils.data.RandomSampler(packed, generator=torch.Generator().manual_seed(0))
        loader = torch.utils.data.DataLoader(range(len(packed)), batch_size=1, sampler=sampler)
        skipped = skip_first_batches(loader, len(packed) // 2)
        rest = sum(1 for _ in skipped)
        return {"fingerprint": fingerprint[:8], "batches_after_skip": rest}

    return go


class FakeEngine:
    """Answers every prompt with the same 24 token ids and an end of turn (no model)."""

    name, version, max_model_len = "transformers", "fake", 4096

    def __init__(self, eos: int, stop_after: int | None = None):
        self.answer = [(17 * k) % 1500 + 300 for k in range(24)] + [eos]
        self.stop_after, self.done = stop_after, 0

    def generate(self, requests):
        from speculators_hf.regenerate.generation import Generation

        if self.stop_after is not None and self.done >= self.stop_after:
            raise KeyboardInterrupt("simulated kill")
        self.done += len(requests)
        return [Generation(list(self.answer), "stop") for _ in requests]

    def close(self):
        pass


def stage_regenerate_store(n: int, work: Path, chats: Path):
    import shutil

    from speculators_hf.regenerate import RegenerateArguments, run
    from speculators_hf.tiny_kit import tiny_verifier

    out = work / "regen" / "out.jsonl"
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir()
    args = RegenerateArguments(
        target_model_path=str(tiny_verifier("random")),
        train_data_path=str(chats),
        output_path=str(out),
        backend="transformers",
        max_new_tokens=32,
        max_turns=1,
        max_model_len=4096,
        cache_dir=str(work / "hf-regen"),
    )
    eos = _tokenizer().convert_tokens_to_ids("<|im_end|>")

    def go():
        try:
            run(args, engine=FakeEngine(eos, stop_after=n // 2))
        except KeyboardInterrupt:
            pass
        result = run(args, engine=FakeEngine(eos))
        return {"written": result.written, "output_mb": round(out.stat().st_size / 2**20, 1)}

    return go


def stage_eval_prompts(n: int, work: Path, chats: Path):
    from speculators_hf.evaluation.prompts import load_prompts

    tokenizer = _tokenizer()
    return lambda: {"prompts": len(load_prompts(chats, tokenizer, 64, offset=n - 64))}


def child(stage: str, n: int, work: Path, chats: Path) -> None:
    go = globals()[f"stage_{stage}"](n, work, chats)
    import gc

    gc.collect()
    base = current_rss_mib()
    start = time.perf_counter()
    info = go()
    seconds = time.perf_counter() - start
    peak, anon = rss_mib(), anon_rss_mib()
    row = {"stage": stage, "n": n, "seconds": round(seconds, 2), "base_mib": round(base, 1)}
    row |= {"peak_mib": round(peak, 1), "grown_mib": round(peak - base, 1), "anon_end_mib": round(anon, 1)}
    print(json.dumps(row | info))


# ---------------------------------------------------------------------------------------------------------- parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--work-dir", default=str(HERE / ".work" / "scale"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per stage before it is given up")
    p.add_argument("--label", default="", help="a note recorded with each result (e.g. 'before')")
    p.add_argument("--num-proc", type=int, default=1, help="tokenize's processes (datagen --num-proc)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    global NUM_PROC
    NUM_PROC = a.num_proc
    if a.child:
        work = Path(a.work_dir) / f"n{a.n}"
        child(a.child, a.n, work, work / "chats.jsonl")
        return
    results = Path(a.work_dir) / "results.jsonl"
    print(f"{platform.machine()}, python {platform.python_version()}, load {os.getloadavg()[0]:.1f}")
    print(f"{'stage':<17} {'N':>9} {'s':>8} {'base MiB':>9} {'peak MiB':>9} {'grown':>8}  info")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    for n in a.sizes:
        work = Path(a.work_dir) / f"n{n}"
        work.mkdir(parents=True, exist_ok=True)
        write_chats(work / "chats.jsonl", n)
        for stage in a.stages:
            cmd = [sys.executable, __file__, "--child", stage, "--n", str(n), "--work-dir", a.work_dir]
            cmd += ["--num-proc", str(a.num_proc)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
            except subprocess.TimeoutExpired:
                print(f"{stage:<17} {n:>9} over {a.timeout:.0f} s: given up", flush=True)
                continue
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                print(f"{stage:<17} {n:>9} FAILED (exit {proc.returncode}): {proc.stderr.strip()[-800:]}", flush=True)
                continue
            row = json.loads(lines[-1]) | {"label": a.label, "load": round(os.getloadavg()[0], 1)}
            row |= {"num_proc": a.num_proc} if stage in ("tokenize", "datagen") else {}
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            extra = {k: v for k, v in row.items() if k not in ("stage", "n", "seconds", "base_mib", "peak_mib",
                                                              "grown_mib", "label")}  # fmt: skip
            print(f"{stage:<17} {n:>9} {row['seconds']:8.2f} {row['base_mib']:9.1f} {row['peak_mib']:9.1f} "
                  f"{row['grown_mib']:8.1f}  {extra}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
