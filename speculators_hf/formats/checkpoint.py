"""The draft checkpoint folder, as several stages read it: the weight files (one `model.safetensors`, or the shards its
index lists), the side files that travel with it, and the training record that describes how it was trained.

Training writes the folder, evaluation adds its card, export checks and carries it, push uploads it; the facts they
share live here, below every stage (`speculators_hf/formats`, layer 1).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from ..utils import UserError, atomic_path
from ..validation import bad_file, read_json, read_json_if_exists, safetensors_header

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHT_FILES = (CONFIG, WEIGHTS, WEIGHTS_INDEX)
D2T, T2D = "d2t", "t2d"  # the vocabulary mapping's tensors (draft index -> target-id offset; target id -> in draft)
TRAINING_CONFIG = "training_config.json"  # written by the trainer next to every saved draft
TRAINER_STATE = "trainer_state.json"  # written by Trainer in each checkpoint-<step>/
DATA_CONFIG = "data_config.json"  # written by datagen in its output folder
TRAINING_FILES = (TRAINING_CONFIG, TRAINER_STATE, DATA_CONFIG)
# The training objective's keys in `training_config.json` (`train --loss`, `--loss-temperature`, `--loss-eta`) and
# what a record written before they existed trained with.
LOSS_KEYS = ("loss", "loss_temperature", "loss_eta")
LOSS_BEFORE_RECORDED = {"loss": "kl", "loss_temperature": 1.0}
# Files copied along with the checkpoint when it is exported into another folder or uploaded.
SIDE_FILES = (
    "eval_card.json",
    "eval_card.md",
    "eval_grid_k.png",  # the eval grid's plots (speculators_hf.evaluation.grid.PLOT_FILES), linked from the cards
    "eval_grid_batch.png",
    "eval_grid_acceptance.png",
    TRAINING_CONFIG,
    TRAINER_STATE,
    DATA_CONFIG,
    "README.md",
    "generation_config.json",
)
# Verifier architectures whose model class in vLLM 0.32 implements `SupportsEagle3`, the interface vLLM needs to feed
# an EAGLE-3 draft (read in vllm/model_executor/models; `tests/test_families.py` checks it against the installed
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
FIX = "re-save the draft (save_pretrained) or export it again"
_CHUNK = 1 << 22  # elements read at once when scanning a tensor (16 MiB of fp32)


def vllm_serves_eagle3(verifier_architectures: list[str] | None) -> bool:
    """Whether vLLM 0.32 serves EAGLE-3 drafts for a verifier of these architectures."""
    return any(arch in VLLM_EAGLE3_VERIFIERS for arch in verifier_architectures or ())


DRAFTING = ("chain", "parallel")  # how vLLM drafts K tokens: K passes, or one pass with K-1 mask slots (P-EAGLE)
DRAFT_SAMPLE_METHODS = ("greedy", "probabilistic")  # vLLM's draft_sample_method; greedy is its default


def drafting_of(config: dict) -> str:
    """How vLLM drafts with the draft whose `config.json` is `config` when nothing says otherwise (`vllm serve
    <draft>`): "parallel" for a `peagle` draft, else "chain"."""
    return "parallel" if config.get("speculators_model_type") == "peagle" else "chain"


def speculative_config(
    config: dict,
    model: str,
    num_speculative_tokens: int,
    per_batch_size: list[list[int]] | None = None,
    drafting: str | None = None,
    draft_sample_method: str = "greedy",
) -> dict:
    """vLLM's `speculative_config` that serves the draft `model` whose `config.json` is `config`: method eagle3, and
    `parallel_drafting` for a `peagle` draft (`drafting`, default `drafting_of(config)`: "parallel", or "chain",
    which reads the same weights as a plain EAGLE-3 draft, its `mask_hidden` unread; vLLM 0.32 loads it so). A draft
    of any other type is served chained only. `per_batch_size` (`[start, end, K]` ranges) becomes
    `num_speculative_tokens_per_batch_size`, with `num_speculative_tokens` its largest K (vLLM caps every range's K
    at it); `draft_sample_method` is written only when it is not vLLM's default (greedy)."""
    own = drafting_of(config)
    drafting = drafting or own
    if drafting not in DRAFTING or draft_sample_method not in DRAFT_SAMPLE_METHODS:
        raise UserError(f"drafting {drafting!r}, draft_sample_method {draft_sample_method!r}: not what vLLM takes.")
    if drafting == "parallel" and own != "parallel":
        raise UserError(
            f"{model} is a chain draft (no mask_hidden): it is served chained only; parallel drafting needs a draft "
            "trained with --parallel-drafting."
        )
    if per_batch_size:
        num_speculative_tokens = max(k for _, _, k in per_batch_size)
    spec = {"model": model, "method": "eagle3", "num_speculative_tokens": num_speculative_tokens}
    if own == "parallel":
        spec["parallel_drafting"] = drafting == "parallel"
    if draft_sample_method != "greedy":
        spec["draft_sample_method"] = draft_sample_method
    if per_batch_size:
        spec["num_speculative_tokens_per_batch_size"] = [list(r) for r in per_batch_size]
    return spec


