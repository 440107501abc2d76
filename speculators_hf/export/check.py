"""Stage 6: check (and convert) a draft checkpoint so that vLLM serves it as an EAGLE-3 draft.

    speculators-hf export --checkpoint out/checkpoint --verifier-hub-id meta-llama/Llama-3.1-8B-Instruct

`check_checkpoint` compares `config.json` and `model.safetensors` with exactly what vLLM's eagle3 speculators loader
reads (names, shapes, dtypes, config keys) and with the vocabulary mapping; vLLM itself accepts a draft without `d2t`
silently (draft index i then means target id i), so this check must. A checkpoint in the EAGLE authors' research format
(flat config, `midlayer.*`) is converted into the speculators format; `--verifier-hub-id` sets the verifier that
`vllm serve <draft>` (auto mode) serves.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .utils import UserError, get_logger, write_json
from .validation import bad_file, describe, load_safetensors, pretrained_config, read_json

logger = get_logger(__name__)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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
# Verifier architectures whose model class in vLLM 0.32 implements `SupportsEagle3`, the interface vLLM needs to feed
# an EAGLE-3 draft (read in vllm/model_executor/models; `tests/test_families_vllm.py` checks it against the installed
# vLLM). For any other verifier, vLLM stops at serve time with "Model does not support EAGLE3 interface".
VLLM_VERSION = "0.32"
VLLM_EAGLE3_VERIFIERS = frozenset(
    {
        "AfmoeForCausalLM", "ApertusForCausalLM", "Cohere2MoeForCausalLM", "DeepseekForCausalLM",
        "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Ernie4_5ForCausalLM", "Gemma4ForCausalLM",
        "GptOssForCausalLM", "GraniteForCausalLM", "GraniteSWAForCausalLM", "IQuestCoderForCausalLM",
        "InternLM3ForCausalLM", "K2HorizonForCausalLM", "LLaMAForCausalLM", "LagunaForCausalLM", "Llama4ForCausalLM",
        "LlamaForCausalLM", "MiMoForCausalLM", "MiMoV2FlashForCausalLM", "MiMoV2ForCausalLM", "MiniCPM3ForCausalLM",
        "MiniCPMForCausalLM", "MiniMaxM2ForCausalLM", "Ministral3ForCausalLM", "MistralForCausalLM",
        "MistralLarge3ForCausalLM", "NemotronHForCausalLM", "NemotronHPuzzleForCausalLM", "Phi3ForCausalLM",
        "Plamo3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM",
        "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "SarvamMLAForCausalLM", "Step1ForCausalLM",
        "TeleChat2ForCausalLM", "TeleChat3ForCausalLM", "TeleFLMForCausalLM",
        # multimodal verifiers (their language model feeds the draft)
        "Gemma4ForConditionalGeneration", "KimiK25ForConditionalGeneration", "LlavaForConditionalGeneration",
        "Llama4ForConditionalGeneration", "Mistral3ForConditionalGeneration", "PixtralForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
        "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
    }
)  # fmt: skip
# Files copied along with the checkpoint when exporting into another folder.
SIDE_FILES = (
    "eval_card.json",
    "eval_card.md",
    "eval_grid_k.png",  # the eval grid's plots (speculators_hf.evaluation.grid.PLOT_FILES), linked from the cards
    "eval_grid_batch.png",
    "eval_grid_acceptance.png",
    "training_config.json",
    "trainer_state.json",
    "data_config.json",
    "README.md",
    "generation_config.json",
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
    return out


def _dtype_kind(dtype: torch.dtype) -> str:
    return "float" if dtype in FLOAT_DTYPES else {torch.int64: "int64", torch.bool: "bool"}.get(dtype, str(dtype))


def load_checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of `model.safetensors` (or of the shards its index lists)."""
    fix = "re-save the draft (save_pretrained) or export it again"
    if (path / "model.safetensors").is_file():
        return load_safetensors(path / "model.safetensors", fix=fix)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(weight_map(index).values()))
        return {k: v for f in files for k, v in load_safetensors(path / f, fix=fix).items()}
    raise UserError(f"{path} has no model.safetensors: export it with save_pretrained or `speculators-hf export`.")


def weight_map(index: Path) -> dict[str, str]:
    """`weight_map` of a `model.safetensors.index.json`: tensor name -> shard file name (checked)."""
    fix = "re-save the draft (save_pretrained) or export it again"
    mapping = read_json(index, fix=fix).get("weight_map")
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and "/" not in v for v in mapping.values()):
        raise bad_file(str(index), "has no weight_map of tensor names to shard files", fix)
    return mapping


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
    if config.get("speculators_model_type") != "eagle3":
        errors.append(f"speculators_model_type is {config.get('speculators_model_type')!r}, vLLM needs 'eagle3'")
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
        from .modeling.configuration_eagle3 import aux_layer_ids_problem

        problem = aux_layer_ids_problem(ids, config.get("verifier_num_hidden_layers"))
        if problem:  # e.g. not ascending: vLLM would feed the draft's fc the aux states in another order
            errors.append(f"eagle_aux_hidden_state_layer_ids: {problem}")
    if "norm_before_residual" not in config:
        warnings.append("norm_before_residual is missing: vLLM assumes True")
    return errors, warnings


