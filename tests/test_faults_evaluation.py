"""Fault table of evaluate (issues 22 and 23): a user's file in the output folder is never replaced, a finished
evaluation is not redone and changed inputs are refused unless --overwrite, a run that scored nothing fails, code in a
verifier folder runs only with --trust-remote-code, numeric flags are checked when parsed, read-only and full output
folders stop in one line. Every refusal: its exit status, one line on stderr (no traceback), and every file outside
the run unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from speculators_hf.cli import main as cli_main
from speculators_hf.evaluation import EvaluateArguments, run, stage
from speculators_hf.evaluation import grid as grid_module
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.runstate import read_manifest
from speculators_hf.tiny_kit import write_chat_jsonl
from speculators_hf.utils import UserError

from .faults import cli, requires_namespaces, run_with_mounts


@pytest.fixture(scope="module")
def inputs(tiny_verifier_path, tmp_path_factory) -> Path:
    """A random draft for the tiny verifier and a chat file to take prompts from."""
    root = tmp_path_factory.mktemp("faults_evaluation")
    torch.manual_seed(0)
    Eagle3DraftModel.from_verifier(
        str(tiny_verifier_path), hub_id="org/tiny", aux_layer_ids=[1, 2, 3]
    ).save_pretrained(root / "draft")
    write_chat_jsonl(root / "chats.jsonl", 6)
    return root


@pytest.fixture(autouse=True, scope="module")
def no_progress_bars():
    """Progress bars are not what this test reads; the lines a user must act on are."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


@pytest.fixture
def work(inputs, tmp_path) -> Path:
    shutil.copytree(inputs, tmp_path / "in")
    return tmp_path / "in"


def _argv(work: Path, verifier, *extra: str) -> list[str]:
    return ["evaluate", "--draft", str(work / "draft"), "--verifier", str(verifier), "--prompts",
            str(work / "chats.jsonl"), "--num-prompts", "2", "--max-new-tokens", "4", *extra]  # fmt: skip


