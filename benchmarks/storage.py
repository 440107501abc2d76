"""Hidden-state storage: fp8_e4m3 (per-(token, layer) scales) vs bfloat16 shards -- bytes, error, speed, acceptance.

    .venv/bin/python benchmarks/storage.py                    # everything (~3 min + three pipeline runs, ~5 min each)
    .venv/bin/python benchmarks/storage.py --skip-pipeline    # only the format measurements (~3 min on 2 cores)
    .venv/bin/python benchmarks/storage.py --pipeline-only    # only the pipeline runs (finished runs are reused)

Every number is a ratio against bfloat16 storage measured in this job:
* `bytes`: shard file bytes per token (`write_shard`), tiny (L=4, H=64) and Llama-3.1-8B (L=4, H=4096) shapes; fp8
  with the float32 scales we store, and with bfloat16 scales (the alternative: written the same way by hand);
* `error`: relative error per token (||x' - x|| / ||x||) per layer on real tiny-verifier states (peaked verifier, real
  chats) and on synthetic H=4096 states with one massive-activation token per sample: fp8 with per-(token, layer)
  scales (ours, fp32 or bf16 scales), fp8 with one scale per sample tensor (what a per-token scale avoids), bfloat16,
  float16;
* `write`: `write_shard` tokens/s (cast or quantize + concatenate + safetensors write to --work-dir), Llama-8B shape,
  bfloat16 states in, with all threads and with one;
* `collate`: data-loading tokens/s at Llama-8B shapes (`ShardDataset` + `DataCollatorForEagle3`, one thread like a
  DataLoader worker, page cache warm): bfloat16 shards; fp8 shards packed as fp8 + scales (what training does: the
  trainer dequantizes on its device; that dequantization *on this CPU* is timed apart); fp8 dequantized in the
  collator;
* `pipeline`: the embedded default (`speculators-hf pipeline`, tiny peaked verifier) run three times, each in its own
  --output-dir under --pipeline-root (reused when finished): `--storage-dtype bfloat16`, `fp8_e4m3`, and bfloat16
  again with training seed 1 (the run-to-run spread that a storage difference must be compared with). For each: its
  eval card (held-out acc_k / tau_sim on its own shards, online tau of the transformers and vLLM engines), held-out
  acc_k / tau_sim of its draft on the *bfloat16* run's shards (equal targets for all), and online tau over ~240
  held-out prompts (transformers engine). Runs under `flock /tmp/speculators_vllm.lock` (the pipeline starts vLLM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

from speculators_hf.formats.shards import (  # noqa: E402
    FP8_DTYPE,
    FP8_MAX,
    SCALE_KEY,
    ShardDataset,
    dequantize,
    quantize_fp8,
    shard_name,
    write_index,
    write_shard,
)
from speculators_hf.training.collator import DataCollatorForEagle3  # noqa: E402
from speculators_hf.training.data import PackedDataset  # noqa: E402

L = 4  # 3 aux layers + the last layer


def synthetic_states(tokens: int, hidden: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`[T, L, H]` states: Gaussian with a norm varying by token and layer, and a few outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, L, hidden, generator=gen) / torch.rand(tokens, L, 1, generator=gen).add(0.2)
    x[..., :: max(1, hidden // 8)] *= 20  # outlier channels
    return x.to(dtype)


def samples_of(states: torch.Tensor, per_sample: int) -> list[dict]:
    out = []
    for a in range(0, len(states), per_sample):
        T = len(states[a : a + per_sample])
        out.append(
            {
                "input_ids": torch.arange(a, a + T) % 32000,
                "loss_mask": torch.ones(T, dtype=torch.long),
                "hidden_states": states[a : a + per_sample],
            }
        )
    return out


def write_bf16_scaled_fp8(path: Path, samples: list[dict]) -> None:
    """The fp8 layout with bfloat16 scales (the alternative to our float32 scales), written by hand."""
    from safetensors.torch import save_file

    q, s = zip(*(quantize_fp8(x["hidden_states"], torch.bfloat16) for x in samples))
    lengths = torch.tensor([len(x["input_ids"]) for x in samples])
    save_file(
        {
            "input_ids": torch.cat([x["input_ids"] for x in samples]),
            "loss_mask": torch.cat([x["loss_mask"].to(torch.uint8) for x in samples]),
            "hidden_states": torch.cat(q),
            SCALE_KEY: torch.cat(s),
            "sample_offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            "sample_ids": torch.arange(len(samples)),
        },
        str(path),
    )


# --------------------------------------------------------------------------------------------------------- bytes


def measure_bytes(work: Path) -> dict:
    results = {}
    for name, hidden, tokens in (("tiny", 64, 8192), ("llama8b", 4096, 2048)):
        samples = samples_of(synthetic_states(tokens, hidden), 512)
        sizes = {}
        for storage in ("bfloat16", "fp8_e4m3"):
            path = work / f"bytes-{name}-{storage}.safetensors"
            write_shard(path, samples, list(range(len(samples))), storage)
            sizes[storage] = path.stat().st_size
        path = work / f"bytes-{name}-fp8-bf16-scales.safetensors"
        write_bf16_scaled_fp8(path, samples)
        sizes["fp8_e4m3 (bf16 scales)"] = path.stat().st_size
        for p in work.glob(f"bytes-{name}-*"):
            p.unlink()
        results[name] = {
            "hidden_size": hidden,
            "tokens": tokens,
            "bytes_per_token": {k: v / tokens for k, v in sizes.items()},
            "ratio_vs_bf16": {k: v / sizes["bfloat16"] for k, v in sizes.items()},
        }
        C.log(f"bytes {name}: " + ", ".join(f"{k} {v / tokens:,.1f} B/token" for k, v in sizes.items()))
    return results


# --------------------------------------------------------------------------------------------------------- error


def real_states(num_samples: int = 48, max_len: int = 256) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    from speculators_hf.datagen.hf_backend import HFHiddenStatesBackend
    from speculators_hf.tiny_kit import chitchat_conversations, tiny_verifier

    path = tiny_verifier("peaked")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = [
        tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)[:max_len]
        for c in chitchat_conversations(num_samples)
    ]
    backend = HFHiddenStatesBackend.from_pretrained(str(path), [1, 2, 3, 4], dtype=torch.float32)
    return [hs for a in range(0, len(ids), 8) for hs in backend.extract(ids[a : a + 8])]  # [T, L, H] each


def relative_errors(states: list[torch.Tensor], roundtrip) -> torch.Tensor:
    """Relative error per token and layer, `[N, L]` over all tokens."""
    errs = []
    for x in states:
        y = roundtrip(x)
        errs.append((y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30))
    return torch.cat(errs)


def per_tensor_fp8(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax() / FP8_MAX
    return (x / scale).to(FP8_DTYPE).float() * scale


def massive_activation_states(samples: int = 4, tokens: int = 512) -> list[torch.Tensor]:
    """Llama-8B-like states (`synthetic_states`, H=4096) whose first token carries massive activations (x1000 on two
    channels, like the BOS token of real LLMs): the case per-token scales exist for."""
    states = []
    for i in range(samples):
        x = synthetic_states(tokens, 4096, seed=i, dtype=torch.float32)
        x[0, :, :2] *= 1000  # float16 storage overflows here (|x| > 65504)
        states.append(x)
    return states


def measure_error() -> dict:
    variants = {
        "fp8 per (token, layer), fp32 scales (ours)": lambda x: dequantize(*quantize_fp8(x), torch.float32),
        "fp8 per (token, layer), bf16 scales": lambda x: dequantize(*quantize_fp8(x, torch.bfloat16), torch.float32),
        "fp8 one scale per sample tensor": per_tensor_fp8,
        "bfloat16": lambda x: x.bfloat16().float(),
        "float16": lambda x: x.half().float(),
    }
    results = {}
    datasets = {
        "tiny peaked verifier, real chats": real_states,
        "synthetic H=4096, one massive-activation token per sample": massive_activation_states,
    }
    for data_name, make in datasets.items():
        states = make()
        result = {"tokens": sum(len(x) for x in states), "layers": ["1", "2", "3", "4 (last)"]}
        for name, fn in variants.items():
            rel = relative_errors(states, fn)  # [N, L]
            result[name] = {
                "mean_per_layer": rel.mean(0).tolist(),
                "p99_per_layer": rel.quantile(0.99, dim=0).tolist(),
                "max": rel.max().item(),
            }
            C.log(f"error ({data_name}) {name}: mean per layer " + " ".join(f"{v:.4f}" for v in rel.mean(0).tolist()))
        results[data_name] = result
    return results


# --------------------------------------------------------------------------------------------------------- speed


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_write(work: Path, tokens: int, repeat: int) -> dict:
    samples = samples_of(synthetic_states(tokens, 4096), 1024)
    results = {"tokens": tokens, "shape": "L=4, H=4096, bfloat16 in"}
    threads = torch.get_num_threads()
    for n in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        for storage in ("bfloat16", "fp8_e4m3"):
            path = work / "write.safetensors"
            seconds = timed(lambda p=path, s=storage: write_shard(p, samples, list(range(len(samples))), s), repeat)
            results[f"{storage}, {n} threads"] = tokens / seconds
            C.log(f"write {storage} ({n} threads): {tokens / seconds:,.0f} tokens/s")
        path.unlink()
    torch.set_num_threads(threads)
    return results


def measure_collate(work: Path, tokens: int, total_seq_len: int, repeat: int) -> dict:
    samples = samples_of(synthetic_states(tokens, 4096), 512)
    dirs = {}
    for storage in ("bfloat16", "fp8_e4m3"):
        d = work / f"collate-{storage}"
        d.mkdir(parents=True, exist_ok=True)
        write_index(d, {"shards": [write_shard(d / shard_name(0), samples, list(range(len(samples))), storage)]})
        dirs[storage] = d
    results = {"tokens": tokens, "total_seq_len": total_seq_len, "shape": "L=4, H=4096", "threads": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (torch gives each worker one thread)

    def loader(storage: str, dtype: torch.dtype | None):
        dataset = ShardDataset(dirs[storage], dequantize=False)
        packed = PackedDataset(dataset, list(range(len(dataset))), total_seq_len)
        collator = DataCollatorForEagle3(total_seq_len, dtype=dtype)
        n = packed.num_tokens

        def run():
            for i in range(len(packed)):
                collator([packed[i]])

        return run, n

    cases = {
        "bfloat16 shards": ("bfloat16", None),
        "fp8 shards -> fp8 + scales batch (training)": ("fp8_e4m3", None),
        "fp8 shards, dequantized to bfloat16 in the collator": ("fp8_e4m3", torch.bfloat16),
    }
    for name, (storage, dtype) in cases.items():
        run, n = loader(storage, dtype)
        results[name] = n / timed(run, repeat)
        C.log(f"collate {name}: {results[name]:,.0f} tokens/s")
    # what the trainer then does on its device, timed here on this CPU (on a GPU it is a few elementwise kernels)
    run, n = loader("fp8_e4m3", None)
    dataset = ShardDataset(dirs["fp8_e4m3"], dequantize=False)
    packed = PackedDataset(dataset, list(range(len(dataset))), total_seq_len)
    batches = [DataCollatorForEagle3(total_seq_len)([packed[i]]) for i in range(len(packed))]

    def deq():
        for b in batches:
            dequantize(b["aux_hidden_states"], b["aux_hidden_states_scale"], torch.float32)
            dequantize(b["verifier_last_hidden_states"], b["verifier_last_hidden_states_scale"], torch.float32)

    results["trainer dequantization to float32, on this CPU"] = n / timed(deq, repeat)
    torch.set_num_threads(threads)
    C.log(f"dequantize (trainer, CPU): {results['trainer dequantization to float32, on this CPU']:,.0f} tokens/s")
    return results


# ------------------------------------------------------------------------------------------------------ pipeline

# name -> (--storage-dtype, extra pipeline flags); "bfloat16, seed 1" gives the run-to-run spread of the same data
PIPELINE_RUNS = {
    "bfloat16": ("bfloat16", []),
    "fp8_e4m3": ("fp8_e4m3", []),
    "bfloat16, seed 1": ("bfloat16", ["--train-args", "--seed 1"]),
}


def run_pipeline(out: Path, storage: str, extra: list[str], log_path: Path) -> Path:
    """Run (or reuse) one embedded-default pipeline; returns its output folder."""
    cmd = ["flock", "/tmp/speculators_vllm.lock", sys.executable, "-m", "speculators_hf.pipeline"]
    cmd += ["--output-dir", str(out), "--storage-dtype", storage, *extra]
    if not (out / "draft" / "eval_card.json").exists():  # a finished run is reused (its stages would all skip)
        C.log(f"pipeline: {' '.join(cmd)}")
        start = time.perf_counter()
        with open(log_path, "w") as logf:
            code = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT)
        if code:
            raise SystemExit(f"pipeline {out} failed ({code}); see {log_path}")
        C.log(f"pipeline {out}: {time.perf_counter() - start:.0f} s")
    return out


def pipeline_numbers(out: Path, reference_data: Path, prompts_file: Path, num_prompts: int, max_new_tokens: int):
    """The run's eval card numbers, plus two that compare drafts on equal terms:
    * held-out tau_sim / acc_k on the *bfloat16* run's shards (a run's own card scores an fp8 run against
      fp8-rounded verifier targets);
    * online tau (transformers engine, greedy chain, K=3) over more held-out prompts: the card's 12 prompts x 48
      tokens give ~65 drafts, too few to resolve a few percent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speculators_hf.evaluation.cli import load_prompts
    from speculators_hf.evaluation.online import evaluate_transformers
    from speculators_hf.modeling import Eagle3DraftModel
    from speculators_hf.training.evaluation import evaluate_shards

    data_config = json.loads((out / "data" / "data_config.json").read_text())
    card = json.loads((out / "draft" / "eval_card.json").read_text())
    numbers = {
        "bytes_per_token": data_config["summary"]["bytes"] / data_config["summary"]["tokens"],
        "tau_sim (own held-out shards)": card["offline"]["tau_sim"],
        "acc_k (own held-out shards)": card["offline"]["acc_k"],
    }
    for run in card["runs"]:
        numbers[f"tau {run['engine']} (eval card)"] = run["tau"]
        numbers[f"drafts {run['engine']} (eval card)"] = run["num_drafts"]
    split = json.loads((Path(card["draft"]) / "training_config.json").read_text())
    offline = evaluate_shards(
        card["draft"],
        reference_data,
        ttt_steps=3,
        held_out_fraction=split["eval_split"],
        seed=split["eval_split_seed"],
        total_seq_len=split["total_seq_len"],
    )
    numbers["tau_sim (bfloat16 held-out shards)"] = offline["tau_sim"]
    numbers["acc_k (bfloat16 held-out shards)"] = offline["acc_k"]
    draft = Eagle3DraftModel.from_pretrained(card["draft"], dtype=torch.float32).eval()
    verifier = AutoModelForCausalLM.from_pretrained(card["verifier"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(card["verifier"])
    prompts = load_prompts(prompts_file, tokenizer, num_prompts)
    result = evaluate_transformers(draft, verifier, prompts, 3, max_new_tokens, tokenizer.eos_token_id, baseline=False)
    key = f"transformers, {len(prompts)} prompts x {max_new_tokens} tokens"
    numbers[f"tau {key}"] = result.tau
    numbers[f"drafts {key}"] = result.num_drafts
    return {"output_dir": str(out), "numbers": numbers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK_DIR / "storage")
    parser.add_argument("--pipeline-root", type=Path, default=Path("/tmp/speculators_hf-storage-bench"))
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--pipeline-only", action="store_true")
    parser.add_argument("--write-tokens", type=int, default=4096)
    parser.add_argument("--collate-tokens", type=int, default=16384)
    parser.add_argument("--total-seq-len", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--eval-chats", type=int, default=400, help="held-out chats for the online tau")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results = {"machine": C.machine_info("cpu"), "load_average_start": C.load_average()}
    if not args.pipeline_only:
        results["bytes"] = measure_bytes(args.work_dir)
        results["error"] = measure_error()
        results["write"] = measure_write(args.work_dir, args.write_tokens, args.repeat)
        results["collate"] = measure_collate(args.work_dir, args.collate_tokens, args.total_seq_len, args.repeat)
    if not args.skip_pipeline:
        from speculators_hf.pipeline import EMBEDDED_EVAL_OFFSET
        from speculators_hf.tiny_kit import write_chat_jsonl

        outs = {
            name: run_pipeline(args.pipeline_root / _slug(name), storage, extra, args.work_dir / f"{_slug(name)}.log")
            for name, (storage, extra) in PIPELINE_RUNS.items()
        }
        prompts = write_chat_jsonl(args.work_dir / "prompts.jsonl", args.eval_chats, offset=EMBEDDED_EVAL_OFFSET)
        reference = outs["bfloat16"] / "data"
        results["pipeline"] = {
            name: pipeline_numbers(out, reference, prompts, args.eval_chats, args.max_new_tokens)
            for name, out in outs.items()
        }
    results["load_average_end"] = C.load_average()
    path = args.work_dir / "storage.json"  # parts measured by earlier calls (--skip-pipeline, --pipeline-only) stay
    previous = json.loads(path.read_text()) if path.exists() else {}
    C.save_results(path, {**previous, **results})
    report({**previous, **results})


def report(results: dict) -> None:
    if "bytes" in results:
        report_format(results)
    if "pipeline" in results:
        report_pipeline(results)


def report_format(results: dict) -> None:
    rows = [
        [shape, *(f"{v:,.1f} ({r['ratio_vs_bf16'][k]:.3f}x)" for k, v in r["bytes_per_token"].items())]
        for shape, r in results["bytes"].items()
    ]
    print(C.markdown_table(["shape", *next(iter(results["bytes"].values()))["bytes_per_token"]], rows))
    for data_name, err in results["error"].items():
        rows = [
            [name, *(f"{v:.4f}" for v in e["mean_per_layer"]), f"{e['max']:.4f}"]
            for name, e in err.items()
            if isinstance(e, dict)
        ]
        headers = [f"relative error per token: {data_name}", *(f"layer {i}" for i in err["layers"]), "max"]
        print(C.markdown_table(headers, rows))
    print(C.markdown_table(["write_shard, Llama-8B shape", "tokens/s"], [[k, v] for k, v in results["write"].items()]))
    print(C.markdown_table(["loading, Llama-8B shape", "tokens/s"], [[k, v] for k, v in results["collate"].items()]))


def report_pipeline(results: dict) -> None:
    runs = results["pipeline"]
    base = runs["bfloat16"]["numbers"]
    for name, run in runs.items():
        print(f"\n{name} ({run['output_dir']}):")
        rows = [[key, str(value), _relative(value, base.get(key))] for key, value in run["numbers"].items()]
        print(C.markdown_table(["", "value", "vs bfloat16"], rows))


def _slug(name: str) -> str:
    return name.replace(", ", "-").replace(" ", "")


def _relative(value, base) -> str:
    if isinstance(value, list):
        return " ".join(_relative(v, b) for v, b in zip(value, base))
    return f"{value / base - 1:+.2%}" if isinstance(base, (int, float)) and base else "-"


if __name__ == "__main__":
    main()
