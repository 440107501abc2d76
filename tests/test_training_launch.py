"""`examples/train_eagle3.py` launched as users run it: resume after a kill (one process; distributed launches: in
tests/test_distributed.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.training_data import make_training_data, train_argv

ROOT = Path(__file__).parent.parent
EXAMPLE = str(ROOT / "examples" / "train_eagle3.py")


@pytest.fixture(scope="module")
def data(tiny_verifier_path, tmp_path_factory):
    return make_training_data(tiny_verifier_path, tmp_path_factory.mktemp("data"), num_samples=16, max_len=64)


def _run(argv, cwd, name: str) -> subprocess.Popen:
    """The example in a process, its stderr in `<cwd>/<name>.err` (a pipe nobody reads while waiting could fill up
    and block it)."""
    with open(Path(cwd) / f"{name}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, EXAMPLE, *argv], cwd=cwd, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    proc.err = Path(cwd) / f"{name}.err"
    return proc


def _finish(proc: subprocess.Popen) -> None:
    proc.wait(timeout=300)
    assert proc.returncode == 0, proc.err.read_text()[-3000:]


def test_resume_after_kill_matches_uninterrupted_run(tiny_verifier_path, data, tmp_path):
    common = ["--epochs", "3", "--total-seq-len", "128", "--hidden-states-noise", "0.05"]
    _finish(_run(train_argv(tiny_verifier_path, data, tmp_path / "full", *common), tmp_path, "full"))

    killed_dir = tmp_path / "killed"
    proc = _run(train_argv(tiny_verifier_path, data, killed_dir, *common), tmp_path, "killed")
    deadline = time.time() + 300
    while not (killed_dir / "0" / "model.safetensors").exists():  # killed during the second epoch
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "2").exists()

    _finish(_run(train_argv(tiny_verifier_path, data, killed_dir, *common), tmp_path, "resumed"))
    a = load_file(tmp_path / "full" / "2" / "model.safetensors")
    b = load_file(killed_dir / "2" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].float() - b[k].float()).abs().max() <= 1e-5, k


def test_accelerate_command_parses_back_into_the_same_arguments(tiny_verifier_path, data, tmp_path):
    """The one command built from flags: what the processes parse is what was asked (lists, enums, bools set to
    their non-default value, a dict), and nothing else."""
    from dataclasses import asdict

    from speculators_hf.commandline import make_parser, parse
    from speculators_hf.training import Eagle3ModelArguments, Eagle3TrainingArguments, accelerate_command

    def parse_args(argv):
        return parse(make_parser((Eagle3ModelArguments, Eagle3TrainingArguments)), argv)

    extra = ["--aux-layer-ids", "1", "2", "3", "--train-lm-head", "false", "--lr-scheduler-type", "cosine"]
    extra += ["--gradient-checkpointing", "true", "--hidden-states-noise", "0.05", "--no-resume-from-checkpoint"]
    model_args, args = parse_args(train_argv(tiny_verifier_path, data, tmp_path / "save", *extra))
    command = accelerate_command(model_args, args, "accelerate_configs/cpu_ddp.yaml")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_ddp.yaml"]
    assert command[: len(launcher) + 2] == [*launcher, "-m", "speculators_hf.training"]
    again_model, again = parse_args(command[len(launcher) + 2 :])
    assert asdict(again_model) == asdict(model_args)
    assert again.to_dict() == args.to_dict()
    assert "--weight_decay" not in command and "--learning_rate" not in command  # defaults are left to the defaults


def test_launch_trains_on_two_processes_and_reads_the_result(tiny_verifier_path, data, tmp_path):
    """`launch` (what the pipeline calls with --accelerate-config) on the shipped CPU DDP config."""
    import socket

    from speculators_hf.commandline import make_parser, parse
    from speculators_hf.training import Eagle3ModelArguments, Eagle3TrainingArguments, launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "ddp.yaml"
    shipped = (ROOT / "accelerate_configs" / "cpu_ddp.yaml").read_text()
    config.write_text(shipped.replace("main_process_port: 29517", f"main_process_port: {port}"))
    save = tmp_path / "save"
    argv = train_argv(tiny_verifier_path, data, save, "--total-seq-len", "128", "--eval-split", "0.3")
    model_args, args = parse(make_parser((Eagle3ModelArguments, Eagle3TrainingArguments)), argv)
    result = launch(model_args, args, config, {"OMP_NUM_THREADS": "1"})
    assert result.draft == str(save / "0") and (save / "0" / "model.safetensors").is_file()
    assert result.global_step == 3 and result.samples_trained == 11 and result.samples_skipped == 0
    assert result.eval is not None and len(result.eval["acc"]) == 3 and result.eval["tau_sim"] >= 1
