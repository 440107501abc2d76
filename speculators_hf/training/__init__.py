"""Stage 3b: train an EAGLE-3 draft with `transformers.Trainer` and the multi-step TTT loss."""

from .arguments import Eagle3ModelArguments, Eagle3TrainingArguments
from .cli import train
from .collator import DataCollatorForEagle3, align_sample
from .data import PackedDataset, open_dataset
from .setup import build_datasets, build_draft
from .trainer import Eagle3Trainer

__all__ = [
    "DataCollatorForEagle3",
    "Eagle3ModelArguments",
    "Eagle3Trainer",
    "Eagle3TrainingArguments",
    "PackedDataset",
    "align_sample",
    "build_datasets",
    "build_draft",
    "open_dataset",
    "train",
]
