"""push: the folder that would be uploaded (checkpoint, side files, model card) is written and checked offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speculators_hf.hub import build_model_card, push_to_hub, stage_upload
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.utils import UserError
from speculators_hf.vocab import build_vocab_mapping

EVAL_CARD = {
    "draft": "d",
    "verifier": "org/tiny-verifier",
    "date": "2026-01-01T00:00:00+00:00",
    "dataset": {"path": "chat.jsonl", "num_prompts": 8, "offset": 100, "max_new_tokens": 64},
    "hardware": {"cpu": "x86", "cpu_cores": 2, "torch_threads": 1, "gpus": []},
    "runs": [
        {
            "engine": "vllm",
            "engine_version": "0.32.0",
            "num_speculative_tokens": 3,
            "temperature": 0.0,
            "proposal": "chain",
            "tau": 2.4286,
            "acceptance_per_position": [0.98, 0.27, 0.18],
            "speedup": 1.7,
            "output_matches_verifier_greedy": True,
        }
    ],
    "offline": None,
}


@pytest.fixture(scope="module")
def trained_dir(tiny_verifier_path, tmp_path_factory):
    """A checkpoint folder as training leaves it: checkpoint + eval card, trainer files in the parent."""
    root = tmp_path_factory.mktemp("run")
    d2t, t2d = build_vocab_mapping({i: 1 for i in range(0, 2048, 2)}, 1024, 2048)
    draft = Eagle3DraftModel.from_verifier(
        str(tiny_verifier_path),
        torch.from_numpy(d2t),
        torch.from_numpy(t2d),
        hub_id="org/tiny-verifier",
        aux_layer_ids=[1, 2, 3],
    )
    draft.save_pretrained(root / "checkpoint")
    (root / "checkpoint" / "eval_card.json").write_text(json.dumps(EVAL_CARD))
    (root / "training_args.json").write_text(
        json.dumps({"learning_rate": 3e-4, "num_train_epochs": 2, "ttt_steps": 3})
    )
    (root / "trainer_state.json").write_text(json.dumps({"global_step": 1234, "epoch": 2.0}))
    (root / "data_config.json").write_text(json.dumps({"data_path": "sharegpt.jsonl", "layer_ids": [1, 2, 3, 4]}))
    return root / "checkpoint"


def test_staged_folder_is_the_served_checkpoint_with_card(trained_dir, tmp_path):
    staged = stage_upload(trained_dir, "my-org/tiny-eagle3", tmp_path / "up")
    names = {p.name for p in staged.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "eval_card.json",
        "training_args.json",
        "trainer_state.json",
        "data_config.json",
    } <= names
    assert load_file(staged / "model.safetensors").keys() == load_file(trained_dir / "model.safetensors").keys()
    assert (staged / "config.json").read_text() == (trained_dir / "config.json").read_text()


def test_model_card_renders_verifier_serve_command_training_and_eval(trained_dir):
    from huggingface_hub import ModelCard

    text = build_model_card(trained_dir, "my-org/tiny-eagle3")
    card = ModelCard(text)
    assert card.data.base_model == "org/tiny-verifier"
    assert "eagle3" in card.data.tags
    assert "vllm serve my-org/tiny-eagle3\n" in text
    assert (
        'vllm serve org/tiny-verifier --speculative-config \'{"model": "my-org/tiny-eagle3", "method": "eagle3", '
        '"num_speculative_tokens": 3}\''
    ) in text
    assert "Steps: 1234" in text and '"learning_rate": 0.0003' in text and "sharegpt.jsonl" in text
    assert "2.429" in text and "[0.980, 0.270, 0.180]" in text and "| vllm | 0.32.0 | 3 |" in text


def test_local_verifier_path_is_refused(trained_dir, tmp_path):
    import shutil

    local = tmp_path / "ckpt"
    shutil.copytree(trained_dir, local)
    config = json.loads((local / "config.json").read_text())
    config["speculators_config"]["verifier"]["name_or_path"] = "/home/me/verifier"
    (local / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="--verifier-hub-id"):
        stage_upload(local, "my-org/x", tmp_path / "up")


def test_real_upload_fails_loudly_when_offline(trained_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception) as err:  # noqa: B017 - whatever huggingface_hub raises, it must not pass silently
        push_to_hub(trained_dir, "my-org/tiny-eagle3", token="hf_dummy")
    assert "offline" in str(err.value).lower() or "connect" in str(err.value).lower()


def test_cli_local_dir_stages_without_upload(trained_dir, tmp_path):
    cli = str(Path(sys.executable).with_name("speculators-hf"))
    done = subprocess.run(
        [
            cli,
            "push",
            "--checkpoint",
            str(trained_dir),
            "--repo-id",
            "my-org/tiny-eagle3",
            "--local-dir",
            str(tmp_path / "staged"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "staged (not uploaded)" in done.stdout
    assert (tmp_path / "staged" / "README.md").read_text().startswith("---\nbase_model: org/tiny-verifier")
