"""Stage 3b: train an EAGLE-3 draft with `transformers.Trainer` and the multi-step TTT loss.

`run(model_args, args) -> TrainResult` trains in this process (as many processes as `accelerate launch` started);
`launch(model_args, args, config_file)` starts them itself, with the command `accelerate_command` builds.
"""

from .arguments import Eagle3ModelArguments, Eagle3TrainingArguments
from .collator import DataCollatorForEagle3, align_sample
from .data import PackedDataset, open_dataset
from .setup import build_datasets, build_draft
from .stage import TrainResult, accelerate_command, launch, run, train
from .trainer import Eagle3Trainer

__all__ = [
    "DataCollatorForEagle3",
    "Eagle3ModelArguments",
    "Eagle3Trainer",
    "Eagle3TrainingArguments",
    "PackedDataset",
    "TrainResult",
    "accelerate_command",
    "align_sample",
    "build_datasets",
    "build_draft",
    "launch",
    "open_dataset",
    "run",
    "train",
]