def read_config(path: str | Path) -> dict:
    """A checkpoint's `config.json` (a JSON object)."""
    return read_json(Path(path) / CONFIG, fix=FIX)


def weight_map(index: str | Path, fix: str = FIX) -> dict[str, str]:
    """`weight_map` of a `model.safetensors.index.json`: tensor name -> shard file name, each a plain file name in
    the index's folder (no `/`, `..` or absolute path: nothing outside the folder is read). Shards that are symlinks
    stay allowed: a hub cache snapshot links every file to `../../blobs/`."""
    mapping = read_json(index, fix=fix).get("weight_map")
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise bad_file(str(index), "has no weight_map of tensor names to shard files", fix)
    bad = sorted({v for v in mapping.values() if v in ("", ".", "..") or any(c in v for c in "/\\\x00")})
    if bad:
        raise bad_file(str(index), f"names shard {bad[0]!r}, which is not a file in its folder", fix)
    return mapping


def shard_names(folder: str | Path) -> list[str]:
    """The shard files a sharded checkpoint's index lists; [] without an index."""
    index = Path(folder) / WEIGHTS_INDEX
    return sorted(set(weight_map(index).values())) if index.is_file() else []


def weight_files(folder: str | Path) -> list[Path]:
    """`model.safetensors`, or the shards of `model.safetensors.index.json`; one line when there are none."""
    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / WEIGHTS_INDEX).is_file():
        return [folder / name for name in shard_names(folder)]
    raise UserError(f"{folder} has no {WEIGHTS}: export it with save_pretrained or `speculators-hf export`.")


def tensor_header(folder: str | Path) -> dict[str, tuple[str, list[int], Path]]:
    """name -> (safetensors dtype, shape, file) of every tensor of the checkpoint, read from the headers only."""
    out = {}
    for file in weight_files(folder):
        out |= {name: (dtype, shape, file) for name, (dtype, shape) in safetensors_header(file, fix=FIX).items()}
    return out


