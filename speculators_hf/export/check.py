"""What vLLM's EAGLE-3 loader reads, checked before a draft is exported or uploaded (a `peagle` draft, for parallel
drafting: also its `mask_token_id` and `mask_hidden` tensor `[1, fc input size]`, without which vLLM refuses it).

`check_checkpoint` compares `config.json` and the weights with exactly what vLLM's eagle3 speculators loader reads
(names, shapes, dtypes, config keys), with the vocabulary mapping, and refuses weights holding NaN/inf; vLLM itself
accepts a draft without `d2t` silently (draft index i then means target id i), so this check must. Shapes and dtypes
come from the safetensors headers; the values are read in slices (a large draft is never held in memory).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..formats.checkpoint import (
    D2T,
    T2D,
    VLLM_VERSION,
    WEIGHTS,
    non_finite_count,
    read_config,
    read_tensor,
    tensor_header,
    vllm_serves_eagle3,
)
from ..modeling.configuration_eagle3 import aux_layer_ids_problem
from ..utils import UserError, get_logger
from ..vocab import validate_vocab_mapping

logger = get_logger(__name__)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# safetensors header dtypes as torch names them (the messages say `torch.int32`, as the tensors would)
_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
# speculators_model_type values vLLM 0.32 serves from our drafts: chained, and parallel drafting (P-EAGLE).
SERVED_MODEL_TYPES = ("eagle3", "peagle")
# transformer_layer_config keys vLLM builds the draft decoder from.
LAYER_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "rms_norm_eps",
    "max_position_embeddings",
    "vocab_size",
    "hidden_act",
)


# ------------------------------------------------------------------------------------------------------ check


def expected_tensors(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype kind: "float" | "int64" | "bool") of every tensor vLLM loads, from the config."""
    layer = config["transformer_layer_config"]
    H, V, inter = layer["hidden_size"], layer["vocab_size"], layer["intermediate_size"]
    heads, kv = layer["num_attention_heads"], layer.get("num_key_value_heads") or layer["num_attention_heads"]
    hd = layer.get("head_dim") or H // heads
    Vd = config.get("draft_vocab_size") or V
    fused = len(config.get("eagle_aux_hidden_state_layer_ids") or (0, 0, 0)) * (config.get("target_hidden_size") or H)
    out = {
        "embed_tokens.weight": ((V, H), "float"),
        "fc.weight": ((H, fused), "float"),
        "norm.weight": ((H,), "float"),
        "lm_head.weight": ((Vd, H), "float"),
    }
    for i in range(layer["num_hidden_layers"]):
        width, p = (2 * H if i == 0 else H), f"layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": ((heads * hd, width), "float"),
            p + "self_attn.k_proj.weight": ((kv * hd, width), "float"),
            p + "self_attn.v_proj.weight": ((kv * hd, width), "float"),
            p + "self_attn.o_proj.weight": ((H, heads * hd), "float"),
            p + "mlp.gate_proj.weight": ((inter, H), "float"),
            p + "mlp.up_proj.weight": ((inter, H), "float"),
            p + "mlp.down_proj.weight": ((H, inter), "float"),
            p + "input_layernorm.weight": ((H,), "float"),
            p + "post_attention_layernorm.weight": ((H,), "float"),
        }
        if layer.get("model_type") == "qwen3":  # Qwen3-style draft layers: RMSNorm on each query/key head
            out |= {p + "self_attn.q_norm.weight": ((hd,), "float"), p + "self_attn.k_norm.weight": ((hd,), "float")}
        if layer.get("attention_bias"):  # vLLM's draft layer then has q/k/v and o biases
            out |= {
                p + "self_attn.q_proj.bias": ((heads * hd,), "float"),
                p + "self_attn.k_proj.bias": ((kv * hd,), "float"),
                p + "self_attn.v_proj.bias": ((kv * hd,), "float"),
                p + "self_attn.o_proj.bias": ((H,), "float"),
            }
        if layer.get("mlp_bias"):
            out |= {
                p + "mlp.gate_proj.bias": ((inter,), "float"),
                p + "mlp.up_proj.bias": ((inter,), "float"),
                p + "mlp.down_proj.bias": ((H,), "float"),
            }
    out["layers.0.hidden_norm.weight"] = ((H,), "float")
    if config.get("norm_before_fc"):
        out["input_norm.weight"] = ((fused,), "float")
    if config.get("fc_norm"):  # Eagle 3.1: one norm per aux state
        Ht = config.get("target_hidden_size") or H
        out |= {f"fc_norm.{i}.weight": ((Ht,), "float") for i in range(fused // Ht)}
    if Vd != V:
        out |= {"d2t": ((Vd,), "int64"), "t2d": ((V,), "bool")}
    if config.get("speculators_model_type") == "peagle":  # parallel drafting: the mask slots' aux state
        out["mask_hidden"] = ((1, fused), "float")
    return out


def _dtype_kind(dtype: torch.dtype) -> str:
    return "float" if dtype in FLOAT_DTYPES else {torch.int64: "int64", torch.bool: "bool"}.get(dtype, str(dtype))


# config.json fields whose type every check below relies on: path -> (types, what)
_CONFIG_TYPES = {
    ("speculators_config",): (dict, "an object"),
    ("speculators_config", "proposal_methods"): (list, "a list"),
    ("speculators_config", "verifier"): (dict, "an object"),
    ("transformer_layer_config",): (dict, "an object"),
    ("draft_vocab_size",): (int, "an integer"),
    ("target_hidden_size",): (int, "an integer or null"),
    ("eagle_aux_hidden_state_layer_ids",): (list, "a list of integers"),
    **{("transformer_layer_config", k): (int, "an integer") for k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
        "vocab_size", "max_position_embeddings", "head_dim",
    )},
}  # fmt: skip


def _type_problems(config: dict) -> list[str]:
    """Fields of the wrong JSON type (the other checks read them as their types)."""
    errors = []
    for keys, (kind, what) in _CONFIG_TYPES.items():
        value, node = config, config
        for key in keys:
            value = node.get(key) if isinstance(node, dict) else None
            node = value
        if value is None:
            continue
        bad = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if kind is list and not bad and keys[-1] != "proposal_methods":
            bad = not all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        if kind is list and not bad and keys[-1] == "proposal_methods":
            bad = not all(isinstance(m, dict) for m in value)
        if bad:
            errors.append(f"{'.'.join(keys)} is {json.dumps(value)[:40]}, expected {what}")
    return errors


def _config_problems(config: dict) -> tuple[list[str], list[str]]:
    errors, warnings = _type_problems(config), []
    if errors:
        return errors, warnings
    kind = config.get("speculators_model_type")
    if kind not in SERVED_MODEL_TYPES:
        errors.append(f"speculators_model_type is {kind!r}, vLLM needs 'eagle3' (or 'peagle': parallel drafting)")
    if kind == "peagle":  # vLLM 0.32 reads the mask slots' token id (its `pard_token`) and refuses a config without
        mask, vocab = config.get("mask_token_id"), (config.get("transformer_layer_config") or {}).get("vocab_size")
        if not isinstance(mask, int) or isinstance(mask, bool) or not 0 <= mask < (vocab or mask + 1):
            errors.append(f"mask_token_id is {json.dumps(mask)}: a peagle draft needs its mask slots' token id")
    spec = config.get("speculators_config") or {}
    methods = spec.get("proposal_methods") or [{}]
    if not methods[0].get("speculative_tokens"):
        errors.append("speculators_config.proposal_methods[0].speculative_tokens is missing")
    name = (spec.get("verifier") or {}).get("name_or_path")
    if not name:
        errors.append("speculators_config.verifier.name_or_path is missing (set it with --verifier-hub-id)")
    elif Path(name).is_absolute():
        warnings.append(
            f"the recorded verifier is the local path {name}: `vllm serve <draft>` breaks when folders "
            "move; set a hub id with --verifier-hub-id"
        )
    layer = config.get("transformer_layer_config") or {}
    missing = [k for k in LAYER_KEYS if k not in layer]
    if missing:
        errors.append(f"transformer_layer_config lacks {missing}")
    if layer and layer.get("model_type") not in ("llama", "qwen3"):
        errors.append(f"transformer_layer_config.model_type {layer.get('model_type')!r} is not llama or qwen3")
    if "rope_parameters" not in layer and "rope_theta" not in layer:
        errors.append("transformer_layer_config has no rope_parameters (the verifier's RoPE)")
    if "draft_vocab_size" not in config:
        errors.append("draft_vocab_size is missing")
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    if not ids:
        errors.append("eagle_aux_hidden_state_layer_ids is missing: vLLM would capture its default (2, n//2, n-3)")
    else:
        problem = aux_layer_ids_problem(ids, config.get("verifier_num_hidden_layers"))
        if problem:  # e.g. not ascending: vLLM would feed the draft's fc the aux states in another order
            errors.append(f"eagle_aux_hidden_state_layer_ids: {problem}")
    if "norm_before_residual" not in config:
        warnings.append("norm_before_residual is missing: vLLM assumes True")
    return errors, warnings


def serving_problems(config: dict) -> list[str]:
    """What would make vLLM refuse the draft at serve time although its tensors are right (verifier, draft layer)."""
    errors = []
    archs = ((config.get("speculators_config") or {}).get("verifier") or {}).get("architectures") or []
    if archs and not vllm_serves_eagle3(archs):
        errors.append(
            f"vLLM {VLLM_VERSION} does not serve EAGLE-3 drafts for {'/'.join(archs)} verifiers (its model class "
            "lacks SupportsEagle3; vLLM would stop with 'Model does not support EAGLE3 interface')"
        )
    layer = config.get("transformer_layer_config") or {}
    if layer.get("hidden_act", "silu") != "silu":
        errors.append(f"the draft's hidden_act is {layer['hidden_act']!r}; vLLM's EAGLE-3 draft layers run only silu")
    rope = layer.get("rope_parameters")
    if isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values()):
        errors.append(
            f"rope_parameters are nested per layer type ({sorted(rope)}); vLLM's draft needs one RoPE (rebuild the "
            "config with Eagle3Config.from_verifier, which takes the full-attention one)"
        )
    return errors


