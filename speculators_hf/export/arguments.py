"""`ExportArguments`: every flag of `speculators-hf export` (`python -m speculators_hf.export`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..modeling.configuration_eagle3 import aux_layer_ids_problem
from ..utils import UserError


@dataclass
class ExportArguments:
    """Check a draft checkpoint against what vLLM's EAGLE-3 loader reads (names, shapes, dtypes, config keys, the
    vocabulary mapping, finite weights); convert research checkpoints. Into another folder, the files are copied and
    recorded there (`.speculators_hf/export.json`): a folder holding files export did not write is refused, and a
    re-export replaces only the files it recorded.

    Example: speculators-hf export --checkpoint out/checkpoints/2 --output-dir out/draft
    --verifier-hub-id meta-llama/Llama-3.1-8B-Instruct"""

    checkpoint: str = field(metadata={"help": "Draft checkpoint folder (speculators or EAGLE research format)."})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Write the served checkpoint here (default: in place, where only config.json changes, with "
            "--verifier-hub-id; `<checkpoint>-speculators` for a research checkpoint)."
        },
    )
    verifier_hub_id: str | None = field(
        default=None,
        metadata={
            "help": "Verifier recorded in speculators_config.verifier.name_or_path, which `vllm serve <draft>` "
            "serves. Use a hub id: a local absolute path breaks when folders move."
        },
    )
    verifier: str | None = field(
        default=None,
        metadata={
            "help": "Verifier folder or hub id to read (research checkpoints only: layer count, "
            "max_position_embeddings and a missing embedding)."
        },
    )
    aux_layer_ids: list[int] | None = field(
        default=None,
        metadata={"help": "Aux layer ids for a research checkpoint, ascending, >= 0 (default [2, n//2, n-3])."},
    )
    data_path: str | None = field(
        default=None,
        metadata={
            "help": "Datagen's output folder: its data_config.json is carried into --output-dir for the model card."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Let the --verifier's config run code from its folder (auto_map). Only for a verifier whose code "
            "you trust; without it such a verifier is refused in one line."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Export again into --output-dir even when an export with these inputs finished there, or when "
            "one with other inputs did (only the files export recorded there are replaced)."
        },
    )

    def __post_init__(self) -> None:
        for name in ("checkpoint", "output_dir", "verifier_hub_id", "verifier", "data_path"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise UserError(f"--{name.replace('_', '-')} is empty; give a folder or id, or leave the flag out.")
        ids = self.aux_layer_ids
        if ids is not None:
            if not ids:
                raise UserError("--aux-layer-ids is empty; give the verifier layer ids, e.g. 2 16 29.")
            if any(i < 0 for i in ids):
                raise UserError(
                    f"--aux-layer-ids {ids}: layer ids are >= 0 (vLLM convention: id i = input of layer i)."
                )
            problem = aux_layer_ids_problem(ids)
            if problem:  # repeated or not ascending: vLLM feeds the draft the aux states in ascending layer order
                raise UserError(f"--aux-layer-ids: {problem}.")
