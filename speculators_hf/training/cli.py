"""`speculators-hf train` == `python -m speculators_hf.training`: train an EAGLE-3 draft on datagen's output.

    speculators-hf train --verifier-name-or-path meta-llama/Llama-3.1-8B-Instruct --data-path ./data \\
        --save-path ./checkpoints --epochs 20 --lr 1e-4 --total-seq-len 8192 --ttt-steps 3 --logger tensorboard
    accelerate launch --config_file accelerate_configs/ddp.yaml -m speculators_hf.training ...   (multi-GPU)
"""

from __future__ import annotations

from ..cli.parser import run_command
from .arguments import Eagle3ModelArguments, Eagle3TrainingArguments
from .resume import checkpoint_to_resume, clear_previous_run, run_inputs
from .setup import build_datasets, build_draft
from .trainer import Eagle3Trainer


def train(model_args: Eagle3ModelArguments, args: Eagle3TrainingArguments) -> Eagle3Trainer:
    """Check the inputs, build the draft and train it (resuming from the last checkpoint unless disabled)."""
    # Data: datagen shards, packed into rows of --total-seq-len tokens; a held-out split for evaluation
    train_dataset, eval_dataset, layer_ids = build_datasets(model_args, args)
    # Draft: embedding, lm_head rows and final norm from the verifier; checked against the data and d2t/t2d
    model = build_draft(model_args, train_dataset, layer_ids, seed=args.seed)
    # Trainer does the rest: DDP/FSDP, bf16 autocast on GPU, logging, <save-path>/<epoch>/ drafts, resume
    trainer = Eagle3Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    # Resume only a run with the same data, draft and result-changing flags (recorded in each checkpoint)
    trainer.run_inputs = run_inputs(model, args, model_args.data_path, train_dataset.dataset)
    checkpoint = checkpoint_to_resume(args, trainer.run_inputs)
    if checkpoint is None and args.should_save:
        clear_previous_run(args.output_dir)  # a fresh start leaves no other run's checkpoints or drafts behind
    trainer.train(resume_from_checkpoint=checkpoint)
    if model_args.hidden_states_source != "offline":
        from ..online.dataset import report_hidden_states

        report_hidden_states(trainer, train_dataset.dataset)
    return trainer


def main(argv: list[str] | None = None) -> int:
    return run_command((Eagle3ModelArguments, Eagle3TrainingArguments), train, argv, prog="speculators-hf train")


if __name__ == "__main__":
    raise SystemExit(main())