def _tensor_problems(config: dict, header: dict[str, tuple[str, list[int], Path]]) -> list[str]:
    """Names, shapes and dtypes (from the headers), the vocabulary mapping, then the values (NaN/inf)."""
    expected = expected_tensors(config)
    layer = config["transformer_layer_config"]
    V, Vd = layer["vocab_size"], config.get("draft_vocab_size") or layer["vocab_size"]
    errors = []
    missing = [n for n in expected if n not in header]
    if Vd != V and D2T in missing:
        errors.append(
            f"d2t is missing although draft_vocab_size {Vd} != vocab_size {V}: vLLM would silently read "
            "draft index i as target id i"
        )
    missing = [n for n in missing if n not in (D2T, T2D)] + ([T2D] if T2D in missing else [])
    if missing:
        errors.append(f"missing tensors {missing}")
    extra = sorted(set(header) - set(expected))
    if extra:
        hint = " (full draft vocabulary: vLLM expects no d2t/t2d)" if {D2T, T2D} & set(extra) else ""
        errors.append(f"unexpected tensors {extra}{hint}")
    floats = set()
    for name, (shape, kind) in expected.items():
        if name not in header:
            continue
        dtype, found, _ = header[name]
        dtype = _TORCH_DTYPES.get(dtype, dtype)
        if tuple(found) != shape:
            errors.append(f"{name} has shape {list(found)}, expected {list(shape)}")
        if _dtype_kind(dtype) != kind:
            errors.append(f"{name} has dtype {dtype}, expected {kind}")
        if kind == "float":
            floats.add(dtype)
    if len(floats) > 1:
        errors.append(f"mixed float dtypes {sorted(map(str, floats))}")
    if errors:
        return errors
    if D2T in header and T2D in header:
        try:
            validate_vocab_mapping(read_tensor(header[D2T][2], D2T), read_tensor(header[T2D][2], T2D), Vd, V)
        except UserError as err:
            errors.append(str(err).rstrip("."))
    return errors + _non_finite_problems(header, [n for n, (_, kind) in expected.items() if kind == "float"])