def _digest(*folders: Path) -> dict[str, str]:
    files = (p for folder in folders if folder.exists() for p in sorted(folder.rglob("*")) if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _outside_the_run(work: Path) -> dict[str, str]:
    """The digest of every file but what an evaluation of `work/draft` writes (its card, its run-state manifest)."""
    return {k: v for k, v in _digest(work).items() if "eval_card" not in k and ".speculators_hf" not in k}


def _cli(capfd, *argv: str) -> tuple[int, str]:
    capfd.readouterr()
    code = cli_main([str(a) for a in argv])
    return code, capfd.readouterr().err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ numeric flags


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "nan"], "--temperature takes values >= 0"),
        (["--temperature", "inf"], "--temperature takes values >= 0"),
        (["--temperature", "0", "-0.5"], "--temperature takes values >= 0"),
        (["--k", "0", "--grid"], "--k takes values >= 1"),
        (["--batch-size", "0", "--grid"], "--batch-size takes values >= 1"),
        (["--num-speculative-tokens", "0"], "--num-speculative-tokens must be >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--num-prompts", "0"], "--num-prompts must be >= 1"),
        (["--total-seq-len", "0"], "--total-seq-len must be >= 1"),
        (["--prompt-offset", "-1"], "--prompt-offset must be >= 0"),
        (["--held-out-fraction", "1"], "--held-out-fraction must be in [0, 1)"),
        (["--held-out-fraction", "-0.1"], "--held-out-fraction must be in [0, 1)"),
        (["--held-out-fraction", "nan"], "--held-out-fraction must be in [0, 1)"),
        (["--engine-timeout", "0"], "--engine-timeout must be a number of seconds > 0"),
        (["--engine-timeout", "inf"], "--engine-timeout must be a number of seconds > 0"),
    ],
)
def test_numeric_flags_are_checked_when_parsed(flags, message, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _cli(capfd, "evaluate", "--draft", "draft", *flags)
    line = _one_line(err)
    assert code == 2 and message in line, line
    assert not any(tmp_path.iterdir()), "something was written"


# ---------------------------------------------------------------------------------------- files outside the run


@pytest.mark.parametrize(
    ("name", "flags"),
    [("eval_card.md", []), ("eval_card.json", []), ("eval_grid_k.png", ["--grid"]), ("eval_grid", ["--grid"])],
)
def test_a_users_file_at_a_name_evaluate_writes_is_never_replaced(
    name, flags, work, tiny_verifier_path, capfd, without_vllm
):
    """Refused before anything is written or loaded (a grid run: before vLLM is even looked for)."""
    target = work / "draft" / name
    if name == "eval_grid":
        target.mkdir()
        (target / "k0.json").write_text('{"mine": true}')
    else:
        target.write_text('{"mine": true}')
    before = _digest(work)
    code, err = _cli(capfd, *_argv(work, tiny_verifier_path, *flags))
    line = _one_line(err)
    assert code == 2 and ("never replaced" in line or "did not write" in line), line
    assert name in line, line
    assert _digest(work) == before


def test_a_finished_evaluation_is_not_redone_and_other_inputs_need_overwrite(
    work, tiny_verifier_path, capfd, monkeypatch
):
    args = EvaluateArguments(
        draft=str(work / "draft"),
        verifier=str(tiny_verifier_path),
        prompts=str(work / "chats.jsonl"),
        num_prompts=2,
        max_new_tokens=4,
    )
    first = run(args)
    card = Path(first.card).read_bytes()
    manifest = read_manifest(work / "draft", "evaluate")
    assert manifest["status"] == "complete" and {"eval_card.json", "eval_card.md"} <= set(manifest["entries"])
    assert first.rows[0].engine == "transformers" and first.rows[0].num_drafts > 0

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine ran for a finished evaluation")

    monkeypatch.setattr(stage, "load_models", no_engine)
    again = run(args)  # same inputs: the recorded result, nothing loaded or run, the card untouched
    assert (
        again.reused and asdict(again) == {**asdict(first), "reused": True} and Path(first.card).read_bytes() == card
    )

    before = _digest(work)  # other inputs: refused, nothing touched
    code, err = _cli(capfd, *_argv(work, tiny_verifier_path, "--num-speculative-tokens", "2"))
    line = _one_line(err)
    assert code == 2 and "num_speculative_tokens changed" in line and "--overwrite" in line, line
    assert _digest(work) == before

    monkeypatch.undo()
    code, err = _cli(capfd, *_argv(work, tiny_verifier_path, "--num-speculative-tokens", "2", "--overwrite"))
    assert code == 0, err
    assert json.loads(Path(first.card).read_text())["runs"][0]["num_speculative_tokens"] == 2


def test_an_evaluation_that_scored_nothing_fails(work, tiny_verifier_path, capfd):
    """--max-new-tokens 1: every output ends at its first token, no draft is ever verified; before, tau 1.0 and exit 0.
    Now exit 1 in one line, and the run is not recorded as finished."""
    before = _outside_the_run(work)
    code, err = _cli(capfd, *_argv(work, tiny_verifier_path, "--max-new-tokens", "1"))
    line = _one_line(err)
    assert code == 1 and "evaluate produced no scored prompt" in line, line
    assert read_manifest(work / "draft", "evaluate")["status"] == "running"
    assert _outside_the_run(work) == before


# --------------------------------------------------------------------------------------------- consent for code


def test_a_verifier_with_code_needs_trust_remote_code(work, tiny_verifier_path, tmp_path):
    """A verifier folder whose auto_map code would write a marker: one line naming --trust-remote-code, the code never
    runs, and stdin (a `y` waiting there) is never read."""
    evil = tmp_path / "verifier"
    shutil.copytree(tiny_verifier_path, evil)
    config = json.loads((evil / "config.json").read_text())
    config.update(model_type="evil_llama", auto_map={"AutoConfig": "evil.EvilConfig"}, architectures=["EvilModel"])
    (evil / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (evil / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
    )
    before = _digest(work, evil)
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run(cli(*_argv(work, evil)), input="y\n", capture_output=True, text=True, env=env, timeout=600)
    line = _one_line(done.stderr)
    assert done.returncode == 2 and "--trust-remote-code" in line and "verifier" in line, line
    assert not marker.exists(), "the verifier folder's code ran"
    assert _digest(work, evil) == before


# ---------------------------------------------------------------------------------------- the grid's engine records


def test_grid_engines_are_runs_of_their_own(work, tmp_path, monkeypatch):
    """Each engine of the grid is claimed through run-state: finished engines are reused, a missing record reruns
    that engine only, a finished engine's garbled record is one line naming it. (A stand-in writes the records the
    vLLM worker writes; tests/test_eval_grid.py runs the real engines.)"""
    from .test_eval_grid import _records

    fake = _records()
    started = []

    def engine(request, timeout, log_path=None):
        (k,) = request["engines"]
        started.append(k)
        Path(log_path).write_text("log")
        (Path(request["records_dir"]) / f"k{k}.json").write_text(json.dumps(fake[k]))

    monkeypatch.setattr(grid_module, "spawn", engine)
    records = tmp_path / "eval_grid"
    grid = dict(draft=work / "draft", verifier="v", prompts=[[1, 2]], ks=[1, 2], temperatures=[0.0, 1.0])
    grid.update(batch_sizes=[1, 4, 16], max_new_tokens=4, records_dir=records)
    done, _ = grid_module.run_vllm_grid(**grid)
    assert started == [0, 1, 2] and not any(r.get("reused") for r in done.values())
    assert read_manifest(records, "k1")["entries"] == ["k1.json", "vllm_k1.log"]

    started.clear()
    again, _ = grid_module.run_vllm_grid(**grid)
    assert started == [] and all(r["reused"] for r in again.values())
    (records / "k1.json").unlink()  # a record gone: that engine alone runs again
    grid_module.run_vllm_grid(**grid)
    assert started == [1]

    (records / "k2.json").write_text("[1, 2")
    with pytest.raises(UserError, match=r"k2\.json") as caught:
        grid_module.run_vllm_grid(**grid)
    assert "\n" not in str(caught.value)
    (records / "notes.txt").write_text("mine")  # a file no run recorded: refused before anything is decided
    with pytest.raises(UserError, match=r"did not write \(notes\.txt\)"):
        grid_module.check_records_folder(records)


# ---------------------------------------------------------------------------------------------- machine faults


@requires_namespaces
@pytest.mark.parametrize("fault", ["readonly", "full"])
def test_read_only_or_full_output_folder_is_one_line(fault, work, tiny_verifier_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    before = _digest(work)
    mounts = {"readonly": [str(out)]} if fault == "readonly" else {"full": [str(out)], "size": "4k"}
    argv = cli(*_argv(work, tiny_verifier_path, "--output-dir", str(out)))
    done = run_with_mounts(argv, env={"HF_HUB_DISABLE_PROGRESS_BARS": "1"}, **mounts)
    line = _one_line(done.stderr)
    assert done.returncode == 1, done.stderr
    assert ("read-only" in line) if fault == "readonly" else ("disk is full" in line), line
    assert _digest(work) == before
