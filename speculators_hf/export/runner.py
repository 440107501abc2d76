"""`run(ExportArguments) -> ExportResult`: check (and convert) a draft, then write the served checkpoint.

Nothing is written unless the draft passes the checks. Into another folder, export claims it through `runstate`: the
files it copies are recorded before they are written (`.speculators_hf/export.json`), a folder holding files export
did not write is refused, an export with the same inputs that finished there is not redone, and one with other inputs
is replaced (only its recorded files) with `--overwrite` or by the pipeline. In place, only `config.json` changes
(with `--verifier-hub-id`), as the user asked.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import runstate
from ..formats.checkpoint import CONFIG, copy_file, read_config, served_files, training_record
from ..modeling.research_format import is_research_checkpoint
from ..utils import UserError, get_logger, write_json
from .arguments import ExportArguments
from .check import check_checkpoint
from .convert import convert_research_checkpoint, set_verifier_name, with_verifier_name

logger = get_logger(__name__)

KEY = "export"  # the run-state manifest in the output folder


@dataclass
class ExportResult:
    """What an export produced: the served folder and what vLLM will read from it."""

    output_dir: str
    verifier: str  # speculators_config.verifier.name_or_path: what `vllm serve <draft>` serves
    draft_vocab_size: int
    aux_layer_ids: list[int]
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # written by this export (in place: config.json or nothing)
    converted: bool = False  # a research-format checkpoint was converted
    reused: bool = False  # True: the recorded result of a finished run with the same inputs (nothing ran)


def run(args: ExportArguments, *, replace_stale: bool = False) -> ExportResult:
    """Check `args.checkpoint` against what vLLM loads and write the served checkpoint (see the module docstring).

    Args:
        replace_stale: the pipeline's own folder: an earlier export with other inputs is replaced without
            `--overwrite`.
    """
    src = Path(args.checkpoint)
    if not (src / CONFIG).is_file():
        raise UserError(f"--checkpoint {src} has no config.json.")
    label = f"--checkpoint {src}"
    if is_research_checkpoint(src):
        out = Path(args.output_dir) if args.output_dir else src.with_name(src.name + "-speculators")
        return _convert(args, src, out, label, replace_stale)
    if not args.output_dir or Path(args.output_dir).resolve() == src.resolve():
        if args.data_path:
            raise UserError("--data-path is carried into --output-dir; give --output-dir (in place nothing is added).")
        return _in_place(args, src, label)
    return _copy(args, src, Path(args.output_dir), label, replace_stale)


def export_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path | None = None,
    verifier_hub_id: str | None = None,
    verifier: str | None = None,
    aux_layer_ids: list[int] | None = None,
    *,
    data_path: str | Path | None = None,
    trust_remote_code: bool = False,
) -> tuple[Path, list[str]]:
    """`run` as the pipeline calls it (its folder: other inputs replace an earlier export). Returns `(served folder,
    warnings)`."""
    args = ExportArguments(
        checkpoint=str(checkpoint),
        output_dir=None if output_dir is None else str(output_dir),
        verifier_hub_id=verifier_hub_id,
        verifier=verifier,
        aux_layer_ids=aux_layer_ids,
        data_path=None if data_path is None else str(data_path),
        trust_remote_code=trust_remote_code,
    )
    result = run(args, replace_stale=True)
    return Path(result.output_dir), result.warnings


# -------------------------------------------------------------------------------------------------------- modes


def _in_place(args: ExportArguments, src: Path, label: str) -> ExportResult:
    config = read_config(src)
    if not args.verifier_hub_id:
        return _result(src, config, check_checkpoint(src, label=label), [])
    edited = with_verifier_name(config, args.verifier_hub_id)
    warnings = check_checkpoint(src, edited, label=label)  # before the edited config is written
    write_json(src / CONFIG, edited)
    return _result(src, edited, warnings, [CONFIG])


def _copy(args: ExportArguments, src: Path, out: Path, label: str, replace_stale: bool) -> ExportResult:
    """A speculators-format checkpoint copied into `out` with its side files and training record."""
    runstate.refuse_foreign(out)  # before any work
    config = read_config(src)
    sources = {name: src / name for name in served_files(src)}
    sources |= training_record(src, args.data_path)  # Trainer's state beside an epoch draft, for the card
    edited = with_verifier_name(config, args.verifier_hub_id) if args.verifier_hub_id else None
    warnings = check_checkpoint(src, edited, label=label)
    claim = _claim(args, out, sources, replace_stale)
    if claim.finished:
        return ExportResult(**{**claim.result, "reused": True})
    for name, source in sources.items():
        copy_file(source, claim.path(name))
    if edited is not None:
        write_json(claim.path(CONFIG), edited)
    return _finish(claim, _result(out, edited or config, warnings, list(sources)))


def _convert(args: ExportArguments, src: Path, out: Path, label: str, replace_stale: bool) -> ExportResult:
    """A research-format checkpoint converted in a folder beside `out`, checked, then moved into `out`."""
    runstate.refuse_foreign(out)  # before any work
    sources = {p.name: p for p in sorted(src.iterdir()) if p.is_file()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.", suffix=".exporting") as tmp:
        staged = Path(tmp)
        verifier = args.verifier or args.verifier_hub_id
        convert_research_checkpoint(src, staged, verifier, args.aux_layer_ids, args.trust_remote_code)
        if args.verifier_hub_id:
            set_verifier_name(staged, args.verifier_hub_id)
        warnings = check_checkpoint(staged, label=label)
        claim = _claim(args, out, sources, replace_stale)
        if claim.finished:
            return ExportResult(**{**claim.result, "reused": True})
        names = sorted(p.name for p in staged.iterdir())
        for name in names:
            os.replace(staged / name, claim.path(name))
        return _finish(claim, _result(out, read_config(out), warnings, names, converted=True))


# ------------------------------------------------------------------------------------------------------ helpers


def _claim(args: ExportArguments, out: Path, sources: dict[str, Path], replace_stale: bool) -> runstate.Claim:
    inputs = {
        "checkpoint": {name: runstate.file_signature(path) for name, path in sorted(sources.items())},
        "verifier_hub_id": args.verifier_hub_id,
        "verifier": runstate.file_signature(args.verifier),
        "aux_layer_ids": args.aux_layer_ids,
    }
    claim = runstate.claim(out, KEY, inputs, overwrite=args.overwrite, replace_stale=replace_stale)
    if claim.finished:
        logger.warning("--output-dir %s: export up to date, skipped; --overwrite reruns it.", out)
    return claim


def _finish(claim: runstate.Claim, result: ExportResult) -> ExportResult:
    claim.finish(asdict(result), produced=len(result.files), what="files")
    return result


def _result(
    folder: Path, config: dict, warnings: list[str], files: list[str], converted: bool = False
) -> ExportResult:
    return ExportResult(
        output_dir=str(folder),
        verifier=config["speculators_config"]["verifier"]["name_or_path"],
        draft_vocab_size=config["draft_vocab_size"],
        aux_layer_ids=list(config["eagle_aux_hidden_state_layer_ids"]),
        warnings=list(warnings),
        files=sorted(files),
        converted=converted,
    )
