"""The one-command pipeline: every stage on the tiny kit, skipping finished stages, rerunning forced ones."""

import json
import os

import pytest

from speculators_hf.pipeline import Pipeline, PipelineArguments, main
from speculators_hf.tiny_kit import write_chat_jsonl


def small_args(tmp_path, verifier, **overrides) -> PipelineArguments:
    chats = write_chat_jsonl(tmp_path / "chats.jsonl", 40)
    held_out = write_chat_jsonl(tmp_path / "eval.jsonl", 8, offset=6000)
    values = dict(
        verifier=str(verifier),
        train_data_path=str(chats),
        eval_prompts=str(held_out),
        output_dir=str(tmp_path / "run"),
        seq_length=256,
        max_samples=24,
        draft_vocab_size=512,
        epochs=1,
        lr=3e-3,
        total_seq_len=256,
        eval_engine="transformers",
        num_eval_prompts=2,
        max_new_tokens=12,
    )
    return PipelineArguments(**{**values, **overrides})


def test_pipeline_runs_every_stage_then_skips_them(tmp_path, peaked_verifier_path, caplog):
    args = small_args(tmp_path, peaked_verifier_path)
    pipeline = Pipeline(args)
    draft = pipeline.run()
    assert set(pipeline.timings) == {"datagen", "vocab", "train", "evaluate", "export"}

    # The exported draft is the served format, passes the export checks, and carries its eval card.
    from speculators_hf.export import check_checkpoint

    check_checkpoint(draft)
    card = json.loads((draft / "eval_card.json").read_text())
    (run,) = card["runs"]
    assert run["engine"] == "transformers" and run["output_matches_verifier_greedy"] is True
    assert run["tau"] >= 1.0 and len(run["acceptance_per_position"]) == 3
    assert card["offline"]["ttt_steps"] == 3 and len(card["offline"]["acc_k"]) == 3
    assert (tmp_path / "run" / "data" / "d2t.npy").exists()

    # Second run with the same arguments: every stage is skipped.
    again = Pipeline(small_args(tmp_path, peaked_verifier_path))
    again.run()
    assert again.timings == {}

    # A changed training input reruns training and what follows, not datagen or vocab.
    changed = Pipeline(small_args(tmp_path, peaked_verifier_path, lr=1e-3))
    changed.run()
    assert set(changed.timings) == {"train", "evaluate", "export"}

    # --force reruns one stage even when up to date.
    forced = Pipeline(small_args(tmp_path, peaked_verifier_path, lr=1e-3, force=["vocab"]))
    forced.run()
    assert set(forced.timings) == {"vocab"}


def test_pipeline_flag_errors_are_one_line(tmp_path, capsys):
    assert main(["--verifier", "x"]) == 2
    assert "Give both --verifier and --train-data-path" in capsys.readouterr().err
    assert main(["--force", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--force 'nope'" in err


@pytest.mark.vllm
@pytest.mark.slow
def test_embedded_default_pipeline_learns(tmp_path, monkeypatch, capsys):
    """`speculators-hf pipeline` with no arguments (the README's first command): tau clearly above 1 in both engines,
    and the speculative output equals the verifier's greedy output."""
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    card = json.loads((tmp_path / "runs" / "tiny-default" / "draft" / "eval_card.json").read_text())
    engines = {r["engine"]: r for r in card["runs"]}
    assert set(engines) == {"transformers", "vllm"}, out
    for engine, result in engines.items():
        assert result["tau"] > 1.2, (engine, result)
        assert result["output_matches_verifier_greedy"] is True, (engine, result)
    assert card["offline"]["tau_sim"] > 1.2
    assert "tau" in out.lower() and os.path.isdir(tmp_path / "runs" / "tiny-default" / "checkpoints")
