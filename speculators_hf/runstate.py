"""Run state: whether a stage starts, resumes, is already finished or must refuse; the only code that deletes a run's
files.

A stage *claims* where it writes, with the fingerprint of its inputs: a folder it owns whole (datagen's output, a
training `--save-path`) or named entries in a folder it shares (regenerate's `out.jsonl` beside the user's files,
evaluate's card inside a draft folder). The claim is recorded in a manifest, `<folder>/.speculators_hf/<key>.json`:
the fingerprint and the inputs it came from, the entries written (top-level names in the folder), the status and the
stage's result. The rules are the same for every stage and for the pipeline:

- nothing recorded: a fresh start; in a folder the stage owns, only if the folder holds nothing but our own entries;
- same fingerprint, complete, every entry present: *finished*: nothing runs, the recorded result is returned;
- same fingerprint, not complete: *resumed*: the stage continues from what its entries hold;
- other fingerprint: refused in one line naming what changed, unless `overwrite` (or `replace_stale`, the pipeline's
  own folders): then the entries the manifest records, and only those, are deleted and the run starts fresh;
- an entry about to be written that exists but no manifest records: refused in one line (a user's file is never
  replaced or deleted).

An entry is recorded *before* it is written, so a run killed mid-write still owns what it left (including the hidden
`.<entry>.*` temp files of `utils.atomic_path`). `finish` refuses a result holding a non-finite number or reporting
that nothing was produced: the manifest then stays unfinished and the CLI exits non-zero.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .utils import RunFailed, UserError, check_writable, get_logger, write_json
from .validation import bad_file, read_json_if_exists

logger = get_logger(__name__)

STATE_DIR = ".speculators_hf"  # the manifests, inside the folder they describe
RUNNING, COMPLETE = "running", "complete"
# How our writers name an entry's temp files (`utils.atomic_path`, export's staging folder, training's checkpoints):
# `.<entry>.<anything><suffix>`; they belong to the entry (a kill may leave one; deleting the entry deletes it).
TEMP_SUFFIXES = (".tmp", ".partial", ".exporting")
FINISHED, RESUMED, FRESH = "finished", "resumed", "fresh"


def fingerprint(obj) -> str:
    """16 hex digits of the SHA-256 of `obj` as canonical JSON (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_signature(path: str | Path | None) -> dict | str | None:
    """What an input path contributes to a fingerprint: a local file's content hash (an edited file counts, a
    rewritten identical one does not); a folder's recorded manifests (their fingerprints and status); anything else
    (a hub id, a dataset name) as given."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"path": str(p.resolve()), "sha256": digest.hexdigest()}
    if p.is_dir() and (p / STATE_DIR).is_dir():
        manifests = {m.stem: read_manifest(p, m.stem) or {} for m in sorted((p / STATE_DIR).glob("*.json"))}
        return {
            "path": str(p.resolve()),
            "runs": {k: [m.get("fingerprint"), m.get("status")] for k, m in manifests.items()},
        }
    return str(path)


def changed_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted names of the inputs that differ (two levels deep), for the one line that refuses a stale folder."""
    keys = []
    for key in sorted(set(before) | set(after), key=str):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            keys += changed_keys(a, b, f"{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def manifest_path(folder: str | Path, key: str) -> Path:
    return Path(folder) / STATE_DIR / f"{key}.json"


def read_manifest(folder: str | Path, key: str) -> dict | None:
    """A stage's manifest in `folder`, or None; a damaged one is one line."""
    path = manifest_path(folder, key)
    fix = "delete it to forget that run (then --overwrite cannot tell which files that run wrote)"
    record = read_json_if_exists(path, fix=fix)
    valid = record is None or (isinstance(record.get("fingerprint"), str) and isinstance(record.get("entries"), list))
    if not valid:
        raise bad_file(str(path), "is not a speculators_hf run manifest (no fingerprint or entries)", fix)
    return record


def require_complete(folder: str | Path, key: str, label: str, fix: str) -> dict:
    """The manifest of a finished run of `key` in `folder`, for a stage that reads its outputs; one line otherwise."""
    record = read_manifest(folder, key)
    if record is None:
        raise UserError(f"{label} {folder}: no finished {key} run recorded there; {fix}.")
    if record.get("status") != COMPLETE:
        raise UserError(f"{label} {folder}: the {key} run there did not finish (it is partial); {fix}.")
    return record


@dataclass
class Claim:
    """What `claim` decided, and the handle through which the stage records what it writes."""

    folder: Path
    key: str
    fingerprint: str
    inputs: dict
    state: str  # FRESH | RESUMED | FINISHED
    manifest: dict = field(repr=False)
    readonly: bool = False  # a non-main process: decides as the main one does, writes nothing

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    @property
    def resumed(self) -> bool:
        return self.state == RESUMED

    @property
    def result(self) -> dict | None:
        """The result recorded by `finish` (of this run, or of the finished run found)."""
        return self.manifest.get("result")

    def entries(self) -> list[str]:
        return list(self.manifest["entries"])

    def owns(self, name: str) -> bool:
        return name in self.manifest["entries"]

    def path(self, name: str) -> Path:
        """`folder / name`, recorded as this run's entry before it is written; refused if it exists and is not ours."""
        name = _entry_name(name)
        if not self.owns(name):
            target = self.folder / name
            if (target.exists() or target.is_symlink()) and not _recorded_anywhere(self.folder, name):
                raise UserError(
                    f"{target} exists and was not written by speculators_hf: move it away or choose another output "
                    "(it is never replaced)."
                )
            self.track(name)
        return self.folder / name

    def track(self, *names: str) -> None:
        """Record entries as this run's (before they are written, or written by a library on our behalf)."""
        known = set(self.manifest["entries"])
        new = [n for n in dict.fromkeys(map(_entry_name, names)) if n not in known]
        if not new or self.readonly:
            self.manifest["entries"] += new
            return
        with self._locked() as manifest:
            known = set(manifest["entries"])
            manifest["entries"] += [n for n in new if n not in known]
            manifest["status"] = RUNNING
        self.manifest["entries"] = manifest["entries"]

    def remove(self, name: str) -> None:
        """Delete one entry this run owns (e.g. an older epoch draft) and forget it."""
        name = _entry_name(name)
        if not self.owns(name):
            raise ValueError(f"{self.folder / name} is not an entry of this {self.key} run")
        if not self.readonly:
            _delete(self.folder, {name})
            with self._locked() as manifest:
                manifest["entries"] = [n for n in manifest["entries"] if n != name]
        self.manifest["entries"] = [n for n in self.manifest["entries"] if n != name]

    def finish(self, result: dict | None = None, produced: int | None = None, what: str = "outputs") -> Claim:
        """Mark the run complete with its result. A non-finite number in `result`, or `produced == 0`, is a
        `RunFailed` instead: the run stays unfinished (and the CLI exits non-zero)."""
        bad = _non_finite(result or {})
        if bad:
            raise RunFailed(f"{self.key}: the result holds a non-finite value ({bad}); nothing is marked finished.")
        if produced is not None and produced <= 0:
            raise RunFailed(f"{self.key} produced no {what}; nothing is marked finished.")
        self.manifest.update(status=COMPLETE, result=result, finished=time.time())
        if not self.readonly:
            with self._locked() as manifest:
                manifest.update(status=COMPLETE, result=result, finished=self.manifest["finished"])
        self.state = FINISHED
        return self

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        """Read-modify-write of the manifest under a lock (processes of one run share it)."""
        path = manifest_path(self.folder, self.key)
        with _lock(path):
            manifest = read_manifest(self.folder, self.key) or dict(self.manifest)
            yield manifest
            write_json(path, manifest)


def claim(
    folder: str | Path,
    key: str,
    inputs: dict,
    *,
    overwrite: bool = False,
    replace_stale: bool = False,
    owned: bool = True,
    label: str = "--output-dir",
    readonly: bool = False,
    held: str | None = None,
    since: str | None = None,
    fix: str | None = None,
) -> Claim:
    """Decide how run `key` with `inputs` proceeds in `folder` (see the module docstring) and record the claim.

    Args:
        folder: where the run writes (created if missing).
        key: the manifest's name: the stage (`datagen`), or the stage and its output (`regenerate-chats.jsonl`).
        inputs: JSON-able description of everything that changes the result (flags, `file_signature`s).
        overwrite: start over even when the inputs match (`--overwrite`): delete this run's recorded entries first.
        replace_stale: start over, deleting the recorded entries, when the inputs changed (the pipeline, in its own
            folders); otherwise other inputs are refused.
        owned: the run owns the whole folder: any entry no manifest records is refused at the claim.
        label: the flag that named the folder, for messages.
        readonly: decide without writing or deleting (non-main processes of a distributed run).
        held: what the folder holds, in the one line that refuses other inputs (default: "a <key> run with other
            inputs").
        since: what the refusal names as the earlier run's state (`checkpoint-5`: "lr changed since checkpoint-5").
        fix: the end of the refusal (default: use a new folder, or --overwrite); a stage whose flags say it
            otherwise (training's --no-resume-from-checkpoint) words it itself.
    """
    folder = Path(folder)
    if owned:  # before anything is written there
        refuse_foreign(folder, label)
    if not readonly:
        check_writable(folder, label)
    digest = fingerprint(inputs)
    with _lock(manifest_path(folder, key), enabled=not readonly):
        previous = read_manifest(folder, key)
        if previous is not None and (overwrite or previous["fingerprint"] != digest):
            if not (overwrite or replace_stale):
                changed = ", ".join(changed_keys(previous.get("inputs") or {}, inputs)[:6]) or "unknown inputs"
                changed += f" changed since {since}" if since else " changed"
                fix = (
                    fix
                    or f"use a new {label}, or --overwrite to replace that run (only the files it wrote are deleted)"
                )
                held = held or f"a {key} run with other inputs"
                raise UserError(f"{label} {folder} holds {held} ({changed}): {fix}.")
            if not readonly:
                logger.warning("%s %s: replacing the earlier %s run (%s).", label, folder, key, _listed(previous))
                _delete(folder, set(previous["entries"]))
                manifest_path(folder, key).unlink(missing_ok=True)
            previous = None
        if previous is None:
            manifest = {
                "key": key,
                "fingerprint": digest,
                "inputs": inputs,
                "status": RUNNING,
                "entries": [],
                "result": None,
                "started": time.time(),
            }
            state = FRESH
        else:
            manifest = previous
            done = previous.get("status") == COMPLETE and all((folder / n).exists() for n in previous["entries"])
            state = FINISHED if done else RESUMED
            if state == RESUMED:
                manifest["status"] = RUNNING
        if not readonly and state != FINISHED:  # a finished run writes nothing
            write_json(manifest_path(folder, key), manifest)
    return Claim(folder, key, digest, inputs, state, manifest, readonly)


def refuse_foreign(folder: str | Path, label: str = "--output-dir") -> None:
    """Refuse, in one line naming them, a folder holding entries no manifest there records (what `claim` does for a
    folder the run owns); writes nothing, so a stage can call it before any work."""
    foreign = _foreign_entries(Path(folder))
    if foreign:
        raise UserError(
            f"{label} {folder} holds files speculators_hf did not write ({_listed({'entries': foreign})}): "
            "choose an empty or new folder (nothing there is deleted or replaced)."
        )


@contextmanager
def lock(folder: str | Path, name: str) -> Iterator[None]:
    """An exclusive lock, `<folder>/.speculators_hf/<name>.lock`, for the processes that share one run's folder (e.g.
    ranks rewriting one index). `name` must not be a manifest's key (that lock guards the manifest)."""
    with _lock(manifest_path(folder, name)):
        yield


# --------------------------------------------------------------------------------------------------------- helpers


def _entry_name(name: str | Path) -> str:
    """A top-level name inside the folder (no separators, no `..`): entries are what a run may delete."""
    text = str(name)
    if not text or "/" in text or "\\" in text or text in (".", "..", STATE_DIR):
        raise ValueError(f"run entries are names inside their folder, not {text!r}")
    return text


def _belongs(name: str, entries: set[str]) -> bool:
    """`name` is a recorded entry, or one of its temp files `.<entry>.<anything><TEMP_SUFFIXES>` (in time linear in
    `len(name)`); a user's other hidden files beside an entry are not ours."""
    if name in entries:
        return True
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIXES)):
        return False
    return any(name[i] == "." and name[1:i] in entries for i in range(2, len(name)))


