"""Run our trainer (`speculators_hf.training`) with the same measurement hooks as `_spec_runner.py`.

    .venv/bin/python _ours_runner.py CONFIG.json

CONFIG: {"model_args": {...Eagle3ModelArguments...}, "training_args": {...Eagle3TrainingArguments...},
         "device": "cpu" | "cuda", "result": "out.json", "save_final": "dir" | null}

It goes through the public API (`build_datasets`, `build_draft`, `Eagle3Trainer`), exactly as `speculators-hf train`
does, and records each optimizer step's end time (after a device synchronize, in `on_step_end`), each batch's
real-token count and peak memory (CUDA: max allocated since training started; CPU: peak RSS during training).
"""

import json
import os
import sys
import time

from _spec_runner import RssSampler, last_step_probe, record_peak_memory  # the same measurements for both


def main() -> None:
    cfg = json.loads(open(sys.argv[1]).read())
    device = cfg["device"]
    import torch
    from transformers import TrainerCallback

    from speculators_hf.training import Eagle3ModelArguments, Eagle3Trainer, Eagle3TrainingArguments
    from speculators_hf.training.setup import build_datasets, build_draft

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    record = {"step_end_s": [], "tokens_per_step": []}
    tokens: list = []
    state = {}

    class Timing(TrainerCallback):
        def on_train_begin(self, args, st, control, **kwargs):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            state["rss"] = RssSampler().__enter__()
            state["t0"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kwargs):
            sync()
            record["step_end_s"].append(time.perf_counter())
            if probe is not None:
                probe.on_step_end(len(record["step_end_s"]))

        def on_train_end(self, args, st, control, **kwargs):
            record["train_wall_s"] = time.perf_counter() - state["t0"]
            rss = state["rss"]
            rss.__exit__(None, None, None)
            record_peak_memory(record, device, rss, probe)

    model_args = Eagle3ModelArguments(**cfg["model_args"])
    args = Eagle3TrainingArguments(**cfg["training_args"])
    probe = last_step_probe(device, args.max_steps)
    train_dataset, _, layer_ids = build_datasets(model_args, args)
    model = build_draft(model_args, train_dataset, layer_ids)
    if cfg.get("attn_implementation"):
        model.set_attn_implementation(cfg["attn_implementation"])
    trainer = Eagle3Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=None)
    trainer.add_callback(Timing())
    orig_step = trainer.training_step

    def training_step(model, inputs, *a, **k):
        tokens.append((inputs["document_ids"] >= 0).sum())  # no host sync here; read at the end
        return orig_step(model, inputs, *a, **k)

    trainer.training_step = training_step
    trainer.train()
    if cfg.get("save_final"):
        trainer.save_model(cfg["save_final"])

    n = len(record["step_end_s"])
    record["tokens_per_step"] = [int(t) for t in tokens[:n]]
    record["trainer"] = "speculators_hf"
    record["attn_implementation"] = model.config._attn_implementation
    record["threads"] = torch.get_num_threads()
    with open(cfg["result"], "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
