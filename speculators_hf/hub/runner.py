"""`run(PushArguments) -> PushResult`: stage or upload a draft with its model card."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..utils import get_logger
from .arguments import PushArguments
from .upload import plan_upload, stage_upload, upload_plan

logger = get_logger(__name__)


@dataclass
class PushResult:
    """What push did: the repo and its commit, or the staged folder (`--local-dir`, nothing uploaded)."""

    repo_id: str
    files: list[str] = field(default_factory=list)  # the repo's files as uploaded (or staged)
    url: str | None = None  # the repo's URL (None when only staged)
    commit_url: str | None = None
    commit_oid: str | None = None
    local_dir: str | None = None  # where the upload was staged instead


def run(args: PushArguments) -> PushResult:
    """Check the draft, build its card, then stage it in `--local-dir` or upload it within `--timeout` seconds."""
    if args.local_dir is not None:
        folder = stage_upload(args.checkpoint, args.repo_id, args.local_dir, args.data_path, overwrite=args.overwrite)
        logger.warning("Staged the upload in %s; nothing was uploaded (local_dir given).", folder)
        files = sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))
        return PushResult(args.repo_id, files, local_dir=str(folder))
    plan = plan_upload(args.checkpoint, args.repo_id, args.data_path)
    done = upload_plan(plan, args.repo_id, private=args.private, timeout=args.timeout)
    return PushResult(args.repo_id, plan.names, done["url"], done["commit_url"], done["commit_oid"])


def push_to_hub(
    checkpoint: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload EAGLE-3 draft",
    local_dir: str | Path | None = None,
    data_path: str | Path | None = None,
    timeout: float = 3600.0,
) -> str:
    """Stage the upload and upload it; with `local_dir`, only stage it there (nothing is uploaded).

    Returns:
        `str`: the repo URL, or the staged folder when `local_dir` is given.
    """
    if local_dir is not None:
        folder = stage_upload(checkpoint, repo_id, local_dir, data_path)
        logger.warning("Staged the upload in %s; nothing was uploaded (local_dir given).", folder)
        return str(folder)
    plan = plan_upload(checkpoint, repo_id, data_path)
    done = upload_plan(plan, repo_id, private=private, token=token, commit_message=commit_message, timeout=timeout)
    return done["url"]
