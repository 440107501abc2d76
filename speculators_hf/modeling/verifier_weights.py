"""Read the few verifier tensors a draft needs (embedding, final norm, lm_head) without loading the verifier."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors import safe_open

from ..utils import UserError, get_logger

logger = get_logger(__name__)

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


def _resolve(path_or_id: str, filename: str) -> str | None:
    local = Path(path_or_id) / filename
    if Path(path_or_id).is_dir():
        return str(local) if local.exists() else None
    try:
        return hf_hub_download(path_or_id, filename)
    except Exception:  # noqa: BLE001 - a missing file is an expected answer here
        return None


def _weight_map(path_or_id: str) -> dict[str, str]:
    """tensor name -> safetensors file name, from the index or the single-file checkpoint."""
    index = _resolve(path_or_id, "model.safetensors.index.json")
    if index is not None:
        return json.loads(Path(index).read_text())["weight_map"]
    single = _resolve(path_or_id, "model.safetensors")
    if single is None:
        raise UserError(f"No safetensors weights found for verifier {path_or_id!r} (model.safetensors[.index.json]).")
    with safe_open(single, "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def _find(names: list[str], role: str) -> str | None:
    for pattern in PATTERNS[role]:
        hits = [n for n in names if re.search(pattern, n) and ".layers." not in n and not n.startswith("layers.")]
        if hits:
            return min(hits, key=len)
    return None


def load_verifier_tensors(path_or_id: str, verifier_config) -> dict[str, torch.Tensor]:
    """`{"embed_tokens": [V, H], "norm": [H], "lm_head": [V, H]}` read from only the shards that hold them."""
    weight_map = _weight_map(path_or_id)
    names = list(weight_map)
    found = {role: _find(names, role) for role in PATTERNS}
    tied = getattr(verifier_config.get_text_config(), "tie_word_embeddings", False) or getattr(
        verifier_config, "tie_word_embeddings", False
    )
    if found["lm_head"] is None and (tied or found["embed_tokens"] is not None):
        found["lm_head"] = found["embed_tokens"]  # tied embeddings: lm_head is the input embedding
    missing = [role for role, name in found.items() if name is None]
    if missing:
        raise UserError(f"Verifier {path_or_id!r} has no tensor for {missing} in its safetensors files.")
    out = {}
    for role, name in found.items():
        file = _resolve(path_or_id, weight_map[name])
        with safe_open(file, "pt") as f:
            out[role] = f.get_tensor(name).float()
    logger.info("Read verifier tensors %s", {r: found[r] for r in found})
    return out


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
