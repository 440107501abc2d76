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


def _run(argv, cwd, **kwargs):
    return subprocess.Popen(
        [sys.executable, EXAMPLE, *argv],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **kwargs,
    )


def test_resume_after_kill_matches_uninterrupted_run(tiny_verifier_path, data, tmp_path):
    common = ["--epochs", "3", "--total-seq-len", "128", "--hidden-states-noise", "0.05"]
    full = _run(train_argv(tiny_verifier_path, data, tmp_path / "full", *common), tmp_path)
    assert full.wait(timeout=300) == 0, full.stderr.read()[-3000:]

    killed_dir = tmp_path / "killed"
    proc = _run(train_argv(tiny_verifier_path, data, killed_dir, *common), tmp_path)
    deadline = time.time() + 300
    while not (killed_dir / "0" / "model.safetensors").exists():  # killed during the second epoch
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "2").exists()

    resumed = _run(train_argv(tiny_verifier_path, data, killed_dir, *common), tmp_path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    a = load_file(tmp_path / "full" / "2" / "model.safetensors")
    b = load_file(killed_dir / "2" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].float() - b[k].float()).abs().max() <= 1e-5, k