def read_tensor(file: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file (a small one: the vocabulary mapping)."""
    try:
        with safe_open(str(file), "pt") as f:
            return f.get_tensor(name)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own errors or a Rust panic
        raise bad_file(str(file), f"cannot read {name} (truncated or corrupt)", FIX) from err


def non_finite_count(file: Path, name: str, chunk: int = _CHUNK) -> int:
    """How many NaN/inf values tensor `name` of `file` holds, read in slices of about `chunk` elements (a large draft
    is never held in memory, let alone twice)."""
    try:
        with safe_open(str(file), "pt") as f:
            part = f.get_slice(name)
            shape = part.get_shape()
            if not shape:
                return int((~torch.isfinite(f.get_tensor(name))).sum())
            step = max(1, chunk // max(1, math.prod(shape[1:])))
            return sum(int((~torch.isfinite(part[a : a + step])).sum()) for a in range(0, shape[0], step))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own errors or a Rust panic
        raise bad_file(str(file), f"cannot read {name} (truncated or corrupt)", FIX) from err


def copy_file(source: Path, target: Path) -> None:
    """Copy one file of a checkpoint to `target` atomically (a temp name beside it, then renamed); a fault while
    writing (disk full, read-only) names `target`, not the file read."""
    with atomic_path(target) as tmp:
        try:
            shutil.copy2(source, tmp)
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(target)) from err


def _read_record(path: Path | None) -> dict | None:
    return read_json_if_exists(path, fix="rerun the stage that wrote it, or delete it") if path is not None else None


def _trainer_state_beside(checkpoint: Path) -> Path | None:
    """Trainer's state for the draft in `<save-path>/<epoch>/`: the `checkpoint-<step>/` saved at the end of that
    epoch (`epoch == <epoch> + 1`), else the run's latest checkpoint (older ones may have been rotated out)."""
    states = sorted(
        (p for p in checkpoint.parent.glob(f"checkpoint-*/{TRAINER_STATE}") if p.parent.name[11:].isdigit()),
        key=lambda p: int(p.parent.name[11:]),
    )
    if not states:
        return None
    if checkpoint.name.isdigit():
        for path in states:
            epoch = (_read_record(path) or {}).get("epoch")
            if epoch is not None and abs(epoch - (int(checkpoint.name) + 1)) < 1e-6:
                return path
    return states[-1]


def training_record(checkpoint: str | Path, data_path: str | Path | None = None) -> dict[str, Path]:
    """The files that describe how `checkpoint` was trained, by name: found in the folder itself (an exported draft
    carries them), else where a run writes them (`trainer_state.json` in the `checkpoint-*` beside an epoch draft,
    `data_config.json` in `data_path`, datagen's output folder)."""
    checkpoint = Path(checkpoint)
    found = {name: checkpoint / name for name in TRAINING_FILES if (checkpoint / name).is_file()}
    if TRAINER_STATE not in found and (state := _trainer_state_beside(checkpoint)) is not None:
        found[TRAINER_STATE] = state
    if data_path is not None:
        data_config = Path(data_path) / DATA_CONFIG if Path(data_path).is_dir() else Path(data_path)
        if not data_config.is_file():
            raise UserError(f"--data-path {data_path}: no {DATA_CONFIG} there (the folder datagen wrote).")
        found[DATA_CONFIG] = data_config
    return found


def read_training_record(files: dict[str, Path]) -> tuple[dict | None, dict | None, dict | None]:
    """`(training_config, trainer_state, data_config)` of a `training_record` (None for a file not found)."""
    return tuple(_read_record(files.get(name)) for name in TRAINING_FILES)  # type: ignore[return-value]


def training_objective(checkpoint: str | Path) -> dict | None:
    """The loss `checkpoint` was trained with (`LOSS_KEYS` of its `training_config.json`), None without a record; a
    record older than the choice of loss trained KL at temperature 1."""
    record = (
        _read_record(Path(checkpoint) / TRAINING_CONFIG) if (Path(checkpoint) / TRAINING_CONFIG).is_file() else None
    )
    if record is None:
        return None
    found = {key: record[key] for key in LOSS_KEYS if key in record}
    return found or dict(LOSS_BEFORE_RECORDED)


def served_files(folder: str | Path) -> list[str]:
    """Names of the files that make up the served checkpoint in `folder`: weights (and shards) and side files."""
    folder = Path(folder)
    names = [*WEIGHT_FILES, *shard_names(folder), *SIDE_FILES]
    return [name for name in dict.fromkeys(names) if (folder / name).is_file()]
