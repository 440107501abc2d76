"""Runs the vLLM cells of several verifier families in ONE process (started by `test_families.py`):

    python -m tests.vllm_families request.json result.json

Every engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one in-process worker), so vLLM is imported
once and no engine spawns processes: an engine starts in ~10-15 s instead of ~60 s. Per family: datagen with the vLLM
backend (`build_dataset`, the same flags as the transformers run), then vLLM serving the exported draft as an eagle3
speculator of its verifier (greedy). Failures are recorded per family, not raised, so one family cannot hide another.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def datagen(job: dict) -> dict:
    from speculators_hf.datagen import build_dataset
    from speculators_hf.datagen.vllm_backend import VLLMHiddenStatesBackend
    from speculators_hf.utils import UserError
    from tests.families import SEQ, datagen_args

    args = datagen_args(Path(job["verifier"]), Path(job["chats"]), Path(job["out"]), Path(job["cache"]), "vllm")
    try:
        backend = VLLMHiddenStatesBackend(job["verifier"], [1, 2, 3, 4], max_model_len=SEQ, dtype="float32")
    except UserError as err:
        return {"refused": str(err)}
    try:
        return {"summary": build_dataset(args, backend=backend)}
    finally:
        backend.close()


def serve(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    from speculators_hf.evaluation.vllm_engine import _spec_metrics

    llm = LLM(
        model=job["verifier"],
        speculative_config={"model": job["draft"], "method": "eagle3", "num_speculative_tokens": job["k"]},
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=8,
        seed=0,
        disable_log_stats=False,  # the spec-decode counters
    )
    try:
        params = SamplingParams(max_tokens=job["max_new_tokens"], temperature=0.0)
        outputs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
        return {"output_ids": [list(o.outputs[0].token_ids) for o in outputs], "metrics": _spec_metrics(llm)}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    start = time.perf_counter()
    import vllm  # noqa: F401 - once, for every engine below

    results = {"import_s": round(time.perf_counter() - start, 1)}
    for job in request["jobs"]:
        t = time.perf_counter()
        try:
            result = {"datagen": datagen, "serve": serve}[job["kind"]](job)
        except Exception as err:  # noqa: BLE001 - recorded for the test to report
            result = {"error": "".join(traceback.format_exception(err))[-4000:]}
        result["seconds"] = round(time.perf_counter() - t, 1)
        results[f"{job['kind']}:{job['family']}"] = result
        Path(argv[1]).write_text(json.dumps(results))  # partial results survive a crash
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
