"""A published EAGLE-3 draft read back to continue training it (`train --from-pretrained DRAFT`).

Three layouts, one reader:

- ours: a `train` epoch draft (`<save-path>/<epoch>/`) or an `export` folder (speculators format, `d2t`/`t2d`);
- vllm-project/speculators' (the same speculators format, written by its classes: extra keys such as
  `embed_requires_grad`, an `auto_map` we never run, aux ids that may be null, no `verifier_num_hidden_layers`);
- the EAGLE authors' research layout (`research_format`: flat config, layer 0 named `midlayer.*`, `pytorch_model.bin`
  read with `weights_only=True` or safetensors, usually no `embed_tokens.weight`, no aux ids).

`pretrained_draft_config` turns any of them into a complete `Eagle3Config` for a given verifier (aux ids the draft
records, else `[2, n//2, n-3]` as the authors hard-code; the verifier's name, layer count, `max_position_embeddings`)
without reading a weight; `checkpoint_shapes` reads the tensors' names and shapes from the headers;
`load_pretrained_draft` loads the weights (a missing embedding is the verifier's, as vLLM shares it). What must agree
with new data is checked by the caller (`training.setup`) between the first and the last, before a weight is read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from huggingface_hub import snapshot_download

from ..formats.checkpoint import CONFIG, WEIGHTS, WEIGHTS_INDEX, weight_map
from ..utils import UserError, get_logger
from ..validation import bad_file, describe, read_json, safetensors_header, torch_load
from .configuration_eagle3 import Eagle3Config, default_aux_layer_ids, flatten_config_dict
from .modeling_eagle3 import Eagle3DraftModel
from .research_format import is_research_checkpoint
from .verifier_weights import load_verifier_tensors

logger = get_logger(__name__)

LAYOUTS = ("speculators_hf", "speculators", "research")  # ours, vllm-project/speculators', the EAGLE authors'
PYTORCH_WEIGHTS = "pytorch_model.bin"
# Tensors a published draft may carry that we do not keep: speculators' frozen verifier head (older versions saved it)
IGNORED_TENSORS = ("verifier_lm_head.weight", "verifier_norm.weight")
FIX = "pass a draft folder written by `speculators-hf train`/`export`, speculators, or the EAGLE authors' code"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_FILES = [CONFIG, WEIGHTS, WEIGHTS_INDEX, "model-*.safetensors", PYTORCH_WEIGHTS]


def resolve_draft_folder(path_or_id: str, label: str = "--from-pretrained") -> Path:
    """A local draft folder, or a hub id's snapshot (config and weights only; from the local cache when offline)."""
    path = Path(path_or_id)
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise UserError(f"{label} {path_or_id} has no {CONFIG}: not a draft folder ({FIX}).")
        return path
    if path.exists():
        raise UserError(f"{label} {path_or_id} is a file; expected a draft folder ({FIX}).")
    if not HUB_ID.fullmatch(str(path_or_id)):
        raise UserError(f"{label} {path_or_id} does not exist (a draft folder or a hub id org/name).")
    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=HUB_FILES))
    except Exception as err:  # noqa: BLE001 - not on the hub, not cached while offline, no network: one line
        raise UserError(
            f"{label} {path_or_id} is not a local folder and cannot be fetched from the hub ({describe(err, 100)})."
        ) from err


def draft_layout(folder: Path) -> str:
    """`research` (flat config or `midlayer.*`), `speculators` (written by vllm-project/speculators) or ours."""
    if is_research_checkpoint(folder):
        return "research"
    raw = read_json(folder / CONFIG, fix=FIX)
    return "speculators" if "speculators_version" in raw or "embed_requires_grad" in raw else "speculators_hf"


def recorded_fields(folder: Path) -> dict:
    """The draft's config as flat `Eagle3Config` fields, as recorded (nothing filled in) but for
    `norm_before_residual`, which `flatten_config_dict` fills as vLLM reads each layout (flat: False, the authors'
    layer; speculators: True)."""
    flat = flatten_config_dict(read_json(folder / CONFIG, fix=FIX))
    for key in ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map"):
        flat.pop(key, None)  # ours are set again; `auto_map` names code we never run
    for key in ("embed_requires_grad", "speculators_version", "_name_or_path"):
        flat.pop(key, None)  # speculators' training choices: ours come from the flags
    return flat


