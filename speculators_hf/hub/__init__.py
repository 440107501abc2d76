"""Stage 7: upload a served-format draft to the Hugging Face Hub with a model card.

    speculators-hf push --checkpoint ./draft --repo-id my-org/Llama-3.1-8B-Instruct-eagle3 --data-path ./data
    speculators-hf push --checkpoint ./checkpoints/19 --repo-id my-org/x --local-dir staged/   # write, don't upload

The card (`card.py`) says what the draft is for (its verifier), the exact `vllm serve` commands, how it was trained and
the eval card. What is uploaded (`upload.py`) can be staged first in a folder (`--local-dir`) and inspected offline;
the upload itself runs within a total deadline (`--timeout`) in a child process (`transfer.py`). `run(PushArguments)
-> PushResult` is the stage (`runner.py`).

The names below are imported when first used, so that the upload's child process, which imports only `transfer`,
starts without torch and transformers.
"""

import importlib

_API = {
    "PushArguments": "arguments",
    "PushResult": "runner",
    "UploadPlan": "upload",
    "build_model_card": "card",
    "main": "cli",
    "plan_upload": "upload",
    "push_to_hub": "runner",
    "run": "runner",
    "serve_commands": "card",
    "stage_upload": "upload",
    "upload_plan": "upload",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
