"""Faults of datagen and vocab (issue 22): each case runs the command as a user would (a subprocess, stdin given
"y" so that a question would be answered) and asserts the exit status, one line on stderr, and that every file
outside the run is unchanged. Machine faults (read-only folder, full disk) are real: a tmpfs in a user namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from speculators_hf import runstate
from speculators_hf.datagen import DatagenArguments, ShardDataset, build_dataset, run
from speculators_hf.datagen.cli import main as datagen_main
from speculators_hf.formats.shards import write_index
from speculators_hf.tiny_kit import write_chat_jsonl
from speculators_hf.utils import UserError
from speculators_hf.vocab import load_vocab_mapping
from speculators_hf.vocab.cli import main as vocab_main
from tests.faults import cli, requires_namespaces, run_with_mounts

SEQ = 192
FLAGS = ["--seq-length", str(SEQ), "--shard-size-mb", "1", "--batch-size", "4", "--backend", "transformers"]
QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}  # bars are not errors


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_data")
    return write_chat_jsonl(root / "chats.jsonl", limit=24), root / "cache"


@pytest.fixture(scope="module")
def reference(inputs, tiny_verifier_path, tmp_path_factory):
    """An uninterrupted run with FLAGS: 3 shards of about 0.9, 0.9 and 0.2 MB."""
    chats, cache = inputs
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = build_dataset(make_args(tiny_verifier_path, chats, out, cache))
    assert summary["complete"] and summary["shards"] == 3
    return out


def make_args(verifier, chats, out, cache, **kw) -> DatagenArguments:
    kw = {"seq_length": SEQ, "shard_size_mb": 1, "batch_size": 4, "backend": "transformers", **kw}
    return DatagenArguments(
        target_model_path=str(verifier), train_data_path=str(chats), output_dir=str(out), cache_dir=str(cache), **kw
    )


def datagen_argv(verifier, chats, out, cache, *extra) -> list[str]:
    paths = ["--target-model-path", verifier, "--train-data-path", chats, "--output-dir", out, "--cache-dir", cache]
    return cli("datagen", *map(str, paths), *FLAGS, *map(str, extra))


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, input="y\n" * 4, capture_output=True, text=True, env={**os.environ, **QUIET}, timeout=300
    )


def error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and "error: " in lines[0], proc.stderr[-3000:]
    return lines[0]


def digest(*paths: Path) -> dict[str, str]:
    files = [q for p in map(Path, paths) for q in ([p] if p.is_file() else sorted(p.rglob("*"))) if q.is_file()]
    return {str(q): hashlib.sha256(q.read_bytes()).hexdigest() for q in files}


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("data-*.safetensors"))}


# ------------------------------------------------------------------------------------------- files not ours


def test_overwrite_deletes_only_what_datagen_wrote(reference, inputs, tiny_verifier_path, tmp_path):
    """`--overwrite` used to delete any index*.json and data_*.pt in the folder; now a folder holding files datagen
    did not write is refused, and nothing there is touched."""
    chats, cache = inputs
    out = tmp_path / "out"
    build_dataset(make_args(tiny_verifier_path, chats, out, cache, max_samples=4))
    (out / "index-notes.json").write_text('{"mine": true}')
    torch.save({"mine": torch.ones(2)}, out / "data_backup.pt")
    before = digest(out, chats, tiny_verifier_path)
    line = error_line(run_cli(datagen_argv(tiny_verifier_path, chats, out, cache, "--overwrite")), 2)
    assert "did not write (data_backup.pt, index-notes.json)" in line, line
    assert digest(out, chats, tiny_verifier_path) == before


def test_overwrite_replaces_only_the_recorded_run(reference, inputs, tiny_verifier_path, tmp_path):
    """vocab's d2t/t2d beside datagen's files are vocab's: datagen --overwrite keeps them; vocab refuses a changed
    token_freq.pt unless --overwrite; the same inputs again write nothing."""
    chats, cache = inputs
    out = tmp_path / "out"
    build_dataset(make_args(tiny_verifier_path, chats, out, cache, max_samples=4))
    vocab = ["--token-freq-path", str(out / "token_freq.pt"), "--target-model-path", str(tiny_verifier_path)]
    vocab += ["--draft-vocab-size", "64", "--output-path", str(out)]
    assert vocab_main(vocab) == 0
    mapping = digest(out / "d2t.npy", out / "t2d.npy")
    summary = build_dataset(make_args(tiny_verifier_path, chats, out, cache, max_samples=6, overwrite=True))
    assert summary["complete"] and summary["samples"] == 6 and digest(out / "d2t.npy", out / "t2d.npy") == mapping
    proc = run_cli(cli("vocab", *vocab))
    line = error_line(proc, 2)
    assert "token_freq.sha256 changed" in line and "--overwrite" in line, line
    assert digest(out / "d2t.npy", out / "t2d.npy") == mapping
    assert vocab_main([*vocab, "--overwrite"]) == 0
    rebuilt = {p: p.stat().st_mtime_ns for p in (out / "d2t.npy", out / "t2d.npy")}
    assert vocab_main(vocab) == 0  # up to date: nothing written
    assert {p: p.stat().st_mtime_ns for p in rebuilt} == rebuilt
    assert runstate.read_manifest(out, "vocab")["result"]["draft_vocab_size"] == 64


def test_finished_run_returns_its_result_without_work(reference, inputs, tiny_verifier_path):
    class NoWork:
        name, layer_ids = "no-work", [1, 2, 3, 4]

        def extract(self, batch):
            raise AssertionError("a finished run extracted hidden states")

    chats, cache = inputs
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    result = run(make_args(tiny_verifier_path, chats, reference, cache), backend=NoWork())
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before  # not one file rewritten
    recorded = runstate.read_manifest(reference, "datagen")["result"]
    assert result.complete and result.samples == recorded["samples"] and result.shards == 3
    assert result.this_run["samples"] == 0 and result.storage_dtype == "float32" and result.layer_ids == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------- the machine


@requires_namespaces
def test_read_only_output_fails_before_tokenizing(inputs, tiny_verifier_path, tmp_path):
    chats, _ = inputs
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    before = digest(chats, tiny_verifier_path)
    proc = run_with_mounts(datagen_argv(tiny_verifier_path, chats, out, cache), readonly=[out], env=QUIET)
    line = error_line(proc, 1)
    assert f"--output-dir {out}" in line and "read-only" in line, line
    assert not cache.exists(), "the chats were tokenized before the folder was checked"
    assert digest(chats, tiny_verifier_path) == before


@requires_namespaces
def test_full_disk_keeps_finished_shards_and_the_rerun_resumes(reference, inputs, tiny_verifier_path, tmp_path):
    """A tmpfs of 8 MiB, 6.5 MiB of it taken: the first shard (0.9 MB) fits, the second does not. The run stops with
    one line (exit 1); then the space is freed and the same command finishes the shards left, byte for byte."""
    chats, cache = inputs
    disk, report = tmp_path / "disk", tmp_path / "report"
    disk.mkdir()
    report.mkdir()
    command = shlex.join(datagen_argv(tiny_verifier_path, chats, disk / "out", cache))
    script = (
        f"head -c 6815744 /dev/zero > {disk}/ballast; {command} 2> {report}/first.err; echo $? > {report}/first.rc; "
        f"cp -r {disk}/out {report}/partial; rm {disk}/ballast; {command} 2> {report}/second.err; "
        f"echo $? > {report}/second.rc; cp -r {disk}/out {report}/final"
    )
    before = digest(chats, tiny_verifier_path)
    proc = run_with_mounts(["sh", "-c", script], full=[disk], size="8m", env=QUIET)
    assert proc.returncode == 0, proc.stderr
    first = subprocess.CompletedProcess(
        [], int((report / "first.rc").read_text()), "", (report / "first.err").read_text()
    )
    line = error_line(first, 1)
    assert "data-00001.safetensors: the disk is full" in line and "finished work is kept" in line, line
    partial = json.loads((report / "partial" / "index.json").read_text())
    assert not partial["complete"] and [s["file"] for s in partial["shards"]] == ["data-00000.safetensors"]
    kept = shard_bytes(report / "partial")
    assert kept == {"data-00000.safetensors": shard_bytes(reference)["data-00000.safetensors"]}
    assert int((report / "second.rc").read_text()) == 0, (report / "second.err").read_text()
    assert shard_bytes(report / "final") == shard_bytes(reference)
    assert read(report / "final" / "index.json") == read(reference / "index.json")
    assert digest(chats, tiny_verifier_path) == before


# ------------------------------------------------------------------------------------------ consent for code


def remote_code_verifier(verifier: Path, folder: Path, where: str, marker: Path) -> Path:
    """A copy of `verifier` whose config (`where="config"`: an unknown model type) or tokenizer asks, through
    `auto_map`, to run a .py file of the folder; that file writes `marker`."""
    folder.mkdir()
    for f in verifier.iterdir():
        (folder / f.name).symlink_to(f)
    plant = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    name = "config.json" if where == "config" else "tokenizer_config.json"
    record = json.loads((verifier / name).read_text())
    (folder / name).unlink()
    if where == "config":
        record |= {
            "model_type": "speculators-x",
            "auto_map": {"AutoConfig": "x.XConfig", "AutoModelForCausalLM": "x.X"},
        }
        code = "from transformers import LlamaConfig, LlamaForCausalLM\n"
        code += "class XConfig(LlamaConfig):\n    model_type = 'speculators-x'\n"
        code += "class X(LlamaForCausalLM):\n    config_class = XConfig\n"
    else:
        record |= {"tokenizer_class": "XTokenizer", "auto_map": {"AutoTokenizer": ["x.XTokenizer", "x.XTokenizer"]}}
        code = (
            "from transformers import PreTrainedTokenizerFast\nclass XTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        )
    (folder / name).write_text(json.dumps(record))
    (folder / "x.py").write_text(plant + code)
    return folder


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_verifier_code_runs_only_with_consent(where, inputs, tiny_verifier_path, tmp_path):
    """Without --trust-remote-code the folder's code never runs and nothing is asked ("y" waits on stdin); with it,
    the run goes through the folder's own classes."""
    chats, cache = inputs
    marker = tmp_path / "code-ran"
    verifier = remote_code_verifier(Path(tiny_verifier_path), tmp_path / "verifier", where, marker)
    before = digest(chats, tiny_verifier_path, verifier)
    argv = datagen_argv(verifier, chats, tmp_path / "out", cache, "--max-samples", "2")
    line = error_line(run_cli(argv), 2)
    assert "pass --trust-remote-code if you trust that code" in line, line
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert digest(chats, tiny_verifier_path, verifier) == before
    if where == "config":
        proc = run_cli([*argv, "--trust-remote-code"])
        assert proc.returncode == 0 and marker.exists(), proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------- what is read


