"""The training stage's fault table: what a run does with colliding runs in one --save-path, cut and unreadable
checkpoints, full and read-only disks, non-finite hidden states and steps, incomplete data, states paths that are
not files, code a verifier folder ships, and numbers out of range.

Every case asserts the exit code (2: the input, 1: the run failed), that stderr holds exactly one line (no traceback),
and that every file outside the run is unchanged. The runs are real (`speculators-hf train` as a user runs it) on the
tiny verifier kit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from speculators_hf.cli import main as cli_main
from speculators_hf.runstate import STATE_DIR, read_manifest
from speculators_hf.training.data import train_eval_split
from tests.faults import requires_namespaces, run_with_mounts
from tests.training_data import make_training_data, train_argv

QUIET = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
# `speculators-hf` with our own warnings (skipped samples, ...) silenced too: stderr holds what the user must act on
CLI = (
    "import logging, sys; logging.getLogger('speculators_hf').setLevel(logging.ERROR); "
    "from speculators_hf.cli import main; sys.exit(main())"
)


@pytest.fixture(scope="module")
def data(tiny_verifier_path, tmp_path_factory):
    return make_training_data(tiny_verifier_path, tmp_path_factory.mktemp("data"), num_samples=16, max_len=64)


def argv(verifier, data_path, save, *extra) -> list[str]:
    """Two quick epochs (3 steps each), a checkpoint and a draft per epoch."""
    flags = ("--epochs", "2", "--total-seq-len", "128", "--verifier-hub-id", "org/tiny", "--lr", "1e-3")
    return ["train", *train_argv(verifier, data_path, save, *flags, *extra)]


def digest(*folders: Path) -> dict[str, str]:
    """Every file under `folders` (the inputs a case must leave alone), by content."""
    files = (p for folder in folders for p in Path(folder).rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def command(*args: str) -> list[str]:
    return [sys.executable, "-c", CLI, *args]


def train(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(*args),
        capture_output=True,
        text=True,
        input=stdin,
        env={**os.environ, **QUIET, **(env or {})},
        timeout=600,
    )


def one_line(proc: subprocess.CompletedProcess, code: int) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("speculators-hf train: error: "), lines
    return lines[0]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def edit_shard(folder: Path, edit) -> None:
    """Rewrite `folder`'s first shard with `edit(hidden_states, sample_offsets)` applied."""
    shard = sorted(folder.glob("data-*.safetensors"))[0]
    tensors = load_file(shard)
    edit(tensors["hidden_states"], tensors["sample_offsets"])
    save_file(tensors, str(shard))


@pytest.fixture(scope="module")
def finished(tiny_verifier_path, data, tmp_path_factory):
    """One uninterrupted run: checkpoint-N and draft 0 after epoch 1, checkpoint-2N and draft 1 after epoch 2."""
    save = tmp_path_factory.mktemp("finished") / "save"
    proc = train(*argv(tiny_verifier_path, data, save))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = read_manifest(save, "train")["result"]["global_step"] // 2
    assert sorted(p.name for p in save.iterdir()) == [
        STATE_DIR,
        "0",
        "1",
        f"checkpoint-{2 * steps}",
        f"checkpoint-{steps}",
    ]
    return save, f"checkpoint-{steps}", f"checkpoint-{2 * steps}"


# ------------------------------------------------------------------------------------------------ one --save-path


def test_other_flags_in_the_same_save_path_are_refused_naming_what_changed(
    tiny_verifier_path, data, finished, tmp_path
):
    save, _, last = finished
    save = shutil.copytree(save, tmp_path / "save")
    before = digest(save, data)
    line = one_line(train(*argv(tiny_verifier_path, data, save, "--ttt-steps", "2")), 2)
    assert f"other inputs (--ttt-steps changed since {last})" in line and "--overwrite" in line, line
    assert digest(save, data) == before  # nothing mixed in, nothing deleted
    same = train(*argv(tiny_verifier_path, data, save, "--logging-steps", "5"))  # flags that change no weight
    assert same.returncode == 0 and digest(save, data) == before  # finished: up to date, nothing written
    assert read_manifest(save, "train")["result"]["global_step"] == int(last.split("-")[1])


