"""The one-command pipeline: every stage on the tiny kit, skipping finished stages, rerunning forced ones."""

import json
import os
from pathlib import Path

import pytest

from speculators_hf.pipeline import Pipeline, PipelineArguments, main
from speculators_hf.tiny_kit import write_chat_jsonl
from speculators_hf.utils import UserError


def small_args(tmp_path, verifier, stages: dict | None = None, **overrides) -> PipelineArguments:
    chats = write_chat_jsonl(tmp_path / "chats.jsonl", 40)
    held_out = write_chat_jsonl(tmp_path / "eval.jsonl", 8, offset=6000)
    values = dict(
        verifier=str(verifier),
        train_data_path=str(chats),
        eval_prompts=str(held_out),
        output_dir=str(tmp_path / "run"),
    )
    sections = {
        "datagen": {"seq_length": 256, "max_samples": 24},
        "vocab": {"draft_vocab_size": 512},
        "train": {"epochs": 1, "lr": 3e-3, "total_seq_len": 256},
        "evaluate": {"engine": "transformers", "num_prompts": 2, "max_new_tokens": 12},
    }
    for stage, flags in (stages or {}).items():
        sections[stage] = {**sections.get(stage, {}), **flags}
    return PipelineArguments(**{**values, **overrides}, stages=sections)


def test_pipeline_runs_every_stage_then_skips_them(tmp_path, peaked_verifier_path, caplog):
    args = small_args(tmp_path, peaked_verifier_path)
    pipeline = Pipeline(args)
    draft = Path(pipeline.run().draft)
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
    # ... and the training record for its model card: steps, objective and data
    from speculators_hf.hub import build_model_card

    text = build_model_card(draft, "org/x")
    assert "- Steps: " in text and '"ttt_steps": 3' in text and "`chats.jsonl` (a local file)" in text

    # Second run with the same arguments: every stage is skipped.
    again = Pipeline(small_args(tmp_path, peaked_verifier_path))
    again.run()
    assert again.timings == {}

    # A changed training input reruns training and what follows, not datagen or vocab.
    changed = Pipeline(small_args(tmp_path, peaked_verifier_path, {"train": {"lr": 1e-3}}))
    changed.run()
    assert set(changed.timings) == {"train", "evaluate", "export"}

    # --overwrite reruns one stage even when up to date.
    forced = Pipeline(small_args(tmp_path, peaked_verifier_path, {"train": {"lr": 1e-3}}, overwrite=["vocab"]))
    forced.run()
    assert set(forced.timings) == {"vocab"}

    # --on-policy: the on-policy stage continues train's final draft (train's values, its own section over them);
    # evaluate and export read its draft
    exported = (draft / "model.safetensors").read_bytes()
    on_policy = {"train": {"lr": 1e-3}, "on_policy": {"max_steps": 2, "on_policy_targets": "shards"}}
    continued = Pipeline(small_args(tmp_path, peaked_verifier_path, on_policy, on_policy=True))
    continued.run()
    assert set(continued.timings) == {"on_policy", "evaluate", "export"}
    result = continued.results["on_policy"]
    assert (
        result.global_step == 2
        and result.on_policy["accept"]
        and Path(result.draft).parent.name == ("checkpoints-on-policy")
    )
    record = json.loads((Path(result.draft) / "training_config.json").read_text())
    assert record["stage"] == "on-policy" and record["run_inputs"]["--learning-rate"] == 1e-3  # train's value
    assert record["run_inputs"]["--from-pretrained"]  # train's final draft, fingerprinted
    assert (draft / "model.safetensors").read_bytes() != exported


