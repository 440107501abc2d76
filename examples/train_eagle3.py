"""Train an EAGLE-3 draft for a verifier on the hidden states written by `speculators-hf datagen`.

Runs unchanged on one CPU or GPU (`python examples/train_eagle3.py ...`) and on every topology in accelerate_configs/:

    python examples/train_eagle3.py --verifier-name-or-path meta-llama/Llama-3.1-8B-Instruct --data-path ./data
    accelerate launch --config_file accelerate_configs/ddp.yaml examples/train_eagle3.py ...     # 8 GPUs, DDP
    accelerate launch --config_file accelerate_configs/fsdp2.yaml examples/train_eagle3.py ...   # 8 GPUs, FSDP2
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml examples/train_eagle3.py ... # 2 CPU processes
    python examples/train_eagle3.py ... --hidden-states-source online --hidden-states-servers http://host:8000
        # states streamed from `speculators-hf serve-hidden-states` servers (data from datagen --tokens-only)

Every flag of `speculators-hf train` works here (`--help`); `--config run.yaml` reads them from a file.
"""

import torch

from speculators_hf.commandline import run_command
from speculators_hf.training import Eagle3ModelArguments, Eagle3TrainingArguments, train


def main(model_args: Eagle3ModelArguments, args: Eagle3TrainingArguments) -> None:
    # Data checks, the draft built from the verifier's tensors, the claim on --save-path, then Trainer (DDP/FSDP,
    # bf16, logging, resume from the run's last complete checkpoint)
    trainer = train(model_args, args)
    print(f"[process {trainer.accelerator.process_index}] draft: {trainer.result.draft}", flush=True)
    if trainer.state.global_step == 0:
        return  # the run had finished before: nothing was trained in this process

    # Every process holds the same weights at the end; print a checksum per process to see it.
    with torch.no_grad():
        checksum = sum(p.double().sum().item() for p in trainer.model.parameters() if p.requires_grad)
    print(f"[process {trainer.accelerator.process_index}] trained weights checksum {checksum:.12e}", flush=True)


if __name__ == "__main__":
    raise SystemExit(run_command((Eagle3ModelArguments, Eagle3TrainingArguments), main, prog="train_eagle3.py"))
