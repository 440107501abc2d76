"""Train an EAGLE-3 draft for a verifier on the hidden states written by `speculators-hf datagen`.

Runs unchanged on one CPU or GPU (`python examples/train_eagle3.py ...`) and on every topology in accelerate_configs/:

    python examples/train_eagle3.py --verifier-name-or-path meta-llama/Llama-3.1-8B-Instruct --data-path ./data
    accelerate launch --config_file accelerate_configs/single_gpu.yaml examples/train_eagle3.py ...
    accelerate launch --config_file accelerate_configs/ddp.yaml examples/train_eagle3.py ...     # 8 GPUs, DDP
    accelerate launch --config_file accelerate_configs/fsdp2.yaml examples/train_eagle3.py ...   # 8 GPUs, FSDP2
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml examples/train_eagle3.py ... # 2 CPU processes

Every flag of `speculators-hf train` works here (`--help`); `--config run.yaml` reads them from a file.
"""

import torch

from speculators_hf.cli.parser import run_command
from speculators_hf.training import (
    Eagle3ModelArguments,
    Eagle3Trainer,
    Eagle3TrainingArguments,
    build_datasets,
    build_draft,
)


def training_function(model_args: Eagle3ModelArguments, args: Eagle3TrainingArguments) -> None:
    # Data: datagen shards, packed into rows of --total-seq-len tokens; a held-out split for evaluation
    train_dataset, eval_dataset, layer_ids = build_datasets(model_args, args)
    # Draft: embedding, lm_head rows and final norm from the verifier; checked against the data and d2t/t2d
    model = build_draft(model_args, train_dataset, layer_ids, seed=args.seed)
    # Trainer does the rest: DDP/FSDP, bf16 autocast on GPU, logging, <save-path>/<epoch>/ drafts, resume
    trainer = Eagle3Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    trainer.train(resume_from_checkpoint=args.checkpoint_to_resume())

    # Every process holds the same weights at the end; print a checksum per process to see it.
    with torch.no_grad():
        checksum = sum(p.double().sum().item() for p in trainer.model.parameters() if p.requires_grad)
    print(f"[process {trainer.accelerator.process_index}] trained weights checksum {checksum:.12e}", flush=True)


if __name__ == "__main__":
    types = (Eagle3ModelArguments, Eagle3TrainingArguments)
    raise SystemExit(run_command(types, lambda m, t, *_: training_function(m, t), prog="train_eagle3.py"))
