"""What push uploads (the checked checkpoint, its side files, the training record and the model card), staged in a
folder or sent to the Hub within a total deadline.

huggingface_hub sends every request through one shared client whose timeout is None (a silent server hangs a request
forever) and retries on timeouts; a server that trickles bytes defeats any per-read timeout. So the upload runs in a
child process: there the shared client gets a per-read timeout, and the child is killed when the total deadline
(`--timeout`) passes, whatever it is doing (HTTP, LFS or Xet transfers).
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants

from .. import runstate
from ..export import check_checkpoint
from ..formats.checkpoint import copy_file, served_files, training_record
from ..utils import RunFailed, UserError, atomic_path
from .card import build_model_card
from .transfer import READ_TIMEOUT, upload_in_child

README = "README.md"
STARTUP_TIMEOUT = 300.0  # seconds the upload process may take to start (Python and imports, no network)


@dataclass
class UploadPlan:
    """The files of the repo, by name: local files, and the card's text (README.md)."""

    files: dict[str, Path]
    card: str

    @property
    def names(self) -> list[str]:
        return sorted([*self.files, README])


def plan_upload(checkpoint: str | Path, repo_id: str, data_path: str | Path | None = None) -> UploadPlan:
    """Check the checkpoint (as export does: a draft vLLM would refuse, or one with NaN/inf weights, is refused) and
    read every record the card shows; nothing is written."""
    checkpoint = Path(checkpoint)
    warnings = check_checkpoint(checkpoint)
    if any("local path" in w for w in warnings):
        raise UserError(
            f"{checkpoint} records a local verifier path; a hub repo needs a hub id: "
            "run `speculators-hf export --checkpoint ... --verifier-hub-id ORG/NAME` first."
        )
    card = build_model_card(checkpoint, repo_id, data_path)  # reads (and checks) every record before writing
    files = {name: checkpoint / name for name in served_files(checkpoint) if name != README}
    files |= training_record(checkpoint, data_path)
    return UploadPlan(files, card)


def stage_upload(
    checkpoint: str | Path,
    repo_id: str,
    folder: str | Path,
    data_path: str | Path | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write exactly the files `push_to_hub` uploads into `folder` (claimed through `runstate`: a folder holding files
    push did not write is refused; a staging with other inputs is replaced only with `overwrite`)."""
    runstate.refuse_foreign(folder, "--local-dir")  # before any work
    plan = plan_upload(checkpoint, repo_id, data_path)
    inputs = {
        "repo_id": repo_id,
        "files": {name: runstate.file_signature(path) for name, path in sorted(plan.files.items())},
    }
    claim = runstate.claim(folder, "push", inputs, overwrite=overwrite, label="--local-dir")
    if not claim.finished:
        for name, source in plan.files.items():
            copy_file(source, claim.path(name))
        with atomic_path(claim.path(README)) as tmp:
            tmp.write_text(plan.card)
        claim.finish({"files": plan.names}, produced=len(plan.names), what="files")
    return Path(folder)


def upload_plan(
    plan: UploadPlan,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload EAGLE-3 draft",
    timeout: float = 3600.0,
) -> dict:
    """Create the repo (if needed) and commit the plan's files in a child process (`transfer.py`), killed when the
    upload has not finished `timeout` seconds after it began (the child's start, a second or so, does not count).

    Returns:
        `dict`: `url` (the repo), `commit_url`, `commit_oid`.
    """
    files = [(name, str(path)) for name, path in sorted(plan.files.items())] + [(README, plan.card.encode())]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks inherited
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=upload_in_child,
        args=(send, repo_id, files, private, token, commit_message, min(READ_TIMEOUT, timeout)),
        daemon=True,
    )
    child.start()
    send.close()
    try:
        # the deadline counts from the child's first request: starting Python and importing is not the upload
        status, answer = _receive(receive, child, STARTUP_TIMEOUT, "start")
        if status == "ready":
            status, answer = _receive(receive, child, timeout, "upload")
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
    if status != "ok":
        raise RunFailed(
            f"uploading to {repo_id} at {endpoint()} failed ({answer}); check the network, HF_ENDPOINT and "
            "your token (HF_TOKEN or `hf auth login`), then rerun."
        )
    return answer


def _receive(receive, child, timeout: float, what: str) -> tuple[str, object]:
    """The child's next message within `timeout` seconds; one line when it does not come."""
    if not receive.poll(timeout):
        if what == "start":
            raise RunFailed(f"the upload process did not start within {timeout:g} s; rerun the push.")
        raise RunFailed(
            f"the upload to {endpoint()} did not finish within {timeout:g} s (--timeout); the network or the "
            "Hub is too slow or not answering: rerun later or with a larger --timeout."
        )
    try:
        return receive.recv()
    except EOFError:
        raise RunFailed(f"the upload process died (exit code {child.exitcode}); rerun the push.") from None


def endpoint() -> str:
    """The Hub the upload goes to (the child reads `HF_ENDPOINT` afresh, as huggingface_hub does at import)."""
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