def test_overwrite_starts_over_deleting_only_what_the_run_wrote(tiny_verifier_path, data, finished, tmp_path):
    save = shutil.copytree(finished[0], tmp_path / "save")
    before = digest(data)
    proc = train(*argv(tiny_verifier_path, data, save, "--ttt-steps", "2", "--max-steps", "2", "--overwrite"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in save.iterdir()) == [STATE_DIR, "0", "checkpoint-2"]
    assert digest(data) == before
    (save / "notes.txt").write_text("mine")  # a user's file: the folder is not the run's alone any more
    line = one_line(train(*argv(tiny_verifier_path, data, save, "--overwrite")), 2)
    assert "holds files speculators_hf did not write (notes.txt)" in line and (save / "notes.txt").exists()


# ------------------------------------------------------------------------------------------------- checkpoints


@requires_namespaces
def test_a_checkpoint_cut_by_a_full_disk_is_never_resumed(tiny_verifier_path, data, finished, tmp_path):
    """The disk fills while epoch 2's checkpoint is written: one line, exit 1; what the disk held (copied out of
    the mount) has epoch 1's complete checkpoint and the cut one under its temporary name only; the rerun resumes from
    epoch 1's and ends with the weights of the uninterrupted run."""
    reference, first, last = finished
    save, copy = tmp_path / "save", tmp_path / "held"
    save.mkdir()
    copy.mkdir()
    before = digest(data)
    run = shlex.join(command(*argv(tiny_verifier_path, data, save)))
    script = f"{run}; rc=$?; cp -a {shlex.quote(str(save))}/. {shlex.quote(str(copy))}/; exit $rc"
    # room for epoch 1's checkpoint and draft and half of epoch 2's checkpoint (tmpfs counts 4 KiB pages)
    size = sum(-(-p.stat().st_size // 4096) * 4096 for p in (reference / first).iterdir())
    size = 3 * size // 2 + sum(-(-p.stat().st_size // 4096) * 4096 for p in (reference / "0").iterdir()) + 2**16
    proc = run_with_mounts(["sh", "-c", script], full=[str(save)], size=str(size), env=QUIET)
    line = one_line(proc, 1)
    assert "the disk is full" in line and str(save) in line, line
    assert digest(data) == before
    held = sorted(p.name for p in copy.iterdir())
    assert first in held and last not in held and "1" not in held, held
    assert any(name.startswith((f".{last}.", ".1.")) for name in held), held  # the cut one, under its temporary name
    resumed = train(*argv(tiny_verifier_path, data, copy))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [p.name for p in copy.iterdir() if p.name.endswith(".partial")]  # the cut save went with its rerun
    a, b = weights(reference / "1"), weights(copy / "1")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@requires_namespaces
def test_a_read_only_save_path_fails_before_the_first_step(tiny_verifier_path, data, tmp_path):
    save = tmp_path / "save"
    save.mkdir()
    before = digest(data)
    proc = run_with_mounts(command(*argv(tiny_verifier_path, data, save)), readonly=[str(save)], env=QUIET)
    line = one_line(proc, 1)
    assert f"--save-path {save}: the file system is read-only" in line, line
    assert "'loss'" not in proc.stdout  # not one step ran
    assert digest(data) == before


@pytest.mark.parametrize(
    "name, spoil",
    [
        ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:1000])),
        ("scheduler.pt", lambda p: p.write_bytes(b"\xff\xfe" + os.urandom(300))),
        ("rng_state.pth", lambda p: p.write_bytes(b"")),
        ("trainer_state.json", lambda p: p.write_text('{"global_step": "six", "no_such_field": 1}')),
        ("training_config.json", lambda p: p.write_text("{")),
    ],
)
def test_unreadable_resume_files_are_one_line(name, spoil, tiny_verifier_path, data, finished, tmp_path):
    save, _, last = finished
    save = shutil.copytree(save, tmp_path / "save")
    shutil.rmtree(save / "1")  # the run is resumed: from its last checkpoint, whose files are read first
    spoil(save / last / name)
    before = digest(save / last, save / "0", data)  # the run's own record may say it resumes: nothing else changes
    line = one_line(train(*argv(tiny_verifier_path, data, save)), 2)
    assert f"{last}/{name}" in line, line
    assert digest(save / last, save / "0", data) == before


# ----------------------------------------------------------------------------------------------- non-finite values