def _non_finite_problems(header: dict[str, tuple[str, list[int], Path]], names: list[str]) -> list[str]:
    """One problem naming the tensors that hold NaN/inf (a draft whose training diverged serves garbage)."""
    bad = {name: n for name in names if (n := non_finite_count(header[name][2], name))}
    if not bad:
        return []
    shown = ", ".join(f"{name} ({n} of {math.prod(header[name][1])})" for name, n in list(bad.items())[:3])
    more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
    return [
        f"non-finite weights (NaN/inf) in {shown}{more}: the training diverged; export an earlier checkpoint or "
        "retrain (with a lower --lr)"
    ]


def find_problems(path: str | Path, config: dict | None = None) -> tuple[list[str], list[str]]:
    """`(errors, warnings)` of a speculators-format checkpoint folder against what vLLM loads (`config`: check this
    config instead of the folder's `config.json`)."""
    config_errors, tensor_errors, warnings = _problems(Path(path), config)
    return config_errors + tensor_errors, warnings


def _problems(path: Path, config: dict | None) -> tuple[list[str], list[str], list[str]]:
    """`(config.json errors, weight errors, warnings)`."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: not a checkpoint folder.")
    if config is None:
        config = read_config(path)
    if "speculators_config" not in config:
        return (
            [f"{path} is not in the speculators format (flat config): convert it with `speculators-hf export`"],
            [],
            [],
        )
    errors, warnings = _config_problems(config)
    errors += serving_problems(config) if not errors else []
    if any("transformer_layer_config" in e for e in errors):
        return errors, [], warnings
    return errors, _tensor_problems(config, tensor_header(path)), warnings


def check_checkpoint(path: str | Path, config: dict | None = None, label: str | Path | None = None) -> list[str]:
    """Raise a one-line `UserError` naming every problem that would make vLLM fail or serve the draft wrongly, by file.

    Args:
        config: check this config instead of the folder's `config.json`.
        label: the checkpoint's name in the error (default: `path`).

    Returns:
        `list[str]`: warnings (the checkpoint serves, but e.g. auto mode breaks when folders move).
    """
    path = Path(path)
    config_errors, tensor_errors, warnings = _problems(path, config)
    weights = WEIGHTS if (path / WEIGHTS).is_file() else f"{WEIGHTS} shards"
    parts = [f"{name}: " + "; ".join(errors) for name, errors in (("config.json", config_errors), (weights,
             tensor_errors)) if errors]  # fmt: skip
    if parts:
        raise UserError(f"{label or path}: " + "; ".join(parts) + ".")
    for w in warnings:
        logger.warning(w)
    return warnings