def _recorded_anywhere(folder: Path, name: str) -> bool:
    state = folder / STATE_DIR
    if not state.is_dir():
        return False
    for m in state.glob("*.json"):
        record = read_manifest(folder, m.stem) or {}
        if _belongs(name, set(record.get("entries", []))):
            return True
    return False


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of `folder` that no manifest there records (temp files of recorded entries count as recorded)."""
    if not folder.is_dir():
        return []
    recorded: set[str] = set()
    state = folder / STATE_DIR
    if state.is_dir():
        for m in state.glob("*.json"):
            recorded.update((read_manifest(folder, m.stem) or {}).get("entries", []))
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name != STATE_DIR and not p.name.startswith(".write-probe-") and not _belongs(p.name, recorded)
    )


def _delete(folder: Path, names: set[str]) -> None:
    """Remove the entries `names` of `folder` and their leftover temp files (one pass over the folder; never follows a
    symlink out of it)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name == STATE_DIR or not _belongs(path.name, names):
            continue
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _listed(manifest: dict) -> str:
    names = manifest.get("entries") or []
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") or "nothing"


def _non_finite(obj, path: str = "") -> str | None:
    """The dotted name of the first non-finite float in `obj`, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "value"
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


@contextmanager
def _lock(manifest: Path, enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest.with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


__all__ = [
    "COMPLETE",
    "FINISHED",
    "FRESH",
    "RESUMED",
    "RUNNING",
    "STATE_DIR",
    "Claim",
    "changed_keys",
    "claim",
    "file_signature",
    "fingerprint",
    "lock",
    "manifest_path",
    "read_manifest",
    "refuse_foreign",
    "require_complete",
]
