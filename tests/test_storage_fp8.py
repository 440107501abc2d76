"""`--storage-dtype fp8_e4m3`: float8 shards with per-(token, layer) scales, datagen -> training -> a served draft.

Real tiny-verifier states (transformers backend), real safetensors files, real `Eagle3Trainer` runs on CPU. The vLLM
serving of a draft trained on fp8 data is not repeated here (an engine start costs 35-60 s): the checkpoint is checked
with `check_checkpoint` and served by the transformers engine; `benchmarks/storage.py` serves one with vLLM.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from speculators_hf.commandline import make_parser, parse
from speculators_hf.datagen import DatagenArguments, HFHiddenStatesBackend, ShardDataset, build_dataset
from speculators_hf.datagen.cli import main as datagen_main
from speculators_hf.evaluation.online import evaluate_transformers, greedy_baseline
from speculators_hf.export import check_checkpoint, export_checkpoint
from speculators_hf.formats.shards import FP8_MAX, dequantize, write_index
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.tiny_kit import write_chat_jsonl
from speculators_hf.training import Eagle3ModelArguments, Eagle3Trainer, Eagle3TrainingArguments
from speculators_hf.training.cli import main as train_main
from speculators_hf.training.collator import DataCollatorForEagle3
from speculators_hf.training.data import open_dataset
from speculators_hf.training.setup import build_datasets, build_draft
from speculators_hf.utils import UserError
from tests.training_data import train_argv

LAYER_IDS = [1, 2, 3, 4]


def datagen_args(model, data, out, cache, storage_dtype, **kw):
    return DatagenArguments(
        target_model_path=str(model),
        train_data_path=str(data),
        output_dir=str(out),
        cache_dir=str(cache),
        seq_length=128,
        backend="transformers",
        batch_size=4,
        max_samples=12,
        storage_dtype=storage_dtype,
        **kw,
    )


@pytest.fixture(scope="module")
def generated(tiny_verifier_path, tmp_path_factory):
    """The same chats through datagen twice: `--storage-dtype fp8_e4m3` and `bfloat16`."""
    root = tmp_path_factory.mktemp("fp8_datagen")
    chats = write_chat_jsonl(root / "chats.jsonl", limit=12)
    runs = {}
    for storage in ("fp8_e4m3", "bfloat16"):
        summary = build_dataset(datagen_args(tiny_verifier_path, chats, root / storage, root / "cache", storage))
        runs[storage] = (root / storage, summary)
    return root, chats, runs


def test_fp8_shards_round_trip_within_e4m3_bounds_per_layer(generated, tiny_verifier_path):
    root, _, runs = generated
    out, summary = runs["fp8_e4m3"]
    config = json.loads((out / "data_config.json").read_text())
    storage = config["hidden_states_storage"]
    assert storage["dtype"] == "fp8_e4m3" and storage["scale_dtype"] == "float32" and "amax" in storage["scaling"]
    assert config["hidden_states_layout"]["tensors"]["hidden_states"] == "float8_e4m3fn [N, 4, 64]"
    with safe_open(str(out / "data-00000.safetensors"), "pt") as f:  # memory-mappable safetensors, F8_E4M3 inside
        assert f.get_slice("hidden_states").get_dtype() == "F8_E4M3"
        assert f.get_slice("hidden_states_scale").get_shape() == [summary["tokens"], 4]

    raw, deq = ShardDataset(out, dequantize=False), ShardDataset(out)
    assert raw.storage == "fp8_e4m3" and len(raw) == summary["samples"] > 4
    reference = HFHiddenStatesBackend.from_pretrained(str(tiny_verifier_path), LAYER_IDS, dtype=torch.float32)
    errors = {layer: [] for layer in LAYER_IDS}
    for i in range(len(raw)):
        sample = raw[i]
        x = reference.extract([sample["input_ids"].tolist()])[0]  # [T, L, H] float32
        q, scale = sample["hidden_states"], sample["hidden_states_scale"]  # [T, L, H] fp8, [T, L]
        assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        y = deq[i]["hidden_states"]
        assert torch.equal(y, q.float() * scale[..., None])
        # one scale per token and layer: every (token, layer) row uses the full e4m3 range, scale = amax / 448
        torch.testing.assert_close(scale, x.abs().amax(-1) / FP8_MAX, rtol=1e-4, atol=0)
        assert torch.equal(q.float().abs().amax(-1), torch.full_like(scale, FP8_MAX))
        # e4m3 rounding: <= 2^-4 relative per normal value, <= 2^-10 * scale for subnormals (+ extraction noise)
        err, norm = (y - x).norm(dim=-1), x.norm(dim=-1)  # [T, L]
        bound = 2**-4 * norm + 2**-10 * scale * math.sqrt(x.shape[-1]) + 1e-4 * norm
        assert (err <= bound).all(), (err / norm).max()
        for j, layer in enumerate(LAYER_IDS):
            errors[layer].append(err[:, j] / norm[:, j])
    for layer, values in errors.items():
        rel = torch.cat(values)
        print(f"layer {layer}: relative error per token mean {rel.mean():.4f} max {rel.max():.4f}")
        assert 0.005 < rel.mean() < 0.04, (layer, rel.mean())  # rounding happened, and stayed e4m3-sized

    bf16_out, bf16_summary = runs["bfloat16"]
    assert bf16_summary["tokens"] == summary["tokens"]
    ratio = summary["bytes"] / bf16_summary["bytes"]
    # H=64: 4 x 64 fp8 + 4 fp32 scales + 9 bytes of ids/mask per token vs 4 x 64 x 2 + 9 (Llama-8B shapes: 0.501)
    assert ratio == pytest.approx((256 + 16 + 9) / (512 + 9), abs=0.005), ratio
    assert ShardDataset(bf16_out)[0]["hidden_states"].dtype == torch.bfloat16


def test_mixing_storage_dtypes_is_an_error(generated, tiny_verifier_path, tmp_path, capsys):
    root, chats, runs = generated
    fp8_dir, bf16_dir = runs["fp8_e4m3"][0], runs["bfloat16"][0]
    # datagen into a folder of fp8 shards with another storage dtype: one line, nothing written
    before = sorted(p.name for p in fp8_dir.iterdir())
    argv = ["--target-model-path", str(tiny_verifier_path), "--train-data-path", str(chats)]
    argv += ["--output-dir", str(fp8_dir), "--cache-dir", str(root / "cache"), "--seq-length", "128"]
    argv += ["--backend", "transformers", "--max-samples", "12", "--storage-dtype", "bfloat16"]
    assert datagen_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stored as fp8_e4m3" in err[0] and "--overwrite" in err[0], err
    assert sorted(p.name for p in fp8_dir.iterdir()) == before
    # the seed's v1 .pt layout has no scales
    with pytest.raises(ValueError, match="needs --data-format-version 2"):
        datagen_args(tiny_verifier_path, chats, tmp_path / "v1", root / "cache", "fp8_e4m3", data_format_version=1)

    # a folder whose shards were written with two storage dtypes: the reader and `train` refuse it
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(fp8_dir / "data-00000.safetensors", mixed / "data-00000.safetensors")
    shutil.copy(bf16_dir / "data-00000.safetensors", mixed / "data-00001.safetensors")
    entries = json.loads((fp8_dir / "index.json").read_text())["shards"]
    write_index(mixed, {"shards": [entries[0], {**entries[0], "file": "data-00001.safetensors"}]})
    with pytest.raises(UserError, match="data-00001.safetensors stores hidden states as bfloat16 but"):
        ShardDataset(mixed)
    assert train_main(train_argv(tiny_verifier_path, mixed, tmp_path / "ckpt")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "one --storage-dtype" in err[0], err
    # seed-format .pt files with float8 states (no scales) are refused too
    pt = tmp_path / "pt"
    pt.mkdir()
    hs = [torch.randn(6, 64).to(torch.float8_e4m3fn) for _ in range(4)]
    torch.save({"input_ids": torch.arange(6), "hidden_states": hs, "loss_mask": torch.ones(6)}, pt / "data_0.pt")
    with pytest.raises(UserError, match="float8_e4m3fn hidden states without scales"):
        open_dataset(pt)


def parse_args(argv):
    return parse(make_parser((Eagle3ModelArguments, Eagle3TrainingArguments)), argv)[:2]


def test_trainer_dequantizes_fp8_batches_on_its_device(generated, tiny_verifier_path, tmp_path):
    _, _, runs = generated
    model_args, args = parse_args(train_argv(tiny_verifier_path, runs["fp8_e4m3"][0], tmp_path))
    train_ds, _, layer_ids = build_datasets(model_args, args)
    trainer = Eagle3Trainer(model=build_draft(model_args, train_ds, layer_ids).eval(), args=args)
    packs = [train_ds[0], train_ds[1]]
    batch = DataCollatorForEagle3(256)(packs)  # what the data loader yields: fp8 + scales, half the bytes
    assert batch["aux_hidden_states"].dtype == torch.float8_e4m3fn and batch["aux_hidden_states"].shape[-1] == 3 * 64
    assert batch["aux_hidden_states_scale"].shape == (2, 256, 3)
    assert batch["verifier_last_hidden_states_scale"].shape == (2, 256, 1)
    collator_dequantized = DataCollatorForEagle3(256, dtype=torch.float32)(packs)
    assert "aux_hidden_states_scale" not in collator_dequantized
    reference = open_dataset(runs["bfloat16"][0])  # the same samples stored as bfloat16
    bf16_batch = DataCollatorForEagle3(256)([[reference[i] for i in pack_ids] for pack_ids in train_ds.packs[:2]])
    for key in ("aux_hidden_states", "verifier_last_hidden_states"):
        deq = dequantize(batch[key], batch[f"{key}_scale"], torch.float32)  # [2, 256, D]
        assert torch.equal(deq, collator_dequantized[key])
        ref = bf16_batch[key].float()
        assert (deq - ref).norm() / ref.norm() < 0.04, key  # dequantized, not the raw fp8 values
        assert (batch[key].float() - ref).norm() / ref.norm() > 1, key
    with torch.no_grad():
        loss_fp8 = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
        loss_deq = trainer.compute_loss(trainer.model, trainer._prepare_inputs(collator_dequantized))
        loss_bf16 = trainer.compute_loss(trainer.model, trainer._prepare_inputs(bf16_batch))
    assert torch.equal(loss_fp8, loss_deq)
    assert loss_fp8.item() == pytest.approx(loss_bf16.item(), rel=2e-2)


class StopAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_training_on_fp8_shards_resumes_and_its_draft_serves(generated, tiny_verifier_path, tmp_path):
    data = generated[2]["fp8_e4m3"][0]

    def run(save, stop_at=None, resume=None):
        extra = ["--epochs", "1", "--total-seq-len", "128", "--save-strategy", "steps", "--save-steps", "3"]
        model_args, args = parse_args(train_argv(tiny_verifier_path, data, save, *extra))
        train_ds, _, layer_ids = build_datasets(model_args, args)
        model = build_draft(model_args, train_ds, layer_ids, seed=args.seed)
        callbacks = [StopAfter(stop_at)] if stop_at else None
        trainer = Eagle3Trainer(model=model, args=args, train_dataset=train_ds, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    steps = full.state.global_step
    assert steps > 4 and (tmp_path / "full" / "0" / "model.safetensors").exists()
    run(tmp_path / "killed", stop_at=3)
    resumed = run(tmp_path / "killed", resume=str(tmp_path / "killed" / "checkpoint-3"))
    assert resumed.state.global_step == steps
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert all(math.isfinite(h["loss"]) for h in full.state.log_history if "loss" in h)

    # the draft trained on fp8 data is an ordinary checkpoint: export check, load, lossless speculative decoding
    exported, _ = export_checkpoint(tmp_path / "full" / "0", tmp_path / "draft", verifier_hub_id="org/tiny-verifier")
    assert not [w for w in check_checkpoint(exported) if "d2t" in w]
    draft = Eagle3DraftModel.from_pretrained(exported, dtype=torch.float32).eval()
    verifier = AutoModelForCausalLM.from_pretrained(tiny_verifier_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_verifier_path)
    chat = [{"role": "user", "content": "hi there"}]
    prompts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)]
    reference, _ = greedy_baseline(verifier, prompts, 12, tokenizer.eos_token_id)
    result = evaluate_transformers(draft, verifier, prompts, 3, 12, tokenizer.eos_token_id, baseline=False)
    assert result.output_ids == reference and result.num_drafts > 0
