"""Aux layer ids: one rule (ascending, the order vLLM fuses them in) in datagen, config, training and export; the
ids recorded with the data win over guesses; the seed's layer-id convention is converted only where declared."""

import json
import logging
import shutil

import pytest

from speculators_hf import Eagle3Config
from speculators_hf.datagen import DatagenArguments, build_dataset, resolve_layer_ids
from speculators_hf.export import find_problems
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.tiny_kit import tiny_llama_config, write_chat_jsonl
from speculators_hf.training import Eagle3ModelArguments
from speculators_hf.training.cli import main as train_main
from speculators_hf.training.data import data_layer_ids
from speculators_hf.training.setup import resolve_aux_layer_ids
from speculators_hf.utils import UserError
from tests.training_data import train_argv


@pytest.fixture(scope="module")
def v1_data(tiny_verifier_path, tmp_path_factory):
    """Our datagen's `--data-format-version 1` output (the seed's data_*.pt files, with our data_config.json)."""
    root = tmp_path_factory.mktemp("v1")
    chats = write_chat_jsonl(root / "chats.jsonl", limit=6)
    args = DatagenArguments(
        target_model_path=str(tiny_verifier_path),
        train_data_path=str(chats),
        output_dir=str(root / "data"),
        cache_dir=str(root / "cache"),
        backend="transformers",
        seq_length=64,
        max_samples=4,
        data_format_version=1,
    )
    build_dataset(args)
    return root / "data"


def test_datagen_config_and_export_share_the_ascending_rule(tiny_verifier_path, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_layer_ids([3, 1, 2, 4], 4) == [1, 2, 3, 4]  # datagen stores ascending, and says so
    assert "stored as [1, 2, 3, 4]" in caplog.text
    assert resolve_layer_ids([1, 2, 3, 4], 4) == [1, 2, 3, 4]
    with pytest.raises(UserError, match="not ascending"):
        Eagle3Config.from_verifier(tiny_llama_config(), aux_layer_ids=[3, 1, 2])
    with pytest.raises(UserError, match="not ascending"):
        Eagle3DraftModel.from_verifier(str(tiny_verifier_path), aux_layer_ids=[2, 1, 3])

    draft = Eagle3DraftModel.from_verifier(str(tiny_verifier_path), hub_id="org/v", aux_layer_ids=[1, 2, 3])
    draft.save_pretrained(tmp_path / "draft")
    assert find_problems(tmp_path / "draft")[0] == []
    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    config["eagle_aux_hidden_state_layer_ids"] = [3, 1, 2]  # e.g. written by an older version
    (tmp_path / "draft" / "config.json").write_text(json.dumps(config))
    errors, _ = find_problems(tmp_path / "draft")
    assert any("[3, 1, 2] are not ascending" in e and "use [1, 2, 3]" in e for e in errors), errors


def _train_error(argv, capsys) -> str:
    assert train_main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_v1_datagen_output_trains_with_its_recorded_ids(tiny_verifier_path, v1_data, tmp_path, capsys):
    config = json.loads((v1_data / "data_config.json").read_text())
    assert config["layer_ids"] == [1, 2, 3, 4] and config["layer_id_convention"].startswith("vllm:")
    assert data_layer_ids(v1_data, 1) == [1, 2, 3, 4]  # vLLM convention declared: not shifted

    save = tmp_path / "ckpt"
    assert train_main(train_argv(tiny_verifier_path, v1_data, save, "--max-steps", "1", "--save-strategy", "no")) == 0
    assert json.loads((save / "0" / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]

    # --aux-layer-ids must agree with the recorded ids (equal is fine; another set or order is an error)
    argv = train_argv(tiny_verifier_path, v1_data, tmp_path / "c", "--max-steps", "1", "--aux-layer-ids")
    assert "differs from the aux ids [1, 2, 3]" in _train_error(argv + ["0", "2", "3"], capsys)
    assert "differs from the aux ids [1, 2, 3]" in _train_error(argv + ["2", "1", "3"], capsys)
    assert not (tmp_path / "c").exists()


def test_seed_data_needs_declared_or_given_ids(tiny_verifier_path, v1_data, tmp_path, capsys, caplog):
    seed = tmp_path / "seed"
    seed.mkdir()
    for f in v1_data.glob("data_*.pt"):
        shutil.copy(f, seed / f.name)
    argv = train_argv(tiny_verifier_path, seed, tmp_path / "c", "--max-steps", "1", "--save-strategy", "no")
    # no data_config.json: no silent default, one line naming the flag
    assert "records no layer ids" in _train_error(argv, capsys) and not (tmp_path / "c").exists()
    with pytest.raises(UserError, match="not ascending"):
        resolve_aux_layer_ids(Eagle3ModelArguments("v", aux_layer_ids=[3, 1, 2]), None, 4)

    # the seed's own data_config.json (speculators 0.3.0: output of layer i, no convention named): shifted by +1
    (seed / "data_config.json").write_text(json.dumps({"version": "2.0", "layer_ids": [0, 1, 2, 3]}))
    with caplog.at_level(logging.WARNING):
        assert data_layer_ids(seed, 1) == [1, 2, 3, 4]
    assert "names no layer-id convention" in caplog.text
    (seed / "data_config.json").write_text(json.dumps({"layer_ids": [1, 2, 3, 4], "layer_id_convention": "vllm"}))
    assert data_layer_ids(seed, 1) == [1, 2, 3, 4]
    assert train_main(argv) == 0

    # data recorded in another order (an older datagen): an error, never a silently permuted fc input
    (seed / "data_config.json").write_text(json.dumps({"layer_ids": [3, 1, 2, 4], "layer_id_convention": "vllm"}))
    assert "regenerate it" in _train_error(argv, capsys)
