"""Regeneration throughput: generated tokens/s of each `speculators_hf.regenerate` engine on the same chats (one job).

    .venv/bin/python benchmarks/regenerate_throughput.py                  # CPU: tiny peaked verifier, embedded chats
    .venv/bin/python benchmarks/regenerate_throughput.py --model PATH --chats chats.jsonl --max-samples 2000 \
        --backends vllm transformers --max-model-len 4096                 # a real model

Each backend runs `python -m speculators_hf.regenerate` in a fresh subprocess, one after the other, with the same
flags (greedy, multi-turn). Reported per backend: generated tokens/s after the engine is up (the tool's own
`this_run` counter), the whole command's wall time (engine start included), and whether its output is byte-identical
to the first backend's. Ratios are against the first backend. `--server` adds a `vllm serve` run (the server's
start-up is not in its wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).resolve().parent / ".work" / "regenerate"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Verifier (default: the tiny peaked verifier of the kit).")
    parser.add_argument("--chats", default=None, help="Chat JSONL (default: the pipeline's embedded chats).")
    parser.add_argument("--max-samples", type=int, default=360)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--backends", nargs="+", default=["vllm", "transformers"])
    parser.add_argument("--server", action="store_true", help="Also measure --server-url against `vllm serve`.")
    a = parser.parse_args()

    from speculators_hf.pipeline import EMBEDDED_CHATS
    from speculators_hf.tiny_kit import tiny_verifier, write_chat_jsonl

    WORK.mkdir(parents=True, exist_ok=True)
    model = a.model or str(tiny_verifier("peaked"))
    chats = a.chats or str(write_chat_jsonl(WORK / "chats.jsonl", EMBEDDED_CHATS))
    common = [
        "--target-model-path", model, "--train-data-path", chats, "--max-samples", str(a.max_samples),
        "--max-model-len", str(a.max_model_len), "--temperature", "0", "--overwrite",
    ]  # fmt: skip
    runs = [(b, ["--backend", b]) for b in a.backends]
    results = []
    server = None
    try:
        if a.server:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.vllm_server import vllm_server

            server = vllm_server(model, "--max-model-len", str(a.max_model_len))
            runs.append(("vllm-server", ["--server-url", server.__enter__()]))
        for name, flags in runs:
            out = WORK / f"{name}.jsonl"
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "speculators_hf.regenerate", *common, "--output-path", str(out), *flags],
                check=True,
                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")},
            )
            wall = time.perf_counter() - start
            counts = json.loads((WORK / f"{name}.regenerate_config.json").read_text())["counts"]
            results.append({"backend": name, "wall_s": round(wall, 1), **counts["this_run"], "output": out})
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    first = results[0]
    print(f"\n{'backend':<14}{'tokens':>9}{'tok/s':>10}{'ratio':>8}{'wall s':>9}  identical to {first['backend']}")
    for r in results:
        same = r["output"].read_bytes() == first["output"].read_bytes()
        ratio = r["tokens_per_second"] / max(first["tokens_per_second"], 1e-9)
        print(
            f"{r['backend']:<14}{r['generated_tokens']:>9}{r['tokens_per_second']:>10.0f}{ratio:>8.2f}"
            f"{r['wall_s']:>9.1f}  {same}"
        )


if __name__ == "__main__":
    main()
