"""The verifier head that makes the training targets: read from the right tensors, refused when it cannot be."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from speculators_hf import Eagle3DraftModel
from speculators_hf.training import Eagle3Trainer, Eagle3TrainingArguments
from speculators_hf.utils import UserError
from tests.test_modeling import mapping


def test_untied_verifier_without_lm_head_is_an_error_not_the_embedding(tiny_verifier_path, tmp_path):
    """issue 10 item 5: the embedding stands in for the lm_head only when the config ties them."""
    copy = tmp_path / "verifier"
    shutil.copytree(tiny_verifier_path, copy)
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = copy / index["weight_map"].pop("lm_head.weight")
    tensors = load_file(shard)
    del tensors["lm_head.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    assert json.loads((copy / "config.json").read_text())["tie_word_embeddings"] is False
    with pytest.raises(UserError, match=r"no lm_head tensor \(lm_head.weight\).*does not tie") as err:
        Eagle3DraftModel.from_verifier(str(copy), *mapping())
    assert "\n" not in str(err.value)


def test_trainer_refuses_a_draft_without_its_verifier_head(tiny_verifier_path, tmp_path):
    """issue 10 item 4: a draft from `from_pretrained` has no verifier head; training it would fit random targets."""
    draft = Eagle3DraftModel.from_verifier(str(tiny_verifier_path), *mapping())
    draft.save_pretrained(tmp_path / "draft")
    loaded = Eagle3DraftModel.from_pretrained(tmp_path / "draft")
    assert loaded.verifier_head is None
    args = Eagle3TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", eval_split=0)
    with pytest.raises(UserError, match="verifier head .* is not loaded: call draft.load_verifier_head") as err:
        Eagle3Trainer(model=loaded, args=args)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not loaded"):
        loaded.verifier_logits(torch.randn(2, 64))

    loaded.load_verifier_head(str(tiny_verifier_path))
    Eagle3Trainer(model=loaded, args=args)  # now accepted
    h = torch.randn(3, 5, 64)
    torch.testing.assert_close(loaded.verifier_logits(h), draft.verifier_logits(h), rtol=0, atol=0)
    # The head is never saved: the checkpoint holds exactly the draft's tensors.
    loaded.save_pretrained(tmp_path / "again")
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(
        load_file(tmp_path / "draft" / "model.safetensors")
    )
