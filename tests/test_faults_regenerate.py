"""Machine faults in `speculators-hf regenerate` (issue 22): a read-only output folder, a disk that fills mid-run.

Each case runs the real CLI where the output folder is a read-only or tiny tmpfs (`tests/faults.py`), and checks the
exit status, that stderr is one line, and that every file outside the run is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from speculators_hf.online.server import free_port

from .faults import cli, requires_namespaces, run_with_mounts

pytestmark = requires_namespaces
QUIET = {"TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def digest(*roots: Path) -> dict[str, str]:
    files = [p for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def inputs(peaked_verifier_path, tmp_path):
    """12 chats with long user turns: each saved conversation takes about 1.3 kB, so a 12 kB folder fills mid-run."""
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [{"id": f"c{k}", "messages": [{"role": "user", "content": f"{k} " + "how are you doing today? " * 40}]}
            for k in range(12)]  # fmt: skip
    (folder / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def regenerate_argv(verifier, inputs: Path, out: Path, *extra: str) -> list[str]:
    return cli("regenerate", "--target-model-path", str(verifier), "--train-data-path", str(inputs / "chats.jsonl"),
               "--output-path", str(out), "--backend", "transformers", "--max-new-tokens", "4", "--max-model-len",
               "1024", "--chunk-size", "1", "--cache-dir", str(inputs.parent / "cache"), *extra)  # fmt: skip


def test_a_read_only_output_folder_fails_before_any_engine_loads(peaked_verifier_path, inputs, tmp_path):
    """The server named here does not exist: reaching it would be another error (exit 2, `cannot connect`)."""
    out = tmp_path / "ro"
    out.mkdir()
    before = digest(inputs, peaked_verifier_path)
    dead = ["--server-url", f"http://127.0.0.1:{free_port()}", "--max-retries", "0"]
    proc = run_with_mounts(regenerate_argv(peaked_verifier_path, inputs, out / "out.jsonl", *dead), readonly=[out],
                           env=QUIET)  # fmt: skip
    line = one_line(proc.stderr)
    assert proc.returncode == 1 and "read-only" in line and str(out) in line, proc.stderr
    assert digest(inputs, peaked_verifier_path) == before and not list(out.iterdir())


def test_a_full_disk_mid_run_keeps_finished_conversations_and_a_rerun_resumes(peaked_verifier_path, inputs, tmp_path):
    out, saved = tmp_path / "full", tmp_path / "saved"
    out.mkdir()
    before = digest(inputs, peaked_verifier_path)
    argv = regenerate_argv(peaked_verifier_path, inputs, out / "out.jsonl")
    # What the tmpfs held when the run stopped is copied out before the namespace (and its tmpfs) ends.
    script = '"$@"; code=$?; cp -a "$FULL/." "$SAVED"; exit $code'
    proc = run_with_mounts(["sh", "-c", script, "sh", *argv], full=[out], size="12k",
                           env={**QUIET, "FULL": str(out), "SAVED": str(saved)})  # fmt: skip
    line = one_line(proc.stderr)
    assert proc.returncode == 1 and "disk is full" in line and "records-000.jsonl" in line, proc.stderr
    assert digest(inputs, peaked_verifier_path) == before and not list(out.iterdir())  # the real folder: untouched
    records = (saved / ".out.jsonl.partial" / "records-000.jsonl").read_bytes().split(b"\n")
    kept = len([r for r in records[:-1] if r])  # the last may be torn
    assert 1 <= kept < 12 and not (saved / "out.jsonl").exists()

    rerun = run_with_mounts(regenerate_argv(peaked_verifier_path, inputs, saved / "out.jsonl"), env=QUIET)
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads((saved / ".speculators_hf" / "regenerate-out.jsonl.json").read_text())["result"]
    assert result["this_run_conversations"] == 12 - kept and result["written"] == 12
    assert len((saved / "out.jsonl").read_text().splitlines()) == 12 and not (saved / ".out.jsonl.partial").exists()
    shutil.rmtree(saved)
