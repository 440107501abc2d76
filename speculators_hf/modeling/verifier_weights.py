"""Read the few verifier tensors a draft needs (embedding, final norm, lm_head) without loading the verifier."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors import safe_open

from ..formats.checkpoint import WEIGHTS, WEIGHTS_INDEX, weight_map
from ..utils import UserError, get_logger
from ..validation import safetensors_header

logger = get_logger(__name__)

_FIX = "the verifier's checkpoint is incomplete or corrupt: download or save it again"

# Tensor name patterns, most specific first; `layers.` is never matched, so a decoder-layer norm is never taken.
PATTERNS = {
    "embed_tokens": [
        r"^(model\.)?(language_model\.)?(model\.)?embed_tokens\.weight$",
        r"(^|\.)embed_tokens\.weight$",
        r"(^|\.)wte\.weight$",
    ],
    "norm": [r"^(model\.)?(language_model\.)?(model\.)?norm\.weight$", r"^(transformer\.)?ln_f\.weight$"],
    "lm_head": [r"^(language_model\.)?lm_head\.weight$", r"(^|\.)lm_head\.weight$"],
}


def check_verifier_weights(path_or_id: str, label: str) -> None:
    """A local verifier folder's safetensors files have readable headers (a truncated download is one line, before
    anything is written); hub ids are left to the hub client."""
    folder = Path(path_or_id)
    if folder.is_dir():
        for file in sorted(folder.glob("*.safetensors")):
            safetensors_header(file, f"{label} {path_or_id}: {file.name}", _FIX)


def _resolve(path_or_id: str, filename: str) -> str | None:
    """A file of the verifier (a plain file name: `weight_map` refuses any other), from its local folder or the
    hub; None when it has no such file."""
    if Path(path_or_id).is_dir():
        local = Path(path_or_id) / filename
        return str(local) if local.exists() else None
    try:
        return hf_hub_download(path_or_id, filename)
    except Exception:  # noqa: BLE001 - a missing file is an expected answer here
        return None


def _weight_map(path_or_id: str) -> dict[str, str]:
    """tensor name -> safetensors file name, from the index or the single-file checkpoint."""
    index = _resolve(path_or_id, WEIGHTS_INDEX)
    if index is not None:
        return weight_map(index, fix=_FIX)
    single = _resolve(path_or_id, WEIGHTS)
    if single is None:
        raise UserError(f"No safetensors weights found for verifier {path_or_id!r} (model.safetensors[.index.json]).")
    return {k: WEIGHTS for k in safetensors_header(single, fix=_FIX)}


def _find(names: list[str], role: str) -> str | None:
    for pattern in PATTERNS[role]:
        hits = [n for n in names if re.search(pattern, n) and ".layers." not in n and not n.startswith("layers.")]
        if hits:
            return min(hits, key=len)
    return None


def ties_word_embeddings(verifier_config) -> bool:
    """Whether the verifier's lm_head *is* its input embedding (then checkpoints may omit `lm_head.weight`)."""
    text = verifier_config.get_text_config()
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(verifier_config, "tie_word_embeddings", False))


def find_role_tensors(path_or_id: str, verifier_config, roles=tuple(PATTERNS)) -> tuple[dict[str, str], dict]:
    """`({role: tensor name}, weight_map)`. The lm_head falls back to the input embedding only when the config ties
    them; a tensor that cannot be found is a one-line error naming it."""
    weight_map = _weight_map(path_or_id)
    names = list(weight_map)
    found = {role: _find(names, role) for role in roles}
    if "lm_head" in found and found["lm_head"] is None:
        if not ties_word_embeddings(verifier_config):
            raise UserError(
                f"Verifier {path_or_id!r} has no lm_head tensor (lm_head.weight) in its safetensors files and its "
                "config does not tie word embeddings: its output head cannot be read (incomplete checkpoint?)."
            )
        found["lm_head"] = _find(names, "embed_tokens")  # tied: the lm_head is the input embedding
    missing = [role for role, name in found.items() if name is None]
    if missing:
        raise UserError(f"Verifier {path_or_id!r} has no tensor for {missing} in its safetensors files.")
    return found, weight_map


def read_tensors(path_or_id: str, names: list[str], weight_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Read only `names` (fp32), opening only the shards that hold them."""
    out = {}
    for file in sorted({weight_map[n] for n in names}):
        path = _resolve(path_or_id, file)
        if path is None:
            raise UserError(f"Verifier {path_or_id!r}: its index lists {file}, which is missing ({_FIX}).")
        header = safetensors_header(path, fix=_FIX)
        absent = [n for n in names if weight_map[n] == file and n not in header]
        if absent:
            raise UserError(f"{path}: has no {absent[0]}, which its index lists ({_FIX}).")
        with safe_open(path, "pt") as f:
            out.update({n: f.get_tensor(n).float() for n in names if weight_map[n] == file})
    return out


def load_verifier_tensors(path_or_id: str, verifier_config, roles=tuple(PATTERNS)) -> dict[str, torch.Tensor]:
    """`{"embed_tokens": [V, H], "norm": [H], "lm_head": [V, H]}` (or the `roles` asked for), fp32, read from only the
    shards that hold them."""
    found, weight_map = find_role_tensors(path_or_id, verifier_config, roles)
    tensors = read_tensors(path_or_id, sorted(set(found.values())), weight_map)
    logger.info("Read verifier tensors %s", found)
    return {role: tensors[name] for role, name in found.items()}


def recorded_verifier_name(path_or_id: str) -> str:
    """The verifier reference to store in the draft config: a hub id when one can be known, else the path."""
    path = Path(path_or_id)
    if not path.exists():
        return path_or_id  # a hub id
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", str(path.resolve()))
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    logger.warning(
        "Recording the local verifier path %s in the draft config; pass `hub_id` (--verifier-hub-id) so that "
        "`vllm serve <draft>` still finds the verifier after folders move.",
        os.path.abspath(path_or_id),
    )
    return os.path.abspath(path_or_id)
