"""`PushArguments`: every flag of `speculators-hf push` (`python -m speculators_hf.hub`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..utils import UserError


@dataclass
class PushArguments:
    """Upload a served-format draft with its model card (verifier, vllm serve command, training, eval card).

    The draft is checked as export checks it (a draft vLLM would refuse, or one whose weights hold NaN/inf, is
    refused). With --local-dir, the folder that would be uploaded is written there and nothing is uploaded.

    Example: speculators-hf push --checkpoint out/draft --repo-id my-org/Llama-3.1-8B-Instruct-eagle3"""

    checkpoint: str = field(metadata={"help": "Draft checkpoint folder (checked with the export checks first)."})
    repo_id: str = field(metadata={"help": "Hub repo, e.g. my-org/Llama-3.1-8B-Instruct-eagle3."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    local_dir: str | None = field(
        default=None, metadata={"help": "Write the folder that would be uploaded here and upload nothing."}
    )
    data_path: str | None = field(
        default=None,
        metadata={
            "help": "Datagen's output folder: its data_config.json describes the data in the card (default: the "
            "data_config.json carried in --checkpoint, if any)."
        },
    )
    timeout: float = field(
        default=3600.0,
        metadata={
            "help": "Seconds the whole upload (creating the repo and committing every file) may take before push "
            "stops with an error; a request that receives nothing for 60 s also fails."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "With --local-dir: stage again over an earlier staging there (only the files it wrote)."},
    )

    def __post_init__(self) -> None:
        if not self.checkpoint.strip():
            raise UserError("--checkpoint is empty; give the draft folder.")
        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as err:
            raise UserError(f"--repo-id {self.repo_id!r} is not a hub repo id ({err}); use ORG/NAME.") from None
        if "/" not in self.repo_id:
            raise UserError(f"--repo-id {self.repo_id!r}: name the owner too, as ORG/NAME.")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise UserError(f"--timeout {self.timeout}: give a number of seconds > 0 (default 3600).")
        if self.local_dir is not None and not self.local_dir.strip():
            raise UserError("--local-dir is empty; give a folder, or leave the flag out to upload.")
        if self.data_path is not None and not self.data_path.strip():
            raise UserError("--data-path is empty; give datagen's output folder, or leave the flag out.")