def test_a_nan_sample_is_skipped_and_counted_and_too_many_stop_the_run(tiny_verifier_path, data, tmp_path):
    """One of 16 samples has NaN states (before: every weight of the draft became NaN, exit 0)."""
    nan_data = shutil.copytree(data, tmp_path / "data")
    i = train_eval_split(16, 0.25, 0)[0][2]  # a training sample (the first shard holds all 16)
    edit_shard(nan_data, lambda states, offsets: states[int(offsets[i]) : int(offsets[i + 1])].fill_(float("nan")))
    before = digest(nan_data)
    # 1 sample of the 12 an epoch trains on is more than --max-skipped-fraction 0.05 allows: stop, one line
    line = one_line(train(*argv(tiny_verifier_path, nan_data, tmp_path / "strict", "--eval-split", "0.25")), 1)
    assert "samples were skipped" in line and "--max-skipped-fraction 0.05" in line, line
    assert not (tmp_path / "strict" / "0").exists()  # no draft
    # allowed: the sample is skipped (a zero-loss placeholder) every epoch, the draft is finite
    save = tmp_path / "lenient"
    proc = train(*argv(tiny_verifier_path, nan_data, save, "--eval-split", "0.25", "--max-skipped-fraction", "0.1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(t.isfinite().all() for t in weights(save / "1").values() if t.is_floating_point())
    result = read_manifest(save, "train")["result"]
    assert result["samples_skipped"] == 2 and result["samples_trained"] == 2 * 12 - 2, result
    assert digest(nan_data) == before


def test_a_run_that_trains_on_nothing_fails(tiny_verifier_path, data, tmp_path):
    nan_data = shutil.copytree(data, tmp_path / "data")
    for shard in sorted(nan_data.glob("data-*.safetensors")):
        tensors = load_file(shard)
        tensors["hidden_states"].fill_(float("inf"))
        save_file(tensors, str(shard))
    save = tmp_path / "save"
    line = one_line(train(*argv(tiny_verifier_path, nan_data, save, "--max-skipped-fraction", "1")), 1)
    assert "produced no trained samples" in line, line
    assert read_manifest(save, "train")["status"] == "running"  # not taken for finished


def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_verifier_path, data, tmp_path):
    """An absurd learning rate: step 1 is finite (and saved), its update blows the draft up, step 2's loss and
    gradient are not finite: the run stops before that update, naming the step and its samples."""
    save = tmp_path / "save"
    flags = ("--lr", "1e30", "--warmup-steps", "0", "--save-strategy", "steps", "--save-steps", "1")
    line = one_line(train(*argv(tiny_verifier_path, data, save, *flags)), 1)
    assert "training stopped at step 2: non-finite loss" in line and "datagen sample ids" in line, line
    assert [p.name for p in save.iterdir() if not p.name.startswith(".")] == ["checkpoint-1"]  # no draft, no step 2
    assert all(t.isfinite().all() for t in weights(save / "checkpoint-1").values() if t.is_floating_point())
    assert read_manifest(save, "train")["status"] == "running"


def test_online_states_that_are_all_nan_fail_the_run(tiny_verifier_path, data, tmp_path, monkeypatch):
    from speculators_hf.online.common import SPOOL_DIRS_ENV
    from tests.test_online_data import FakeServer

    monkeypatch.setenv(SPOOL_DIRS_ENV, str(tmp_path / "spool"))  # the trainer reads states only in spools it trusts
    tokens = shutil.copytree(data, tmp_path / "tokens")  # tokens only: the states come from the server
    for shard in sorted(tokens.glob("data-*.safetensors")):
        tensors = load_file(shard)
        del tensors["hidden_states"]
        save_file(tensors, str(shard))
    server = FakeServer(tmp_path / "spool", "nan")
    try:
        online = ("--hidden-states-source", "online", "--hidden-states-servers", server.url)
        line = one_line(train(*argv(tiny_verifier_path, tokens, tmp_path / "a", *online)), 1)
        assert "samples were skipped" in line, line
        everything = (*online, "--max-skipped-fraction", "1", "--max-steps", "2")
        line = one_line(train(*argv(tiny_verifier_path, tokens, tmp_path / "b", *everything)), 1)
        assert "produced no trained samples" in line, line
    finally:
        server.close()


# ----------------------------------------------------------------------------------------------------- inputs


def test_incomplete_datagen_output_is_refused_unless_asked(tiny_verifier_path, data, tmp_path):
    partial = shutil.copytree(data, tmp_path / "data")
    index = json.loads((partial / "index.json").read_text())
    (partial / "index.json").write_text(json.dumps({**index, "complete": False, "num_shards_planned": 3}))
    before = digest(partial)
    line = one_line(train(*argv(tiny_verifier_path, partial, tmp_path / "save")), 2)
    assert "index.json lists 1 of 3 shards (datagen did not finish)" in line, line
    assert "--allow-incomplete-data" in line and not (tmp_path / "save").exists()
    proc = train(*argv(tiny_verifier_path, partial, tmp_path / "save", "--allow-incomplete-data", "--max-steps", "1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert digest(partial) == before


def test_states_paths_that_are_not_files_are_one_line(tiny_verifier_path, data, tmp_path):
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "data-00000.safetensors")  # reading it would wait for a writer forever
    pt_dir = tmp_path / "pt"
    (pt_dir / "data_0.pt").mkdir(parents=True)
    os.mkfifo(tmp_path / "a-fifo")
    cases = {
        fifo_dir: "data-00000.safetensors: is not a regular file",
        pt_dir: "data_0.pt: is a folder",
        tmp_path / "a-fifo": "is not a folder",
    }
    for folder, expected in cases.items():
        line = one_line(train(*argv(tiny_verifier_path, folder, tmp_path / "save")), 2)
        assert expected in line, line
        assert not (tmp_path / "save").exists()


def test_a_verifier_that_ships_code_runs_it_only_with_consent(tiny_verifier_path, data, tmp_path):
    """A verifier folder whose config.json names code (auto_map) and an unknown model type: without
    --trust-remote-code one line and the code never runs (stdin is never read: a 'y' waits there); with it, the code
    runs and training works."""
    verifier = shutil.copytree(tiny_verifier_path, tmp_path / "verifier")
    marker = tmp_path / "code-ran"
    (verifier / "configuration_remote.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig\n\n\n"
        "class RemoteConfig(LlamaConfig):\n    model_type = 'remote_llama'\n"
    )
    (verifier / "modeling_remote.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_remote import RemoteConfig\n\n\n"
        "class RemoteForCausalLM(LlamaForCausalLM):\n    config_class = RemoteConfig\n"
    )
    config = json.loads((verifier / "config.json").read_text())
    auto_map = {
        "AutoConfig": "configuration_remote.RemoteConfig",
        "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
    }
    (verifier / "config.json").write_text(json.dumps({**config, "model_type": "remote_llama", "auto_map": auto_map}))
    before = digest(verifier, data)
    line = one_line(train(*argv(verifier, data, tmp_path / "save"), stdin="y\ny\n"), 2)
    assert "pass --trust-remote-code if you trust that code" in line, line
    assert not marker.exists() and not (tmp_path / "save").exists()
    assert digest(verifier, data) == before
    trusted = train(*argv(verifier, data, tmp_path / "save", "--trust-remote-code", "--max-steps", "1"))
    assert trusted.returncode == 0 and marker.exists(), trusted.stderr[-3000:]


BAD_NUMBERS = [
    ("--epochs", "0"),
    ("--lr=-1e-4", None),
    ("--lr", "nan"),
    ("--ttt-steps", "0"),
    ("--total-seq-len", "0"),
    ("--ttt-step-loss-decay", "0"),
    ("--ttt-step-loss-decay", "inf"),
    ("--eval-split", "1"),
    ("--hidden-states-noise", "-0.05"),
    ("--num-layers", "0"),
    ("--max-steps", "0"),
    ("--max-skipped-fraction", "1.5"),
    ("--per-device-train-batch-size", "0"),
    ("--gradient-accumulation-steps", "0"),
    ("--warmup-steps", "-1"),
    ("--weight-decay", "nan"),
    ("--max-grad-norm", "-1"),
    ("--logging-steps", "0"),
    ("--save-total-limit", "-1"),
    ("--draft-hidden-size", "0"),
    ("--draft-sliding-window", "0"),
    ("--hidden-states-timeout", "0"),
    ("--data-format-version", "3"),
]


@pytest.mark.parametrize("flag, value", BAD_NUMBERS)
def test_numbers_out_of_range_are_one_line_before_anything_runs(
    flag, value, tiny_verifier_path, data, tmp_path, capfd
):
    before = digest(data)
    capfd.readouterr()
    code = cli_main(argv(tiny_verifier_path, data, tmp_path / "save", *(flag, value)[: 1 + (value is not None)]))
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    name = flag.split("=")[0]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"speculators-hf train: error: {name} "), lines
    assert "expected" in lines[0], lines
    assert not (tmp_path / "save").exists() and digest(data) == before
