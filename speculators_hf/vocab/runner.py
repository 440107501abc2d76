"""`run`: token frequencies -> `d2t.npy` / `t2d.npy`, recorded as the `vocab` run of the output folder.

The folder is usually datagen's output: vocab records its two files in a manifest of its own
(`.speculators_hf/vocab.json`, beside datagen's), so datagen and vocab each replace only what they wrote.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .. import runstate
from ..utils import UserError, get_logger
from ..validation import pretrained_config
from .arguments import VocabArguments
from .mapping import D2T_FILE, T2D_FILE, build_vocab_mapping, load_token_freq, save_vocab_mapping

logger = get_logger(__name__)

KEY = "vocab"


@dataclass
class VocabResult:
    """What a vocab run wrote."""

    d2t: str  # path of d2t.npy
    t2d: str  # path of t2d.npy
    draft_vocab_size: int
    target_vocab_size: int
    coverage: float  # fraction of the loss-masked tokens counted in token_freq.pt that the draft vocabulary holds
    reused: bool = False  # True: the recorded result of a finished run with the same inputs (nothing ran)


def run(args: VocabArguments, *, replace_stale: bool = False) -> VocabResult:
    """Build and save the mapping, or return the recorded result when the same inputs were already done.

    `replace_stale`: replace the files of an earlier vocab run with other inputs (the pipeline, in its own folders)
    instead of refusing them. Everything is checked before anything is written."""
    target_vocab_size = _target_vocab_size(args)
    freq = load_token_freq(args.token_freq_path)
    d2t, t2d = build_vocab_mapping(freq, args.draft_vocab_size, target_vocab_size)
    inputs = {
        "token_freq": runstate.file_signature(args.token_freq_path),
        "draft_vocab_size": args.draft_vocab_size,
        "target_vocab_size": target_vocab_size,
    }
    claim = runstate.claim(
        args.output_path,
        KEY,
        inputs,
        overwrite=args.overwrite,
        replace_stale=replace_stale,
        owned=False,
        label="--output-path",
    )
    if claim.finished:
        logger.warning("vocab %s: up to date (same inputs), skipped; --overwrite reruns it.", args.output_path)
        return VocabResult(**{**claim.result, "reused": True})
    for name in (D2T_FILE, T2D_FILE):
        claim.path(name)  # recorded before it is written; refused if it exists and is not ours
    paths = save_vocab_mapping(args.output_path, d2t, t2d)
    covered = sum(freq.get(int(t), 0) for t in np.nonzero(t2d)[0])
    result = VocabResult(
        d2t=str(paths[0]),
        t2d=str(paths[1]),
        draft_vocab_size=args.draft_vocab_size,
        target_vocab_size=target_vocab_size,
        coverage=round(covered / max(sum(freq.values()), 1), 6),
    )
    claim.finish(asdict(result), produced=len(d2t), what="draft tokens")
    logger.warning(
        "Draft vocabulary %d/%d covers %.2f%% of loss-masked tokens -> %s, %s",
        args.draft_vocab_size,
        target_vocab_size,
        100 * result.coverage,
        *paths,
    )
    return result


def _target_vocab_size(args: VocabArguments) -> int:
    """V: `--target-vocab-size`, or the verifier's (which a given `--target-vocab-size` must equal)."""
    if args.target_model_path is None:
        return args.target_vocab_size
    config = pretrained_config(args.target_model_path, "--target-model-path", trust_remote_code=args.trust_remote_code)
    model_vocab = config.get_text_config().vocab_size
    if args.target_vocab_size is not None and args.target_vocab_size != model_vocab:
        raise UserError(
            f"--target-vocab-size {args.target_vocab_size} disagrees with {args.target_model_path} ({model_vocab})."
        )
    return model_vocab


__all__ = ["VocabResult", "run"]
