"""Resumable, atomic output: finished conversations are appended (fsync'ed) to a hidden partial folder as they
finish; the final file (or `save_to_disk` folder) appears only complete, in source order, in one rename.

    out.jsonl                         the rows datagen reads: {"id", "messages"[, "tools"]}
    out.failures.jsonl                every conversation not in out.jsonl, with its status and reason
    out.regenerate_config.json        provenance (see `formats/provenance.py`)
    .out.jsonl.partial/               while running: records-<rank>.jsonl (removed at the end)
    .speculators_hf/regenerate-out.jsonl.json   the run state (`runstate`): inputs, entries written, result

For a folder output the failures and the provenance go inside it (`failures.jsonl`, `regenerate_config.json`).
Every entry is recorded in the run's claim before it is written, so `--overwrite` deletes exactly these and never a
user's file beside them. A record is one JSON line written with a single `write` + `fsync`; a kill can only tear the
last line, which the next run cuts off (that conversation is regenerated). Resume is keyed by conversation id, never by
line count.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

from ..formats.provenance import CONFIG_NAME, FAILURES_NAME, file_sha256, is_chat_file, side_file
from ..runstate import Claim
from ..utils import atomic_path, get_logger, write_json
from ..validation import bad_file, parse_json

logger = get_logger(__name__)


@dataclass(frozen=True)
class OutputLayout:
    output: Path

    @property
    def is_file(self) -> bool:
        return is_chat_file(self.output)

    @property
    def folder(self) -> Path:
        """The folder the output sits in (the user's): the run claims its own names there."""
        return self.output.parent

    @property
    def key(self) -> str:
        """The run state's name: one regenerate run per output name in a folder."""
        return f"regenerate-{self.output.name}"

    @property
    def config(self) -> Path:
        return side_file(self.output, CONFIG_NAME)

    @property
    def failures(self) -> Path:
        return side_file(self.output, FAILURES_NAME)

    @property
    def partial(self) -> Path:
        return self._hidden("partial")

    @property
    def staging(self) -> Path:
        """A folder output while it is written (then renamed into place)."""
        return self._hidden("writing")

    @property
    def replaced(self) -> Path:
        """An earlier folder output while the new one is renamed into place."""
        return self._hidden("old")

    def _hidden(self, what: str) -> Path:
        return self.output.with_name(f".{self.output.name}.{what}")

    def entries(self) -> list[Path]:
        """Everything the run may write in `folder`, claimed before any engine starts."""
        side = [self.failures, self.config] if self.is_file else [self.staging, self.replaced]
        return [self.output, *side, self.partial]


class PartialStore:
    """Append-only, fsync'ed records of finished conversations for one rank; thread-safe."""

    def __init__(self, layout: OutputLayout, rank: int = 0):
        self.layout = layout
        self.path = layout.partial / f"records-{rank:03d}.jsonl"
        self._lock = threading.Lock()
        self._file = None

    def open(self) -> PartialStore:
        self.layout.partial.mkdir(parents=True, exist_ok=True)
        repair(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        return self

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            try:
                self._file.write(line)
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as err:  # e.g. the disk filled: name the file (the next run cuts a torn line off)
                raise OSError(err.errno, err.strerror, str(self.path)) from err

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:  # what `write` could not flush: already raised there
                pass


def repair(path: Path) -> None:
    """Cut a torn last line (a kill during a write) off a records file."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
            logger.warning("%s: dropped a partly written record (the run was killed while writing it).", path)


def read_records(layout: OutputLayout) -> dict[str, dict]:
    """Every finished conversation of earlier runs, by id (torn last lines are repaired first)."""
    records: dict[str, dict] = {}
    fix = f"pass --overwrite to regenerate every chat of {layout.output}"
    for path in sorted(layout.partial.glob("records-*.jsonl")):
        repair(path)
        with open(path, "rb") as f:  # streamed: the records of a large run do not fit in memory twice
            for number, line in enumerate(f, 1):
                label = f"{path} line {number}"
                if line.strip():
                    record = parse_json(line, label, fix=fix)
                    if not isinstance(record.get("id"), str) or not isinstance(record.get("index"), int):
                        raise bad_file(label, "is not a regenerate record (no id and index)", fix)
                    records[record["id"]] = record
    return records


def write_final(claim: Claim, layout: OutputLayout, records: list[dict], provenance: dict) -> dict | None:
    """Write the output, the failures and the provenance from every record, each atomically, through `claim`.

    Returns the `output` section of the provenance (format, rows, checksum); None when no conversation made it into
    the output: then only the failures are written (the run has produced nothing)."""
    records = sorted(records, key=lambda r: r["index"])
    rows = [r["row"] for r in records if r["status"] == "ok"]
    failures = [{k: r[k] for k in ("index", "id", "status", "reason")} for r in records if r["status"] != "ok"]
    out = layout.output
    if layout.is_file:
        _write_jsonl(claim.path(layout.failures.name), failures)
        if not rows:
            return None
        _write_jsonl(claim.path(out.name), rows)
        output = {"path": str(out), "format": "jsonl", "rows": len(rows), "sha256": file_sha256(out)}
        write_json(claim.path(layout.config.name), {**provenance, "output": output})
        return output
    staging = _fresh(claim, layout.staging.name)
    output = None
    if rows:
        dataset = Dataset.from_list(rows)
        dataset.save_to_disk(str(staging))
        output = {"path": str(out), "format": "save_to_disk", "rows": len(rows), "fingerprint": dataset._fingerprint}
        write_json(staging / CONFIG_NAME, {**provenance, "output": output})
    staging.mkdir(exist_ok=True)
    _write_jsonl(staging / FAILURES_NAME, failures)
    old = _fresh(claim, layout.replaced.name)
    if claim.path(out.name).exists():
        os.replace(out, old)
    os.replace(staging, out)
    claim.remove(old.name)
    claim.remove(staging.name)  # renamed away: forgotten
    return output


def _fresh(claim: Claim, name: str) -> Path:
    """A recorded entry of `claim`, emptied of what an interrupted run left there."""
    if claim.owns(name):
        claim.remove(name)
    return claim.path(name)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
