"""Resumable, atomic output: finished conversations are appended (fsync'ed) to a hidden partial folder as they
finish; the final file (or `save_to_disk` folder) appears only complete, in source order, in one rename.

    out.jsonl                         the rows datagen reads: {"id", "messages"[, "tools"]}
    out.failures.jsonl                every conversation not in out.jsonl, with its status and reason
    out.regenerate_config.json        provenance (see `provenance.py`)
    .out.jsonl.partial/               while running: state.json + records-<rank>.jsonl (removed at the end)

For a folder output the failures and the provenance go inside it (`failures.jsonl`, `regenerate_config.json`).
A record is one JSON line written with a single `write` + `fsync`; a kill can only tear the last line, which the next
run cuts off (that conversation is regenerated). Resume is keyed by conversation id, never by line count.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from ..utils import atomic_path, get_logger, write_json
from ..validation import bad_file, parse_json

logger = get_logger(__name__)

CONFIG_NAME = "regenerate_config.json"
FAILURES_NAME = "failures.jsonl"


@dataclass(frozen=True)
class OutputLayout:
    output: Path

    @property
    def is_file(self) -> bool:
        return self.output.suffix == ".jsonl"

    @property
    def config(self) -> Path:
        o = self.output
        return o.with_name(f"{o.stem}.{CONFIG_NAME}") if self.is_file else o / CONFIG_NAME

    @property
    def failures(self) -> Path:
        o = self.output
        return o.with_name(f"{o.stem}.{FAILURES_NAME}") if self.is_file else o / FAILURES_NAME

    @property
    def partial(self) -> Path:
        return self.output.with_name(f".{self.output.name}.partial")

    @property
    def state(self) -> Path:
        return self.partial / "state.json"


def config_path_for(data_path: str | Path) -> Path | None:
    """Where the provenance of a regenerated chat file/folder lives (None when `data_path` is neither)."""
    path = Path(data_path)
    if path.is_file():
        return OutputLayout(path).config if path.suffix == ".jsonl" else None
    return path / CONFIG_NAME if path.is_dir() else None


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
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
    fix = f"delete {layout.partial} (or pass --overwrite) to regenerate its chats"
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_final(layout: OutputLayout, records: list[dict], provenance: dict) -> dict:
    """Write the output, the failures and the provenance from every record, atomically; remove the partial folder.

    Returns the `output` section of the provenance (format, rows, checksum)."""
    records = sorted(records, key=lambda r: r["index"])
    rows = [r["row"] for r in records if r["status"] == "ok"]
    failures = [{k: r[k] for k in ("index", "id", "status", "reason")} for r in records if r["status"] != "ok"]
    out = layout.output
    if layout.is_file:
        with atomic_path(out) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        output = {"path": str(out), "format": "jsonl", "rows": len(rows), "sha256": file_sha256(out)}
        _write_jsonl(layout.failures, failures)
        write_json(layout.config, {**provenance, "output": output})
    else:
        from datasets import Dataset

        staging = out.with_name(f".{out.name}.writing")
        shutil.rmtree(staging, ignore_errors=True)
        dataset = Dataset.from_list(rows)
        dataset.save_to_disk(str(staging))
        output = {"path": str(out), "format": "save_to_disk", "rows": len(rows), "fingerprint": dataset._fingerprint}
        _write_jsonl(staging / FAILURES_NAME, failures)
        write_json(staging / CONFIG_NAME, {**provenance, "output": output})
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(layout.partial, ignore_errors=True)  # last: a kill before this point re-finalizes on the next run
    return output


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def remove_outputs(layout: OutputLayout) -> None:
    """`--overwrite`: forget an earlier output and any unfinished run."""
    shutil.rmtree(layout.partial, ignore_errors=True)
    if layout.is_file:
        for path in (layout.output, layout.failures, layout.config):
            path.unlink(missing_ok=True)
    else:
        shutil.rmtree(layout.output, ignore_errors=True)
