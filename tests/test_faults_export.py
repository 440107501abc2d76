"""Fault table of export and push (issue 22): files outside the run are never touched, a draft with NaN/inf weights is
refused, push with no network or against a server that trickles bytes stops in one line, code in a verifier folder
runs only with --trust-remote-code, flags are checked when parsed. Every refusal: its exit status, one line on stderr
(no traceback), and every file outside the run unchanged."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from speculators_hf.cli import main as cli_main
from speculators_hf.formats.checkpoint import non_finite_count
from speculators_hf.hub import PushArguments, run
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.runstate import read_manifest
from speculators_hf.vocab import build_vocab_mapping

from .faults import cli, requires_namespaces, run_with_mounts


@pytest.fixture(scope="module")
def draft(tiny_verifier_path, tmp_path_factory) -> Path:
    """A servable draft (draft vocabulary 1024 of 2048, hub id recorded) with an eval card beside its weights."""
    freq = {i: (i * 7919) % 1013 + 1 for i in range(0, 2048, 3)}
    d2t, t2d = build_vocab_mapping(freq, 1024, 2048)
    torch.manual_seed(0)
    model = Eagle3DraftModel.from_verifier(
        str(tiny_verifier_path),
        torch.from_numpy(d2t),
        torch.from_numpy(t2d),
        hub_id="org/tiny",
        aux_layer_ids=[1, 2, 3],
    )
    out = tmp_path_factory.mktemp("faults_export") / "draft"
    model.save_pretrained(out)
    (out / "eval_card.md").write_text("# card\n")
    return out


def _digest(*folders: Path) -> dict[str, str]:
    files = (p for folder in folders if folder.exists() for p in sorted(folder.rglob("*")) if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _cli(capfd, *argv: str) -> tuple[int, str, str]:
    capfd.readouterr()
    code = cli_main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _copy(draft: Path, tmp_path: Path, name: str = "draft") -> Path:
    shutil.copytree(draft, tmp_path / name)
    return tmp_path / name


# ------------------------------------------------------------------------------------------ files outside the run


def test_export_refuses_a_folder_holding_files_it_did_not_write(draft, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("mine")
    before = _digest(out, draft)
    code, _, err = _cli(capfd, "export", "--checkpoint", draft, "--output-dir", out)
    line = _one_line(err)
    assert code == 2 and "config.json" in line and "notes.txt" in line and "did not write" in line, line
    assert _digest(out, draft) == before


def test_reexport_replaces_only_what_export_recorded(draft, tmp_path, capfd, caplog):
    out = tmp_path / "out"
    assert _cli(capfd, "export", "--checkpoint", draft, "--output-dir", out)[0] == 0
    manifest = read_manifest(out, "export")
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert sorted(manifest["entries"]) == written and {"config.json", "model.safetensors", "eval_card.md"} <= set(
        written
    )
    assert manifest["result"]["files"] == written and manifest["result"]["verifier"] == "org/tiny"
    before = _digest(out, draft)

    code, _, err = _cli(capfd, "export", "--checkpoint", draft, "--output-dir", out)  # the same inputs: nothing redone
    assert code == 0 and "up to date, skipped" in caplog.text and _digest(out, draft) == before
    code, _, err = _cli(capfd, "export", "--checkpoint", draft, "--output-dir", out, "--verifier-hub-id", "org/other")
    assert code == 2 and "other inputs (verifier_hub_id changed)" in _one_line(err)
    assert _digest(out, draft) == before

    args = ("export", "--checkpoint", draft, "--output-dir", out, "--verifier-hub-id", "org/other", "--overwrite")
    assert _cli(capfd, *args)[0] == 0
    assert (
        json.loads((out / "config.json").read_text())["speculators_config"]["verifier"]["name_or_path"] == "org/other"
    )
    (out / "mine.txt").write_text("a user's file")
    before = _digest(out, draft)
    code, _, err = _cli(capfd, *args)
    assert code == 2 and "mine.txt" in _one_line(err) and _digest(out, draft) == before


def test_in_place_export_edits_only_the_config(draft, tmp_path, capfd):
    local = _copy(draft, tmp_path)
    before = _digest(local)
    code, out, _ = _cli(capfd, "export", "--checkpoint", local, "--verifier-hub-id", "org/renamed")
    assert code == 0 and out.startswith(f"OK {local}: vLLM-servable EAGLE-3 draft for org/renamed"), out
    after = _digest(local)
    changed = {Path(k).name for k in after if after[k] != before.get(k)}
    assert changed == {"config.json"} and set(after) == set(before)  # no manifest: the user's own folder


def test_shard_index_naming_a_file_outside_is_refused(draft, tmp_path, capfd):
    local = _copy(draft, tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((local / "model.safetensors").read_bytes())
    (local / "model.safetensors").unlink()
    tensors = load_file(tmp_path / "outside.safetensors")
    index = {"weight_map": dict.fromkeys(tensors, "../outside.safetensors")}
    (local / "model.safetensors.index.json").write_text(json.dumps(index))
    before = _digest(tmp_path)
    code, _, err = _cli(capfd, "export", "--checkpoint", local, "--output-dir", tmp_path / "out")
    line = _one_line(err)
    assert code == 2 and "model.safetensors.index.json" in line and "'../outside.safetensors'" in line, line
    assert _digest(tmp_path) == before and not (tmp_path / "out").exists()


@requires_namespaces
@pytest.mark.parametrize("fault", ["full", "readonly"])
def test_export_into_a_full_or_read_only_folder_is_one_line(draft, tmp_path, fault):
    out = tmp_path / "out"
    out.mkdir()
    before = _digest(draft)
    argv = cli("export", "--checkpoint", str(draft), "--output-dir", str(out))
    done = run_with_mounts(argv, **{fault: [str(out)]}, size="64k")
    line = _one_line(done.stderr)
    assert done.returncode == 1, done.stderr
    assert ("disk is full" if fault == "full" else "read-only") in line and str(out) in line, line
    assert _digest(draft) == before


# --------------------------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("command", ["export", "push"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_draft_with_non_finite_weights_is_refused_naming_the_tensor(draft, tmp_path, capfd, command, value):
    bad = _copy(draft, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    tensors["fc.weight"][3, 5] = value
    save_file(tensors, bad / "model.safetensors")
    before = _digest(bad)
    out = tmp_path / "out"
    where = ["--output-dir", out] if command == "export" else ["--repo-id", "org/x", "--local-dir", out]
    code, _, err = _cli(capfd, command, "--checkpoint", bad, *where)
    line = _one_line(err)
    assert code == 2 and "non-finite weights (NaN/inf) in fc.weight (1 of" in line, line
    assert _digest(bad) == before and not out.exists()


def test_non_finite_count_reads_in_slices(tmp_path):
    values = torch.randn(37, 11)
    values[0, 0], values[17, 3], values[36, 10] = float("nan"), float("inf"), float("-inf")
    save_file({"w": values, "v": values[:, 0].clone()}, tmp_path / "t.safetensors")
    for chunk in (1, 7, 11, 50, 1 << 22):  # slices of one row, of parts of rows, and the whole tensor
        assert non_finite_count(tmp_path / "t.safetensors", "w", chunk=chunk) == 3
        assert non_finite_count(tmp_path / "t.safetensors", "v", chunk=chunk) == 1


# -------------------------------------------------------------------------------------------------------- network


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """The environment of a real upload: online, a token, its own HF_HOME; HF_ENDPOINT is set by each test."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # huggingface_hub reads it too
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return monkeypatch


