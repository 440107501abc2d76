"""Speculative decoding of an exported draft through vLLM, in a subprocess (vLLM spawns its engine core, which needs
the `__main__` guard; the caller doesn't).

    python -m speculators_hf.evaluation.vllm_engine request.json result.json

`evaluate_vllm` writes the request, runs this module and reads back the output ids, timings and vLLM's cumulative
`spec_decode` counters (`llm.get_metrics()`): tau = 1 + accepted / drafts. Modes: `explicit`
(`LLM(model=verifier, speculative_config={"model": draft, "method": "eagle3", ...})`), `auto` (`LLM(model=draft)`:
vLLM reads the verifier and K from the draft's config) and `baseline` (the verifier alone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..utils import UserError, get_logger
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
) -> SpecDecodeResult:
    """Greedy speculative decoding of token-id `prompts` in vLLM (one engine per subprocess).

    Args:
        mode (`str`): `"explicit"` or `"auto"` (see the module docstring).
        baseline (`bool`): also run the verifier alone in a second engine, for the speed-up and the output check.
    """
    if mode not in ("explicit", "auto"):
        raise UserError(f"mode must be 'explicit' or 'auto', got {mode!r}")
    common = dict(
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        max_model_len=max_model_len,
        num_speculative_tokens=num_speculative_tokens,
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
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory(prefix="speculators_hf_vllm_") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", __name__, str(req), str(res)],
            env=env,
            timeout=timeout,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not res.exists():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise RuntimeError(f"vLLM ({request['mode']}) failed with exit code {proc.returncode}:\n{tail}")
        out = json.loads(res.read_text())
        out["timings"]["subprocess_s"] = round(time.perf_counter() - start, 2)
        return out


# ----------------------------------------------------------------------------------- inside the subprocess


def _spec_metrics(llm) -> dict:
    out = {}
    for metric in llm.get_metrics():
        for name in SPEC_METRICS:
            if metric.name == f"vllm:spec_decode_{name}":
                out[name] = list(metric.values) if hasattr(metric, "values") else metric.value
    return out


def _run(request: dict) -> dict:
    t0 = time.perf_counter()
    import torch
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
    )
    spec = {
        "model": request.get("draft"),
        "method": "eagle3",
        "num_speculative_tokens": request["num_speculative_tokens"],
    }
    if request["mode"] == "explicit":
        llm = LLM(model=request["verifier"], speculative_config=spec, **kwargs)
    elif request["mode"] == "auto":
        llm = LLM(model=request["draft"], **kwargs)
    else:
        llm = LLM(model=request["verifier"], **kwargs)
    t2 = time.perf_counter()
    prompts = [{"prompt_token_ids": p} for p in request["prompts"]]
    params = SamplingParams(max_tokens=request["max_new_tokens"], temperature=0.0)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up
    before = _spec_metrics(llm)
    t3 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    t4 = time.perf_counter()
    after = _spec_metrics(llm)
    metrics = {
        k: ([a - b for a, b in zip(v, before.get(k, [0] * len(v)))] if isinstance(v, list) else v - before.get(k, 0))
        for k, v in after.items()
    }  # counters are cumulative: drop warm-up
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(_run(request)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
