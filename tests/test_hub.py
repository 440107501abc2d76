"""push: the folder that would be uploaded (checkpoint, side files, model card) is written and checked offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from speculators_hf.hub import build_model_card, push_to_hub, stage_upload
from speculators_hf.utils import UserError

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
def real_run(tiny_verifier_path, tmp_path_factory):
    """A real short run (datagen -> vocab -> train, one epoch), from a working directory of its own: the model card
    must read what such a run writes. Returns its folder; the epoch draft is `checkpoints/0` (+ a hand-made eval
    card, as `evaluate` writes one there)."""
    import os

    from speculators_hf.datagen.cli import main as datagen
    from speculators_hf.tiny_kit import write_chat_jsonl
    from speculators_hf.training.cli import main as train
    from speculators_hf.vocab.cli import main as vocab

    root = tmp_path_factory.mktemp("run")
    verifier, data = str(tiny_verifier_path), str(root / "data")
    chats = write_chat_jsonl(root / "chats.jsonl", 8)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        datagen_argv = ["--target-model-path", verifier, "--train-data-path", str(chats), "--output-dir", data]
        assert datagen([*datagen_argv, "--seq-length", "128", "--backend", "transformers"]) == 0
        vocab_argv = ["--token-freq-path", f"{data}/token_freq.pt", "--output-path", data]
        assert vocab([*vocab_argv, "--draft-vocab-size", "256", "--target-model-path", verifier]) == 0
        train_argv = ["--verifier-name-or-path", verifier, "--data-path", data, "--save-path", "checkpoints"]
        train_argv += ["--verifier-hub-id", "org/tiny-verifier", "--total-seq-len", "256", "--epochs", "1"]
        assert train([*train_argv, "--eval-split", "0", "--logging-steps", "1", "--report-to", "none"]) == 0
    finally:
        os.chdir(cwd)
    (root / "checkpoints" / "0" / "eval_card.json").write_text(json.dumps(EVAL_CARD))
    return root


@pytest.fixture(scope="module")
def trained_dir(real_run):
    return real_run / "checkpoints" / "0"


def test_a_real_run_writes_no_stray_log_folder(real_run):
    """`--report-to none` with the default `--log-dir ./logs`: no logger writes, so no `./logs` appears."""
    assert not (real_run / "logs").exists()


def test_staged_folder_is_the_served_checkpoint_with_card(real_run, trained_dir, tmp_path):
    staged = stage_upload(trained_dir, "my-org/tiny-eagle3", tmp_path / "up", data_path=real_run / "data")
    names = {p.name for p in staged.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "eval_card.json",
        "training_config.json",
        "trainer_state.json",
        "data_config.json",
    } <= names
    assert load_file(staged / "model.safetensors").keys() == load_file(trained_dir / "model.safetensors").keys()
    assert (staged / "config.json").read_text() == (trained_dir / "config.json").read_text()


def _check_training_section(text: str, real_run: Path, with_data: bool) -> None:
    (checkpoint,) = (real_run / "checkpoints").glob("checkpoint-*")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert "No training record" not in text
    assert f"- Steps: {state['global_step']} of {state['max_steps']} (epoch 1.0 of 1)" in text
    assert '"ttt_steps": 3' in text and '"loss_mask_alignment": "predicted"' in text and "Last logged: loss" in text
    if with_data:
        data = json.loads((real_run / "data" / "data_config.json").read_text())
        assert f"`chats.jsonl` (a local file) (split `train`), {data['data']['num_samples']} samples" in text
        assert str(real_run) not in text  # no local paths in a public card
    else:
        assert "Data: not recorded" in text


def test_model_card_renders_verifier_serve_command_training_and_eval(real_run, trained_dir):
    from huggingface_hub import ModelCard

    text = build_model_card(trained_dir, "my-org/tiny-eagle3", data_path=real_run / "data")
    card = ModelCard(text)
    assert card.data.base_model == "org/tiny-verifier"
    assert "eagle3" in card.data.tags
    assert "vllm serve my-org/tiny-eagle3\n" in text
    assert (
        'vllm serve org/tiny-verifier --speculative-config \'{"model": "my-org/tiny-eagle3", "method": "eagle3", '
        '"num_speculative_tokens": 3}\''
    ) in text
    _check_training_section(text, real_run, with_data=True)
    assert "2.429" in text and "[0.980, 0.270, 0.180]" in text and "| vllm | 0.32.0 | 3 |" in text
    assert "](https://github.com/)" not in text  # no bare link in the footer
    _check_training_section(build_model_card(trained_dir, "my-org/x"), real_run, with_data=False)


def test_exported_draft_carries_the_training_record(real_run, trained_dir, tmp_path):
    """`export` into another folder carries training_config.json and the matching trainer_state.json, so the card
    of the exported draft still tells how it was trained."""
    from speculators_hf.export import export_checkpoint

    out, _ = export_checkpoint(trained_dir, tmp_path / "draft")
    assert (out / "training_config.json").is_file() and (out / "trainer_state.json").is_file()
    _check_training_section(build_model_card(out, "my-org/x"), real_run, with_data=False)
    _check_training_section(build_model_card(out, "my-org/x", real_run / "data"), real_run, with_data=True)


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
            "--data-path",
            str(trained_dir.parent.parent / "data"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "staged (not uploaded)" in done.stdout
    card = (tmp_path / "staged" / "README.md").read_text()
    assert card.startswith("---\nbase_model: org/tiny-verifier") and "`chats.jsonl` (a local file)" in card