def test_index_naming_a_file_outside_is_refused(reference, tmp_path):
    """A shard named `../x` or by an absolute path in index.json: refused in one line, nothing read there."""
    for name in ("../elsewhere/data-00000.safetensors", str(reference / "data-00000.safetensors")):
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        (tmp_path / "elsewhere").mkdir(exist_ok=True)
        (tmp_path / "elsewhere" / "data-00000.safetensors").write_bytes(
            shard_bytes(reference)["data-00000.safetensors"]
        )
        write_index(data, {"shards": [{"file": name}]})
        with pytest.raises(UserError, match=r"index.json: names .* which is outside") as caught:
            ShardDataset(data)
        assert "\n" not in str(caught.value)


def test_stored_dtype_must_be_the_declared_one(reference, tmp_path):
    """data_config.json declares how the states are stored; shards of another dtype (int32 above all) are refused."""
    data = tmp_path / "data"
    data.mkdir()
    for f in ["index.json", "data_config.json", *shard_bytes(reference)]:
        (data / f).write_bytes((reference / f).read_bytes())
    assert ShardDataset(data).storage == "float32"
    config = json.loads((data / "data_config.json").read_text())
    config["hidden_states_storage"]["dtype"] = "bfloat16"
    (data / "data_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="stores hidden states as float32 but .*data_config.json declares bfloat16"):
        ShardDataset(data)
    tensors = load_file(data / "data-00000.safetensors")
    save_file({**tensors, "hidden_states": tensors["hidden_states"].int()}, data / "data-00000.safetensors")
    with pytest.raises(UserError, match="hidden_states is I32"):
        ShardDataset(data)


def test_empty_d2t_is_one_line(tmp_path):
    np.save(tmp_path / "d2t.npy", np.zeros(0, dtype=np.int64))
    np.save(tmp_path / "t2d.npy", np.zeros(8, dtype=bool))
    with pytest.raises(UserError, match=r"d2t.npy: holds no entries"):
        load_vocab_mapping(tmp_path / "d2t.npy", tmp_path / "t2d.npy")


# ---------------------------------------------------------------------------------------- values that parse


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--seq-length", "0"),
        ("--batch-size", "0"),
        ("--shard-size-mb", "0"),
        ("--max-samples", "0"),
        ("--tensor-parallel-size", "0"),
        ("--data-parallel-size", "-1"),
        ("--gpu-memory-utilization", "nan"),
        ("--gpu-memory-utilization", "1.5"),
        ("--world-size", "0"),
        ("--rank", "2"),
        ("--seed", "-1"),
        ("--layer-ids", "-1"),
    ],
)
def test_datagen_numbers_are_checked_when_parsed(flag, value, tmp_path, capsys):
    argv = ["--target-model-path", str(tmp_path / "v"), "--train-data-path", str(tmp_path / "c.jsonl")]
    argv += ["--output-dir", str(tmp_path / "out"), flag, value] + (["--world-size", "2"] if flag == "--rank" else [])
    assert datagen_main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and flag in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, value", [("--draft-vocab-size", "0"), ("--draft-vocab-size", "-3"), ("--target-vocab-size", "0")]
)
def test_vocab_numbers_are_checked_when_parsed(flag, value, tmp_path, capsys):
    torch.save({1: 5, 2: 3}, tmp_path / "freq.pt")
    argv = ["--token-freq-path", str(tmp_path / "freq.pt"), "--output-path", str(tmp_path / "out")]
    argv += ["--target-vocab-size", "10", flag, value]
    assert vocab_main(argv) == 2  # --draft-vocab-size 0 used to write an empty mapping
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{flag} must be at least 1" in lines[0], lines
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- several ranks