def _push(draft: Path, *flags: str, timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    """`speculators-hf push` in its own process (huggingface_hub reads HF_ENDPOINT when it is imported)."""
    start = time.monotonic()
    done = subprocess.run(
        cli("push", "--checkpoint", str(draft), "--repo-id", "org/x", *flags),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.monotonic() - start


def test_push_with_no_network_is_one_line(draft, hub_env):
    port = _free_port()  # nothing listens there
    hub_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    before = _digest(draft)
    done, _ = _push(draft, "--timeout", "60")
    line = _one_line(done.stderr)
    assert done.returncode == 1 and f"127.0.0.1:{port}" in line and "ConnectError" in line, line
    assert _digest(draft) == before


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _serve(handler) -> tuple[_Server, str]:
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_push_to_a_server_that_trickles_bytes_stops_at_the_deadline(draft, hub_env):
    seen = []

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                for _ in range(10000):  # one byte every 0.2 s: no read ever times out
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server, url = _serve(Trickle)
    hub_env.setenv("HF_ENDPOINT", url)
    try:
        done, elapsed = _push(draft, "--timeout", "3")  # before the deadline existed: killed here after 180 s
    finally:
        server.shutdown()
    line = _one_line(done.stderr)
    assert done.returncode == 1 and "did not finish within 3 s (--timeout)" in line and url in line, line
    assert seen == ["/api/repos/create"] and elapsed < 120, (seen, elapsed)


def test_push_to_a_hub_uploads_the_staged_files(draft, tmp_path, hub_env):
    """A fake hub on 127.0.0.1 answering create-repo, YAML validation, preupload and commit: the commit holds
    exactly the files `--local-dir` stages, and `PushResult` tells the repo and the commit."""
    commits = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/api/repos/create":
                answer = {"url": f"{url}/org/x"}
            elif self.path == "/api/validate-yaml":
                answer = {"errors": [], "warnings": []}
            elif self.path.startswith("/api/models/org/x/preupload/"):
                files = json.loads(body)["files"]
                answer = {
                    "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                }
            elif self.path.startswith("/api/models/org/x/commit/"):
                commits.append([json.loads(line) for line in body.splitlines() if line.strip()])
                answer = {"commitUrl": f"{url}/org/x/commit/abc123", "commitOid": "abc123", "pullRequestUrl": None}
            else:
                self.send_error(404)
                return
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server, url = _serve(Hub)
    hub_env.setenv("HF_ENDPOINT", url)
    try:
        result = run(PushArguments(checkpoint=str(draft), repo_id="org/x", timeout=120))
    finally:
        server.shutdown()
    staged = run(PushArguments(checkpoint=str(draft), repo_id="org/x", local_dir=str(tmp_path / "staged")))
    assert result.commit_oid == "abc123" and result.url == f"{url}/org/x" and result.local_dir is None
    (commit,) = commits
    uploaded = sorted(op["value"]["path"] for op in commit if op["key"] == "file")
    assert uploaded == result.files == staged.files == sorted(["README.md", "config.json", "eval_card.md",
                                                               "model.safetensors"])  # fmt: skip


# ------------------------------------------------------------------------------------------------ consent for code


def _research_checkpoint(draft: Path, folder: Path) -> Path:
    """The draft in the EAGLE authors' research format: flat config, `midlayer.*`, no embedding (it comes from the
    --verifier)."""
    layer = json.loads((draft / "config.json").read_text())["transformer_layer_config"]
    flat = {k: v for k, v in layer.items() if k not in ("model_type", "rope_parameters")}
    flat.update(model_type="llama", draft_vocab_size=1024, rope_theta=layer["rope_parameters"]["rope_theta"])
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(flat))
    tensors = load_file(draft / "model.safetensors")
    tensors.pop("embed_tokens.weight")
    save_file({k.replace("layers.0.", "midlayer."): v for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


MARKER_CONFIG = """
import os
from pathlib import Path

from transformers import LlamaConfig

Path(os.environ["EXPORT_MARKER"]).mkdir()  # the folder's code ran


class MarkerConfig(LlamaConfig):
    model_type = "speculators-marker"
"""


def test_verifier_code_runs_only_with_trust_remote_code(draft, tiny_verifier_path, tmp_path, capfd, monkeypatch):
    research = _research_checkpoint(draft, tmp_path / "research")
    verifier = tmp_path / "verifier"
    shutil.copytree(tiny_verifier_path, verifier)
    config = json.loads((verifier / "config.json").read_text())
    config.update(model_type="speculators-marker", auto_map={"AutoConfig": "configuration_marker.MarkerConfig"})
    (verifier / "config.json").write_text(json.dumps(config))
    (verifier / "configuration_marker.py").write_text(MARKER_CONFIG)
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("EXPORT_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    before = _digest(research, verifier)
    argv = ("export", "--checkpoint", research, "--verifier", verifier, "--output-dir", tmp_path / "out")
    code, _, err = _cli(capfd, *argv)
    line = _one_line(err)
    assert code == 2 and "--trust-remote-code" in line and str(verifier) in line, line
    assert not marker.exists() and not (tmp_path / "out").exists() and _digest(research, verifier) == before

    code, out, err = _cli(capfd, *argv, "--trust-remote-code")
    assert code == 0 and out.startswith("OK "), err
    assert marker.exists() and json.loads((tmp_path / "out" / "config.json").read_text())[
        "eagle_aux_hidden_state_layer_ids"
    ] == [1, 2, 3]


# -------------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "command, flags, says",
    [
        ("export", ["--aux-layer-ids", "-1", "2", "3"], "--aux-layer-ids [-1, 2, 3]: layer ids are >= 0"),
        ("export", ["--aux-layer-ids", "3", "1", "2"], "--aux-layer-ids: aux layer ids [3, 1, 2] are not ascending"),
        ("export", ["--aux-layer-ids", "1", "1", "2"], "--aux-layer-ids: aux layer ids [1, 1, 2] repeat an id"),
        ("export", ["--output-dir", " "], "--output-dir is empty"),
        ("push", ["--repo-id", "org/x", "--timeout", "0"], "--timeout 0.0: give a number of seconds > 0"),
        ("push", ["--repo-id", "org/x", "--timeout", "nan"], "--timeout nan: give a number of seconds > 0"),
        ("push", ["--repo-id", "org/a b"], "--repo-id 'org/a b' is not a hub repo id"),
        ("push", ["--repo-id", "x"], "--repo-id 'x': name the owner too"),
    ],
    ids=["aux-negative", "aux-order", "aux-repeat", "empty-output", "timeout-0", "timeout-nan", "repo-id", "no-owner"],
)
def test_flags_are_checked_when_parsed(draft, tmp_path, capfd, command, flags, says):
    before = _digest(draft)
    code, _, err = _cli(capfd, command, "--checkpoint", draft, *flags)
    line = _one_line(err)
    assert code == 2 and says in line, line
    assert _digest(draft) == before
