"""`speculators-hf train` == `python -m speculators_hf.training`: train an EAGLE-3 draft on datagen's output.

    speculators-hf train --verifier-name-or-path meta-llama/Llama-3.1-8B-Instruct --data-path ./data \\
        --save-path ./checkpoints --epochs 20 --lr 1e-4 --total-seq-len 8192 --ttt-steps 3 --logger tensorboard
    accelerate launch --config_file accelerate_configs/ddp.yaml -m speculators_hf.training ...   (multi-GPU)
"""

from __future__ import annotations

from ..commandline import run_command
from .arguments import Eagle3ModelArguments, Eagle3TrainingArguments
from .stage import run


def main(argv: list[str] | None = None) -> int:
    return run_command((Eagle3ModelArguments, Eagle3TrainingArguments), run, argv, prog="speculators-hf train")


if __name__ == "__main__":
    raise SystemExit(main())