def test_ranks_wait_for_rank_zero_to_replace_a_run(reference, inputs, tiny_verifier_path, tmp_path):
    """--overwrite on every rank of a folder holding a run with other flags: rank 1 waits while rank 0 replaces it
    (it never deletes), then both write their shards: the result is the uninterrupted run's."""
    chats, cache = inputs
    out = tmp_path / "out"
    build_dataset(make_args(tiny_verifier_path, chats, out, cache, max_samples=4))
    log = tmp_path / "rank1.err"
    argv = datagen_argv(tiny_verifier_path, chats, out, cache, "--overwrite", "--rank", "1", "--world-size", "2")
    with open(log, "w") as err:
        rank1 = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err, env={**os.environ, **QUIET})
    try:
        deadline = time.monotonic() + 120
        while "waiting for rank 0" not in log.read_text():
            assert rank1.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        run(make_args(tiny_verifier_path, chats, out, cache, rank=0, world_size=2, overwrite=True))
        assert rank1.wait(timeout=120) == 0, log.read_text()
    finally:
        rank1.kill()
    assert shard_bytes(out) == shard_bytes(reference)
    assert read(out / "index.json") == read(reference / "index.json")
    assert runstate.read_manifest(out, "datagen")["status"] == "complete"


def test_token_freq_elsewhere_is_claimed_there(reference, inputs, tiny_verifier_path, tmp_path):
    """--token-freq-path outside --output-dir: recorded by a manifest in its own folder; a user's file of that name
    there is never replaced, and the finished run is not redone."""
    chats, cache = inputs
    (tmp_path / "stats").mkdir()
    mine = tmp_path / "stats" / "token_freq.pt"
    mine.write_bytes(b"the user's")
    args = make_args(tiny_verifier_path, chats, tmp_path / "out", cache, max_samples=2, token_freq_path=str(mine))
    with pytest.raises(UserError, match="token_freq.pt exists and was not written by speculators_hf"):
        run(args)
    assert mine.read_bytes() == b"the user's"
    mine.unlink()
    first = run(args)
    assert first.complete and first.token_freq == str(mine) and not (tmp_path / "out" / "token_freq.pt").exists()
    assert runstate.read_manifest(mine.parent, "datagen-token_freq.pt")["entries"] == ["token_freq.pt"]
    written = mine.stat().st_mtime_ns
    assert run(args).this_run["samples"] == 0 and mine.stat().st_mtime_ns == written