def pretrained_draft_config(folder: Path, verifier_config, verifier_name: str, **overrides) -> Eagle3Config:
    """The draft's complete config for this verifier: aux ids as recorded (else the authors' `[2, n//2, n-3]`),
    the verifier's name, architectures and layer count, its `max_position_embeddings` where the draft's is smaller
    (vLLM would clip RoPE), then `overrides` (training choices such as `train_lm_head`)."""
    text = verifier_config.get_text_config()
    n = text.num_hidden_layers
    flat = recorded_fields(folder)
    if not flat.get("eagle_aux_hidden_state_layer_ids"):
        flat["eagle_aux_hidden_state_layer_ids"] = default_aux_layer_ids(n)
    if flat.get("max_position_embeddings", 0) < text.max_position_embeddings:
        logger.warning(
            "--from-pretrained: raising the draft's max_position_embeddings %s to the verifier's %d (vLLM would clip "
            "RoPE).",
            flat.get("max_position_embeddings"),
            text.max_position_embeddings,
        )
        flat["max_position_embeddings"] = text.max_position_embeddings
    flat.update(
        verifier_num_hidden_layers=n,
        verifier_name_or_path=verifier_name,
        verifier_architectures=list(getattr(verifier_config, "architectures", None) or []),
        architectures=["Eagle3DraftModel"],
        tie_word_embeddings=False,
        **overrides,
    )
    try:
        return Eagle3Config(**flat)
    except UserError:
        raise
    except (TypeError, ValueError) as err:  # a field of the wrong type or value
        raise bad_file(str(folder / CONFIG), f"is not a draft config ({describe(err)})", FIX) from err


def checkpoint_shapes(folder: Path) -> dict[str, list[int]]:
    """`{tensor name: shape}` of a draft folder's weights (safetensors headers, or a `.bin` read with
    `weights_only=True`), research names (`midlayer.*`) as ours (`layers.0.*`)."""
    if (folder / WEIGHTS).is_file():
        shapes = {k: shape for k, (_, shape) in safetensors_header(folder / WEIGHTS, fix=FIX).items()}
    elif (folder / WEIGHTS_INDEX).is_file():
        shapes = {}
        for shard in sorted(set(weight_map(folder / WEIGHTS_INDEX, fix=FIX).values())):
            shapes |= {k: shape for k, (_, shape) in safetensors_header(folder / shard, fix=FIX).items()}
    elif (folder / PYTORCH_WEIGHTS).is_file():
        state = torch_load(folder / PYTORCH_WEIGHTS, fix=FIX)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise bad_file(str(folder / PYTORCH_WEIGHTS), "is not a state dict of tensors", FIX)
        shapes = {k: list(v.shape) for k, v in state.items()}
    else:
        raise UserError(f"--from-pretrained {folder} has no {WEIGHTS} or {PYTORCH_WEIGHTS} ({FIX}).")
    return {re.sub(r"^midlayer\.", "layers.0.", k): v for k, v in shapes.items()}


def expected_shapes(config: Eagle3Config) -> dict[str, list[int]]:
    """`{tensor name: shape}` a draft of this config saves (built on the meta device: no memory)."""
    with torch.device("meta"):
        skeleton = Eagle3DraftModel(config)
    return {k: list(v.shape) for k, v in skeleton.state_dict().items()}


def shape_problem(config: Eagle3Config, shapes: dict[str, list[int]]) -> str | None:
    """Where the weights do not fit the config (a tensor of another shape, one missing, one the config has no place
    for), or None. Only the embedding may be missing (the verifier's is used), unless the draft is narrower than the
    verifier."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name in shapes and shapes[name] != shape:
            return f"{name} has shape {shapes[name]}, its config.json says {shape}"
    narrow = config.target_hidden_size not in (None, config.hidden_size)  # its own embedding: none to share
    missing = sorted(set(expected) - set(shapes) - (set() if narrow else {"embed_tokens.weight"}))
    if missing:
        return f"has no tensor {missing[0]}" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = sorted(set(shapes) - set(expected) - set(IGNORED_TENSORS))
    if extra:
        return f"holds {extra[0]}, which its config.json has no place for" + (
            f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        )
    return None


def load_pretrained_draft(
    folder: Path, config: Eagle3Config, verifier_path: str, verifier_config
) -> tuple[Eagle3DraftModel, bool]:
    """The draft's weights under `config` (checked first with `shape_problem`). Returns `(draft, embedding taken
    from the verifier)`: a draft without `embed_tokens.weight` gets the verifier's, as vLLM shares it."""
    model, info = Eagle3DraftModel.from_pretrained(
        folder,
        config=config,
        output_loading_info=True,
        missing_ok=["embed_tokens.weight"],
        weights_only=True,
        dtype=torch.float32,  # fp32 master weights, whatever the published dtype (often bf16)
    )
    shared = "embed_tokens.weight" in info["missing_keys"]
    if shared:
        embed = load_verifier_tensors(verifier_path, verifier_config, roles=("embed_tokens",))["embed_tokens"]
        with torch.no_grad():
            model.embed_tokens.weight.copy_(embed)
    return model, shared


__all__ = [
    "LAYOUTS",
    "checkpoint_shapes",
    "draft_layout",
    "load_pretrained_draft",
    "pretrained_draft_config",
    "recorded_fields",
    "resolve_draft_folder",
    "shape_problem",
]
