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
    """Cut a torn last line (a kill during a write) off a records file (reading back from its end only)."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        if not end:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        keep, position = 0, end
        while position > 0:  # the last newline, in blocks from the end
            start = max(0, position - (1 << 16))
            f.seek(start)
            newline = f.read(position - start).rfind(b"\n")
            if newline != -1:
                keep = start + newline + 1
                break
            position = start
        f.truncate(keep)
        logger.warning("%s: dropped a partly written record (the run was killed while writing it).", path)


def read_records(layout: OutputLayout) -> Records:
    """Every finished conversation of earlier runs, by id (torn last lines are repaired first).

    Only where each record lies is kept (its index, file and byte offset); the records stay on disk and are read back
    one at a time, so a run of a million conversations resumes and finishes without holding their text in memory."""
    files = sorted(layout.partial.glob("records-*.jsonl"))
    where: dict[str, tuple[int, int, int]] = {}  # id -> (index, file number, byte offset)
    fix = f"pass --overwrite to regenerate every chat of {layout.output}"
    for k, path in enumerate(files):
        repair(path)
        with open(path, "rb") as f:  # streamed: the records of a large run do not fit in memory twice
            offset = 0
            for number, line in enumerate(f, 1):
                if line.strip():
                    record = _parse_record(line, f"{path} line {number}", fix)
                    where[record["id"]] = (record["index"], k, offset)
                offset += len(line)
    return Records(files, where, fix)


def _parse_record(line: bytes, label: str, fix: str) -> dict:
    record = parse_json(line, label, fix=fix)
    if not isinstance(record.get("id"), str) or not isinstance(record.get("index"), int):
        raise bad_file(label, "is not a regenerate record (no id and index)", fix)
    return record


class Records:
    """The finished conversations in a partial folder, by id, read from disk on demand (`read_records`).

    `id in records` and `len(records)` need no reading; iterating reads them in the order they were first recorded,
    `by_index()` in source order."""

    def __init__(self, files: list[Path], where: dict[str, tuple[int, int, int]], fix: str = ""):
        self.files, self._where, self._fix = files, where, fix

    def __contains__(self, conversation_id: str) -> bool:
        return conversation_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self):
        return self._read(self._where.values())

    def by_index(self):
        """The records sorted by their conversation's index (the source order of the output)."""
        return self._read(sorted(self._where.values(), key=lambda w: w[0]))

    def _read(self, places):
        handles: dict[int, object] = {}
        try:
            for _, k, offset in places:
                if k not in handles:
                    handles[k] = open(self.files[k], "rb")
                handles[k].seek(offset)
                yield _parse_record(handles[k].readline(), f"{self.files[k]} at byte {offset}", self._fix)
        finally:
            for handle in handles.values():
                handle.close()


def write_final(claim: Claim, layout: OutputLayout, records: Records, provenance: dict) -> dict | None:
    """Write the output, the failures and the provenance from every record, each atomically, through `claim`.

    The records are streamed in source order (read twice: failures, then rows), never held all at once, except for a
    `save_to_disk` folder output, which `datasets` builds from the list of rows.

    Returns the `output` section of the provenance (format, rows, checksum); None when no conversation made it into
    the output: then only the failures are written (the run has produced nothing)."""
    num_rows = 0

    def failures():
        nonlocal num_rows
        for r in records.by_index():
            if r["status"] == "ok":
                num_rows += 1
            else:
                yield {k: r[k] for k in ("index", "id", "status", "reason")}

    def rows():
        return (r["row"] for r in records.by_index() if r["status"] == "ok")

    out = layout.output
    if layout.is_file:
        _write_jsonl(claim.path(layout.failures.name), failures())
        if not num_rows:
            return None
        _write_jsonl(claim.path(out.name), rows())
        output = {"path": str(out), "format": "jsonl", "rows": num_rows, "sha256": file_sha256(out)}
        write_json(claim.path(layout.config.name), {**provenance, "output": output})
        return output
    staging = _fresh(claim, layout.staging.name)
    output, kept = None, list(rows())
    if kept:
        dataset = Dataset.from_list(kept)
        dataset.save_to_disk(str(staging))
        output = {"path": str(out), "format": "save_to_disk", "rows": len(kept), "fingerprint": dataset._fingerprint}
        write_json(staging / CONFIG_NAME, {**provenance, "output": output})
    del kept
    staging.mkdir(exist_ok=True)
    _write_jsonl(staging / FAILURES_NAME, failures())
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


def _write_jsonl(path: Path, rows) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