def test_pipeline_flag_errors_are_one_line(tmp_path, capsys):
    assert main(["--verifier", "x"]) == 2
    assert "Give both --verifier and --train-data-path" in capsys.readouterr().err
    assert main(["--overwrite", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overwrite 'nope'" in err


def _prompt(messages: list[dict]) -> str:
    """What evaluation renders: every turn before the first assistant turn."""
    first = next((j for j, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return json.dumps(messages[:first])


def test_jsonl_without_eval_prompts_holds_prompts_out_of_training(tmp_path, tiny_verifier_path):
    """With a JSONL --train-data-path and no --eval-prompts, the evaluation prompts are rows training never reads
    (not even as a duplicate elsewhere in the file), and the split is recorded."""
    from speculators_hf.datagen.sources import normalize_messages
    from speculators_hf.evaluation import load_prompts

    rows = [json.loads(line) for line in write_chat_jsonl(tmp_path / "chats.jsonl", 30).read_text().splitlines()]
    rows.insert(0, rows[-1])  # a duplicate, early in the file, of a row that will be held out
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = dict(
        verifier="v",
        train_data_path=str(source),
        output_dir=str(tmp_path / "run"),
        stages={"evaluate": {"num_prompts": 4}},
    )
    args = PipelineArguments(**run)
    Pipeline(args).resolve_inputs()

    assert args.eval_prompts != str(source) and args.train_data_path != str(source)
    train_rows = [json.loads(line) for line in Path(args.train_data_path).read_text().splitlines()]
    prompts = [json.loads(line)["messages"] for line in Path(args.eval_prompts).read_text().splitlines()]
    assert len(prompts) == 4
    trained_on = {_prompt(normalize_messages(r)) for r in train_rows}
    assert not {_prompt(p) for p in prompts} & trained_on
    assert len(train_rows) == len(rows) - 4 - 1  # the held-out rows and the early duplicate
    record = json.loads((tmp_path / "run" / "inputs" / "held_out.json").read_text())
    assert record["held_out_rows"] == list(range(len(rows) - 4, len(rows))) and record["num_rows"] == len(rows)

    # evaluation reads them as prompts; a second run reuses the split (the same files, untouched)
    from transformers import AutoTokenizer

    assert len(load_prompts(args.eval_prompts, AutoTokenizer.from_pretrained(tiny_verifier_path), 16)) == 4
    before = Path(args.train_data_path).stat().st_mtime_ns
    again = PipelineArguments(**run)
    Pipeline(again).resolve_inputs()
    assert again.eval_prompts == args.eval_prompts and Path(again.train_data_path).stat().st_mtime_ns == before

    small = {**run, "train_data_path": str(write_chat_jsonl(tmp_path / "small.jsonl", 3))}
    with pytest.raises(UserError, match="too few to hold out 4"):
        Pipeline(PipelineArguments(**small)).resolve_inputs()


def test_presets_are_explicit_and_the_help_says_both(capsys):
    embedded = Pipeline(PipelineArguments(verifier="v", train_data_path="d.jsonl", preset="embedded")).sections
    assert (
        embedded["datagen"]["seq_length"],
        embedded["vocab"]["draft_vocab_size"],
        embedded["train"]["num_train_epochs"],
    ) == (512, 1024, 2)
    args = PipelineArguments(verifier="v", train_data_path="d.jsonl", stages={"datagen": {"seq_length": 4096}})
    general = Pipeline(args).sections
    assert (args.preset, general["datagen"]["seq_length"], general["vocab"]["draft_vocab_size"]) == (
        "general",
        4096,
        32000,
    )
    assert general["datagen"].get("max_samples") is None
    assert PipelineArguments().preset == "embedded"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out
    assert "datagen.seq_length: general 2048, embedded 512" in " ".join(out.split())


@pytest.mark.vllm
def test_pipeline_online_starts_its_server_and_leaves_no_hidden_states(tmp_path, tiny_verifier_path, capsys):
    """`--online`: tokens-only datagen, a serve-hidden-states server started for training (on CPU: the trainer keeps
    off the server's cores) and stopped after it, nothing spooled left behind."""
    from speculators_hf.online.dataset import HIDDEN_STATES_REPORT

    stages = {"datagen": {"max_samples": 16}, "evaluate": {"max_new_tokens": 8}}
    args = small_args(tmp_path, tiny_verifier_path, stages, online=True)
    draft = Path(Pipeline(args).run().draft)
    out = capsys.readouterr().out
    assert (draft / "model.safetensors").exists() and "left on disk: 0.00 MiB of states" in out
    run = tmp_path / "run"
    assert json.loads((run / "data" / "data_config.json").read_text())["tokens_only"] is True
    report = json.loads((run / "checkpoints" / HIDDEN_STATES_REPORT).read_text())
    assert report["fetched"] > 0 and report["skipped"] == 0
    if "OMP_NUM_THREADS" not in os.environ:
        assert report["trainer_threads"] == max(1, (os.cpu_count() or 1) // 2)  # one server, one share of the cores
    log = (run / "logs" / "hidden-states-server-0.log").read_text()
    assert "Application startup complete" in log  # the server the pipeline started answered


def test_stage_flags_from_the_command_line_a_file_and_the_preset(tmp_path, capsys, caplog):
    """`--<stage>.<flag>` beats the run file's section, which beats the preset; values are typed for the stage's
    dataclass (aliases such as `lr` understood); wired, unknown and moved keys are one line each."""
    from speculators_hf.commandline import make_parser, parse
    from speculators_hf.pipeline.arguments import STAGES
    from speculators_hf.pipeline.compose import translate_moved

    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        "verifier: v\ntrain_data_path: d.jsonl\ntrain:\n  lr: 1.0e-3\n  epochs: 3\nevaluate:\n  k: [2]\n"
    )
    argv = ["--config", str(run_file), "--train.lr", "5e-4", "--evaluate.k", "1", "3", "--datagen.shuffle"]
    args, cli = parse(make_parser(PipelineArguments), argv, STAGES)
    sections = Pipeline(args, cli).sections
    train, evaluate = sections["train"], sections["evaluate"]
    assert (train["learning_rate"], train["num_train_epochs"], train["total_seq_len"]) == (5e-4, 3, 8192)
    assert evaluate["k"] == [1, 3] and sections["datagen"]["shuffle"] is True
    assert evaluate["num_speculative_tokens"] == 3  # follows train.ttt_steps
    assert sections["regenerate"]["max_model_len"] == 2048  # follows datagen.seq_length (the general preset's)

    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        return err

    base = ["--verifier", "v", "--train-data-path", "d.jsonl", "--output-dir", str(tmp_path / "out")]
    assert "train.nope: no such flag" in error([*base, "--train.nope", "1"])
    assert "datagen.output_dir is set by the pipeline" in error([*base, "--datagen.output-dir", "x"])
    assert "--train.lr: the value is 'fast'; expected a number" in error([*base, "--train.lr", "fast"])
    run_file.write_text("verifier: v\ntrain_data_path: d.jsonl\nlr: 0.1\n")
    assert "`lr` moved: write it as `train.lr`" in error(["--config", str(run_file)])
    assert not (tmp_path / "out").exists()

    # the flags the pipeline used to declare still work, each saying its new form once
    with caplog.at_level("WARNING"):
        new = translate_moved(["--seq-length", "256", "--train-args", "--lr 1e-3 --logger none", "--force", "vocab"])
    assert new == [
        "--datagen.seq_length",
        "256",
        "--train.lr",
        "1e-3",
        "--train.logger",
        "none",
        "--overwrite",
        "vocab",
    ]
    assert sum("is now" in r.message for r in caplog.records) == 3


def test_pipeline_passes_train_from_pretrained_to_training(tmp_path):
    from speculators_hf.commandline import make_parser, parse
    from speculators_hf.pipeline.arguments import STAGES

    argv = ["--verifier", "v", "--train-data-path", "d.jsonl", "--output-dir", str(tmp_path / "out")]
    args, cli = parse(make_parser(PipelineArguments), [*argv, "--train.from-pretrained", "org/draft"], STAGES)
    model_args, _ = Pipeline(args, cli).train_arguments()
    assert model_args.from_pretrained == "org/draft" and not (tmp_path / "out").exists()
    # the on-policy stage: train's values unless its own section sets them (dashes or underscores in its name)
    extra = ["--train.lr", "1e-3", "--train.epochs", "3", "--on-policy.epochs", "1", "--on-policy"]
    args, cli = parse(make_parser(PipelineArguments), [*argv, *extra], STAGES)
    model_args, train_args = Pipeline(args, cli).train_arguments(stage="on_policy")
    assert (train_args.stage, train_args.learning_rate, train_args.num_train_epochs) == ("on-policy", 1e-3, 1)
    assert model_args.from_pretrained.endswith("checkpoints/missing")  # wired: train's final draft (none yet)
