"""Stage 7: upload a served-format draft to the Hugging Face Hub with a model card.

    speculators-hf push --checkpoint ./draft --repo-id my-org/Llama-3.1-8B-Instruct-eagle3 --data-path ./data
    speculators-hf push --checkpoint ./checkpoints/19 --repo-id my-org/x --local-dir staged/   # write, don't upload

The card (`card.py`) says what the draft is for (its verifier), the exact `vllm serve` commands, how it was trained and
the eval card. What is uploaded (`upload.py`) can be staged first in a folder (`--local-dir`) and inspected offline;
the upload itself runs within a total deadline (`--timeout`). `run(PushArguments) -> PushResult` is the stage.
"""

from .arguments import PushArguments
from .card import build_model_card, serve_commands
from .cli import main
from .runner import PushResult, push_to_hub, run
from .upload import UploadPlan, plan_upload, stage_upload, upload

__all__ = [
    "PushArguments",
    "PushResult",
    "UploadPlan",
    "build_model_card",
    "main",
    "plan_upload",
    "push_to_hub",
    "run",
    "serve_commands",
    "stage_upload",
    "upload",
]
