"""Stage 6: check (and convert) a draft checkpoint so that vLLM serves it as an EAGLE-3 draft.

    speculators-hf export --checkpoint out/checkpoints/2 --output-dir out/draft --verifier-hub-id ORG/VERIFIER

`check_checkpoint` compares `config.json` and the weights with exactly what vLLM's eagle3 speculators loader reads
(`check.py`); a checkpoint in the EAGLE authors' research format (flat config, `midlayer.*`) is converted into the
speculators format (`convert.py`); `--verifier-hub-id` sets the verifier that `vllm serve <draft>` (auto mode) serves.
`run(ExportArguments) -> ExportResult` is the stage (`runner.py`).
"""

from ..formats.checkpoint import VLLM_EAGLE3_VERIFIERS, VLLM_VERSION, vllm_serves_eagle3
from .arguments import ExportArguments
from .check import check_checkpoint, expected_tensors, find_problems, serving_problems
from .cli import main
from .convert import convert_research_checkpoint, set_verifier_name, with_verifier_name
from .runner import ExportResult, export_checkpoint, run

__all__ = [
    "VLLM_EAGLE3_VERIFIERS",
    "VLLM_VERSION",
    "ExportArguments",
    "ExportResult",
    "check_checkpoint",
    "convert_research_checkpoint",
    "expected_tensors",
    "export_checkpoint",
    "find_problems",
    "main",
    "run",
    "serving_problems",
    "set_verifier_name",
    "vllm_serves_eagle3",
    "with_verifier_name",
]
