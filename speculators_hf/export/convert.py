"""The EAGLE authors' research checkpoint -> the speculators format vLLM serves, and the recorded verifier name."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..formats.checkpoint import CONFIG, read_config
from ..modeling import Eagle3Config, Eagle3DraftModel, default_aux_layer_ids
from ..modeling.configuration_eagle3 import flatten_config_dict
from ..modeling.verifier_weights import load_verifier_tensors
from ..utils import UserError, get_logger, write_json
from ..validation import bad_file, describe, pretrained_config

logger = get_logger(__name__)


def with_verifier_name(config: dict, name_or_path: str) -> dict:
    """`config` with `speculators_config.verifier.name_or_path` set (a copy)."""
    config = copy.deepcopy(config)
    spec = config.setdefault("speculators_config", {})
    if isinstance(spec, dict) and isinstance(spec.setdefault("verifier", {}), dict):
        spec["verifier"]["name_or_path"] = name_or_path
    return config


def set_verifier_name(path: str | Path, name_or_path: str) -> None:
    """Record the verifier that `vllm serve <draft>` serves (`speculators_config.verifier.name_or_path`)."""
    write_json(Path(path) / CONFIG, with_verifier_name(read_config(path), name_or_path))


def convert_research_checkpoint(
    path: str | Path,
    output_dir: str | Path,
    verifier: str | None = None,
    aux_layer_ids: list[int] | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """EAGLE authors' research checkpoint (flat config, `midlayer.*`) -> speculators format in `output_dir`.

    The tensors are read by `Eagle3DraftModel.from_pretrained` (its `key_mapping` renames `midlayer.*`); this adds
    what the research config lacks.

    Args:
        verifier: hub id or folder of the verifier: its layer count gives the default aux ids `[2, n//2, n-3]`, its
            `max_position_embeddings` replaces a smaller one (which would clip RoPE in vLLM), and its embedding fills
            a missing `embed_tokens.weight`. Recorded as the verifier unless the config names one.
        aux_layer_ids: explicit aux ids (vLLM convention) instead of the verifier's default.
        trust_remote_code: let the verifier's config run code from its folder (`auto_map`); only on the user's word.
    """
    path = Path(path)
    flat = flatten_config_dict(read_config(path))  # norm_before_residual: False unless the config says
    for key in ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map"):
        flat.pop(key, None)
    vconfig = pretrained_config(verifier, "--verifier", trust_remote_code=trust_remote_code) if verifier else None
    vtext = vconfig.get_text_config() if vconfig is not None else None
    n = vtext.num_hidden_layers if vtext is not None else flat.get("verifier_num_hidden_layers")
    ids = aux_layer_ids or flat.get("eagle_aux_hidden_state_layer_ids") or (default_aux_layer_ids(n) if n else None)
    if ids is None:
        raise UserError(
            f"{path}: no aux layer ids in the config; pass --verifier (for [2, n//2, n-3]) or --aux-layer-ids."
        )
    if vtext is not None and flat.get("max_position_embeddings", 0) < vtext.max_position_embeddings:
        logger.warning(
            "Raising max_position_embeddings %s to the verifier's %d (vLLM would clip RoPE).",
            flat.get("max_position_embeddings"),
            vtext.max_position_embeddings,
        )
        flat["max_position_embeddings"] = vtext.max_position_embeddings
    name = flat.pop("verifier_name_or_path", None) or verifier
    if name is None:
        raise UserError(f"{path}: the config names no verifier; pass --verifier-hub-id or --verifier.")
    try:
        config = Eagle3Config(
            **{
                **flat,
                "eagle_aux_hidden_state_layer_ids": list(ids),
                "verifier_num_hidden_layers": n,
                "verifier_name_or_path": name,
                "architectures": ["Eagle3DraftModel"],
                "tie_word_embeddings": False,
            }
        )
    except (TypeError, ValueError) as err:  # a field of the wrong type or value
        if isinstance(err, UserError):
            raise
        raise bad_file(str(path / CONFIG), f"is not a draft config ({describe(err)})") from err
    model, info = Eagle3DraftModel.from_pretrained(
        path, config=config, output_loading_info=True, missing_ok=["embed_tokens.weight"]
    )
    if info["unexpected_keys"]:
        raise UserError(
            f"{path}: research checkpoint does not match its config: unexpected {info['unexpected_keys']}."
        )
    if "embed_tokens.weight" in info["missing_keys"]:  # the authors' drafts share the verifier's embedding
        if verifier is None:
            raise UserError(f"{path} has no embed_tokens.weight; pass --verifier to copy the verifier's embedding.")
        embed = load_verifier_tensors(verifier, vconfig, roles=("embed_tokens",))
        with torch.no_grad():
            model.embed_tokens.weight.copy_(embed["embed_tokens"])
    model.save_pretrained(output_dir)
    return Path(output_dir)
