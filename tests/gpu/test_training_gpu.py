"""GPU checks of the trainer (skipped without CUDA): FlexAttention's BlockMask path against dense sdpa, and bf16.

pytest tests/gpu/test_training_gpu.py -q
"""

import pytest
import torch

from speculators_hf.commandline import make_parser, parse
from speculators_hf.training import Eagle3ModelArguments, Eagle3Trainer, Eagle3TrainingArguments
from speculators_hf.training.collator import DataCollatorForEagle3
from speculators_hf.training.setup import build_datasets, build_draft
from tests.training_data import loss_and_grads, make_training_data, train_argv

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("total_seq_len", [256, 200])  # a multiple of the 128 block (extended masks) and not
def test_flex_block_masks_match_dense_sdpa(peaked_verifier_path, tmp_path, total_seq_len):
    data = make_training_data(peaked_verifier_path, tmp_path / "data", num_samples=12)
    argv = train_argv(peaked_verifier_path, data, tmp_path / "ckpt", "--ttt-steps", "4")
    model_args, args = parse(make_parser((Eagle3ModelArguments, Eagle3TrainingArguments)), argv)[:2]
    train_ds, _, layer_ids = build_datasets(model_args, args)
    trainer = Eagle3Trainer(model=build_draft(model_args, train_ds, layer_ids), args=args, train_dataset=train_ds)
    assert next(trainer.model.parameters()).is_cuda
    collator = DataCollatorForEagle3(total_seq_len=total_seq_len)
    batch = collator([[train_ds.dataset[0], train_ds.dataset[1]], [train_ds.dataset[2]]])  # 2 packed rows

    loss_sdpa, grads_sdpa = loss_and_grads(trainer, batch, "sdpa")
    loss_flex, grads_flex = loss_and_grads(trainer, batch, "flex_attention")
    torch.testing.assert_close(loss_flex, loss_sdpa, rtol=1e-4, atol=1e-5)
    for name in grads_sdpa:
        torch.testing.assert_close(grads_flex[name], grads_sdpa[name], rtol=1e-3, atol=1e-5, msg=name)

    loss_bf16, grads_bf16 = loss_and_grads(trainer, batch, "flex_attention", autocast_dtype=torch.bfloat16)
    assert torch.isfinite(loss_bf16) and abs(loss_bf16.item() - loss_sdpa.item()) < 0.05 * loss_sdpa.item()
    assert all(torch.isfinite(g).all() for g in grads_bf16.values())