def vllm_serves_eagle3(verifier_architectures: list[str] | None) -> bool:
    """Whether vLLM 0.32 serves EAGLE-3 drafts for a verifier of these architectures."""
    return any(arch in VLLM_EAGLE3_VERIFIERS for arch in verifier_architectures or ())


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


def _tensor_problems(config: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    expected = expected_tensors(config)
    layer = config["transformer_layer_config"]
    V, Vd = layer["vocab_size"], config.get("draft_vocab_size") or layer["vocab_size"]
    errors = []
    missing = [n for n in expected if n not in tensors]
    if Vd != V and "d2t" in missing:
        errors.append(
            f"d2t is missing although draft_vocab_size {Vd} != vocab_size {V}: vLLM would silently read "
            "draft index i as target id i"
        )
    missing = [n for n in missing if n not in ("d2t", "t2d")] + (["t2d"] if "t2d" in missing else [])
    if missing:
        errors.append(f"missing tensors {missing}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        hint = " (full draft vocabulary: vLLM expects no d2t/t2d)" if {"d2t", "t2d"} & set(extra) else ""
        errors.append(f"unexpected tensors {extra}{hint}")
    floats = set()
    for name, (shape, kind) in expected.items():
        if name not in tensors:
            continue
        t = tensors[name]
        if tuple(t.shape) != shape:
            errors.append(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
        if _dtype_kind(t.dtype) != kind:
            errors.append(f"{name} has dtype {t.dtype}, expected {kind}")
        if kind == "float":
            floats.add(t.dtype)
    if len(floats) > 1:
        errors.append(f"mixed float dtypes {sorted(map(str, floats))}")
    if "d2t" in tensors and "t2d" in tensors and not errors:
        from .vocab import validate_vocab_mapping

        try:
            validate_vocab_mapping(tensors["d2t"], tensors["t2d"], Vd, V)
        except UserError as err:
            errors.append(str(err).rstrip("."))
    return errors


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
    return errors, _tensor_problems(config, load_checkpoint_tensors(path)), warnings


def read_config(path: str | Path) -> dict:
    """A checkpoint's `config.json` (a JSON object)."""
    return read_json(Path(path) / "config.json", fix="re-save the draft (save_pretrained) or export it again")


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
    weights = "model.safetensors" if (path / "model.safetensors").is_file() else "model.safetensors shards"
    parts = [f"{name}: " + "; ".join(errors) for name, errors in (("config.json", config_errors), (weights,
             tensor_errors)) if errors]  # fmt: skip
    if parts:
        raise UserError(f"{label or path}: " + "; ".join(parts) + ".")
    for w in warnings:
        logger.warning(w)
    return warnings


# ---------------------------------------------------------------------------------------------------- convert


def set_verifier_name(path: str | Path, name_or_path: str) -> None:
    """Record the verifier that `vllm serve <draft>` serves (`speculators_config.verifier.name_or_path`)."""
    write_json(Path(path) / "config.json", with_verifier_name(read_config(path), name_or_path))


def with_verifier_name(config: dict, name_or_path: str) -> dict:
    """`config` with `speculators_config.verifier.name_or_path` set."""
    config = json.loads(json.dumps(config))
    spec = config.setdefault("speculators_config", {})
    if isinstance(spec, dict) and isinstance(spec.setdefault("verifier", {}), dict):
        spec["verifier"]["name_or_path"] = name_or_path
    return config


def convert_research_checkpoint(
    path: str | Path, output_dir: str | Path, verifier: str | None = None, aux_layer_ids: list[int] | None = None
) -> Path:
    """EAGLE authors' research checkpoint (flat config, `midlayer.*`) -> speculators format in `output_dir`.

    The tensors are read by `Eagle3DraftModel.from_pretrained` (its `key_mapping` renames `midlayer.*`); this adds
    what the research config lacks.

    Args:
        verifier: hub id or folder of the verifier: its layer count gives the default aux ids `[2, n//2, n-3]`, its
            `max_position_embeddings` replaces a smaller one (which would clip RoPE in vLLM), and its embedding fills
            a missing `embed_tokens.weight`. Recorded as the verifier unless the config names one.
        aux_layer_ids: explicit aux ids (vLLM convention) instead of the verifier's default.
    """
    from .modeling import Eagle3Config, Eagle3DraftModel, default_aux_layer_ids

    path = Path(path)
    flat = read_config(path)
    for key in ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map"):
        flat.pop(key, None)
    vconf = pretrained_config(verifier, "--verifier").get_text_config() if verifier else None
    n = vconf.num_hidden_layers if vconf is not None else flat.get("verifier_num_hidden_layers")
    ids = aux_layer_ids or flat.get("eagle_aux_hidden_state_layer_ids") or (default_aux_layer_ids(n) if n else None)
    if ids is None:
        raise UserError(
            f"{path}: no aux layer ids in the config; pass --verifier (for [2, n//2, n-3]) or --aux-layer-ids."
        )
    if vconf is not None and flat.get("max_position_embeddings", 0) < vconf.max_position_embeddings:
        logger.warning(
            "Raising max_position_embeddings %s to the verifier's %d (vLLM would clip RoPE).",
            flat.get("max_position_embeddings"),
            vconf.max_position_embeddings,
        )
        flat["max_position_embeddings"] = vconf.max_position_embeddings
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
        raise bad_file(str(path / "config.json"), f"is not a draft config ({describe(err)})") from err
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
        from .modeling.verifier_weights import load_verifier_tensors

        embed = load_verifier_tensors(verifier, pretrained_config(verifier, "--verifier"), roles=("embed_tokens",))
        with torch.no_grad():
            model.embed_tokens.weight.copy_(embed["embed_tokens"])
    model.save_pretrained(output_dir)
    return Path(output_dir)


def export_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path | None = None,
    verifier_hub_id: str | None = None,
    verifier: str | None = None,
    aux_layer_ids: list[int] | None = None,
) -> tuple[Path, list[str]]:
    """Convert when needed, record the verifier id, check. Returns `(served folder, warnings)`.

    Nothing is written unless the result passes the checks: a new folder is built beside `output_dir` and moved into
    place at the end; in place, only `config.json` changes (with `--verifier-hub-id`), after the check."""
    from .modeling.research_format import is_research_checkpoint

    src = Path(checkpoint)
    if not (src / "config.json").is_file():
        raise UserError(f"--checkpoint {src} has no config.json.")
    config = read_config(src)
    if is_research_checkpoint(src):
        out = Path(output_dir) if output_dir else src.with_name(src.name + "-speculators")
        with _staged(out) as tmp:
            convert_research_checkpoint(src, tmp, verifier=verifier or verifier_hub_id, aux_layer_ids=aux_layer_ids)
            if verifier_hub_id:
                set_verifier_name(tmp, verifier_hub_id)
            warnings = check_checkpoint(tmp, label=f"--checkpoint {src}")
        return out, warnings
    if output_dir and Path(output_dir).resolve() != src.resolve():
        refused = serving_problems(config)
        if refused:  # before writing anything: a draft vLLM would refuse is not exported
            raise UserError(f"{src}: " + "; ".join(refused) + ".")
        out = Path(output_dir)
        index = src / "model.safetensors.index.json"
        shards = sorted(set(weight_map(index).values())) if index.is_file() else []
        with _staged(out) as tmp:
            for name in ("config.json", "model.safetensors", "model.safetensors.index.json", *SIDE_FILES, *shards):
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
            from .hub import training_record  # Trainer's state sits beside an epoch draft: carry it for the card

            for name, found in training_record(src).items():
                shutil.copy2(found, tmp / name)
            if verifier_hub_id:
                set_verifier_name(tmp, verifier_hub_id)
            warnings = check_checkpoint(tmp, label=f"--checkpoint {src}")
        return out, warnings
    if verifier_hub_id:  # in place: check the edited config before writing it
        edited = with_verifier_name(config, verifier_hub_id)
        warnings = check_checkpoint(src, edited)
        write_json(src / "config.json", edited)
        return src, warnings
    return src, check_checkpoint(src)


@contextmanager
def _staged(out: Path):
    """A fresh folder beside `out`; on success its files move into `out` (created if needed), else it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".exporting"))
    try:
        yield tmp
        out.mkdir(exist_ok=True)
        for file in tmp.iterdir():
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------ CLI


@dataclass
class ExportArguments:
    """Check a draft checkpoint against what vLLM's EAGLE-3 loader reads; convert research checkpoints."""

    checkpoint: str = field(metadata={"help": "Draft checkpoint folder (speculators or EAGLE research format)."})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Write the served checkpoint here (default: in place; `<checkpoint>-speculators` for a "
            "research checkpoint)."
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
        default=None, metadata={"help": "Aux layer ids for a research checkpoint (default [2, n//2, n-3])."}
    )


def run(args: ExportArguments) -> Path:
    out, warnings = export_checkpoint(
        args.checkpoint, args.output_dir, args.verifier_hub_id, args.verifier, args.aux_layer_ids
    )
    config = read_config(out)
    print(
        f"OK {out}: vLLM-servable EAGLE-3 draft for {config['speculators_config']['verifier']['name_or_path']}"
        f" (draft vocab {config['draft_vocab_size']}, aux ids {config['eagle_aux_hidden_state_layer_ids']})"
    )
    for w in warnings:
        print(f"warning: {w}")
    return out


def main(argv: list[str] | None = None) -> int:
    from .cli.parser import run_command

    return run_command(ExportArguments, run, argv, prog="speculators-hf export")


if __name__ == "__main__":
    raise SystemExit(main())
