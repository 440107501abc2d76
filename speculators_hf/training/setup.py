"""Everything checked and built before training starts: datasets, vocabulary mapping, the draft.

All input problems surface here as one-line `UserError`s, before any training step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import set_seed

from ..formats.shards import ShardDataset
from ..modeling import Eagle3DraftModel
from ..modeling.configuration_eagle3 import aux_layer_ids_problem, default_aux_layer_ids
from ..modeling.pretrained import (
    checkpoint_shapes,
    draft_layout,
    load_pretrained_draft,
    pretrained_draft_config,
    recorded_fields,
    resolve_draft_folder,
    shape_problem,
)
from ..modeling.verifier_weights import recorded_verifier_name
from ..online.client import HiddenStatesClient
from ..online.dataset import OnlineHiddenStatesDataset
from ..runstate import STATE_DIR, read_manifest
from ..utils import UserError, get_logger
from ..validation import pretrained_config, read_json_if_exists
from ..vocab import load_token_freq, load_vocab_mapping, validate_vocab_mapping
from .arguments import Eagle3ModelArguments, Eagle3TrainingArguments
from .data import SHARDS_DATA_FORMAT, PackedDataset, data_layer_ids, detect_format, open_dataset, train_eval_split

HYBRID_CACHE = "hidden_states_cache"  # hybrid mode's default cache: <save-path>/hidden_states_cache

logger = get_logger(__name__)


def resolve_vocab_mapping(model_args: Eagle3ModelArguments) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(d2t, t2d)` from the flags, else `<data-path>/{d2t,t2d}.npy`, else None (full vocabulary). Never the working
    directory: a `d2t.npy` left there by another run must not pick the vocabulary silently."""
    if model_args.d2t_path is not None:
        t2d_path = model_args.t2d_path or str(Path(model_args.d2t_path).with_name("t2d.npy"))
        return load_vocab_mapping(model_args.d2t_path, t2d_path)
    if model_args.t2d_path is not None:
        raise UserError("--t2d-path needs --d2t-path too.")
    folder = Path(model_args.data_path)
    if (folder / "d2t.npy").exists() and (folder / "t2d.npy").exists():
        return load_vocab_mapping(folder / "d2t.npy", folder / "t2d.npy", flags=(None, None))
    logger.warning(
        "No d2t.npy/t2d.npy in --data-path %s (and no --d2t-path): the draft predicts over the full verifier "
        "vocabulary.",
        folder,
    )
    return None


def _check_hidden_size(dataset, model_args: Eagle3ModelArguments, verifier_config) -> None:
    hidden = dataset.hidden_shape[1]  # (L, H)
    text = verifier_config.get_text_config()
    if hidden != text.hidden_size:
        raise UserError(
            f"--data-path {model_args.data_path}: hidden states have size {hidden} but verifier "
            f"{model_args.verifier_name_or_path} has hidden_size {text.hidden_size}: the data came from another model."
        )


def _check_data(dataset, model_args: Eagle3ModelArguments, verifier_config, aux_ids: list[int]) -> None:
    text = verifier_config.get_text_config()
    num_layers = dataset.hidden_shape[0]  # (L, H)
    if num_layers != len(aux_ids) + 1:
        raise UserError(
            f"--data-path {model_args.data_path}: {num_layers} hidden-state layers per token, expected "
            f"{len(aux_ids) + 1} (aux layers {aux_ids} + the last layer)."
        )
    tokens = getattr(dataset, "token_dataset", dataset)  # online data: check the tokens without fetching states
    max_id = max(int(tokens[i]["input_ids"].max()) for i in range(min(len(tokens), 16)))
    if max_id >= text.vocab_size:
        raise UserError(
            f"--data-path {model_args.data_path}: token id {max_id} >= the verifier's vocabulary ({text.vocab_size})."
        )


def resolve_aux_layer_ids(model_args: Eagle3ModelArguments, layer_ids: list[int] | None, n: int) -> list[int]:
    """The aux ids the draft fuses: those recorded with the data (`--aux-layer-ids`, if given, must equal them).

    Data that records no ids needs `--aux-layer-ids`: a guessed default could be one layer off. Ids are ascending
    (`aux_layer_ids_problem`: the order vLLM fuses them in).
    """
    flag, where = model_args.aux_layer_ids, f"--data-path {model_args.data_path}"
    if layer_ids is None:
        if not flag:
            raise UserError(
                f"{where} records no layer ids (no data_config.json or index.json with layer_ids): pass "
                f"--aux-layer-ids in vLLM's convention (id i = input to layer i; default [2, n//2, n-3] = "
                f"{default_aux_layer_ids(n)}; speculators 0.3.0 data: its ids + 1)."
            )
        problem = aux_layer_ids_problem(flag, n)
        if problem:
            raise UserError(f"--aux-layer-ids: {problem}.")
        return list(flag)
    if layer_ids[-1] != n:
        raise UserError(
            f"{where}: datagen's last layer id is {layer_ids[-1]}, but the verifier has {n} layers (expected {n})."
        )
    recorded = layer_ids[:-1]
    problem = aux_layer_ids_problem(recorded, n)
    if problem:
        raise UserError(f"{where} was written with {problem}; regenerate it with this version of datagen.")
    if flag and list(flag) != recorded:
        raise UserError(
            f"--aux-layer-ids {list(flag)} differs from the aux ids {recorded} the data was generated with "
            f"({where}, vLLM convention): drop the flag, or regenerate the data with --layer-ids {list(flag) + [n]}."
        )
    return recorded


def require_complete_data(path: Path, allow: bool) -> None:
    """Refuse the output of a datagen run that did not finish (its run manifest, `index.json` or `data_config.json`
    says so) unless `--allow-incomplete-data`; folders that record nothing (the seed's `.pt` files) are taken as they
    are."""
    fix = "rerun datagen with the same flags to finish it, or pass --allow-incomplete-data to train on what exists"
    manifest = read_manifest(path, "datagen") if (path / STATE_DIR).is_dir() else None
    index = read_json_if_exists(path / "index.json", fix="rerun datagen with the same flags") or {}
    config = read_json_if_exists(path / "data_config.json", fix="rerun datagen with the same flags") or {}
    if manifest is not None and manifest.get("status") != "complete":
        why = "its run did not finish (.speculators_hf/datagen.json)"
    elif index.get("complete") is False:
        planned = index.get("num_shards_planned")
        why = f"index.json lists {len(index.get('shards') or [])} of {planned} shards" if planned else "index.json"
        why += " (datagen did not finish)"
    elif config.get("status") not in (None, "complete"):
        why = f"data_config.json says status {config.get('status')!r} (datagen did not finish)"
    else:
        return
    if allow:
        logger.warning("--data-path %s: %s; training on what exists (--allow-incomplete-data).", path, why)
        return
    raise UserError(f"--data-path {path}: {why}; {fix}.")


def build_datasets(
    model_args: Eagle3ModelArguments, args: Eagle3TrainingArguments
) -> tuple[PackedDataset, PackedDataset | None, list[int] | None]:
    """Open, check, split and pack the data. Returns `(train, held_out or None, layer ids recorded by datagen)`."""
    path = Path(model_args.data_path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise UserError(f"--data-path {path} {what} (a datagen output folder: run `speculators-hf datagen` first).")
    require_complete_data(path, model_args.allow_incomplete_data)
    version = model_args.data_format_version if model_args.data_format_version is not None else detect_format(path)
    if model_args.hidden_states_source != "offline":  # states streamed from serve-hidden-states servers
        dataset = open_online_dataset(path, version, model_args, args)
    else:
        dataset = open_dataset(path, version, dequantize=False)  # fp8 shards: the trainer dequantizes on its device
    if len(dataset) == 0:
        raise UserError(f"--data-path {path} holds no samples.")
    if getattr(dataset, "tokens_only", False):
        raise UserError(
            f"--data-path {path} holds tokens only (datagen --tokens-only): train with --hidden-states-source online "
            "or hybrid and --hidden-states-servers URL (speculators-hf serve-hidden-states)."
        )
    train_idx, eval_idx = train_eval_split(len(dataset), args.eval_split, args.data_seed or 0)
    train = PackedDataset(dataset, train_idx, args.total_seq_len)
    held_out = PackedDataset(dataset, eval_idx, args.total_seq_len) if eval_idx else None
    return train, held_out, data_layer_ids(path, version)


def open_online_dataset(
    data_path: Path, version: int, model_args: Eagle3ModelArguments, args
) -> OnlineHiddenStatesDataset:
    """The online/hybrid dataset for `--hidden-states-source online|hybrid` (checked first).

    Reads and checks the local files (shards, data_config.json, a hybrid cache given by --hidden-states-cache-dir)
    before it waits (up to `--hidden-states-timeout`) until a server answers, and gives the DataLoader 2 persistent
    workers when none were asked for, so fetching runs ahead of the training step. The default hybrid cache, inside
    `--save-path`, is attached once the run has claimed that folder (`attach_hybrid_cache`).
    """
    source = model_args.hidden_states_source
    if version != SHARDS_DATA_FORMAT:
        raise UserError(f"--hidden-states-source {source} reads datagen shards (format 2).")
    layer_ids = data_layer_ids(data_path, version)
    if not layer_ids:
        raise UserError(
            f"--data-path {data_path} records no layer ids (data_config.json): rerun datagen --tokens-only."
        )
    verifier = pretrained_config(
        model_args.verifier_name_or_path, "--verifier-name-or-path", trust_remote_code=model_args.trust_remote_code
    )
    hidden_size = verifier.get_text_config().hidden_size
    if args.dataloader_num_workers == 0:
        args.dataloader_num_workers, args.dataloader_persistent_workers = 2, True
        logger.warning("online hidden states: 2 persistent DataLoader workers fetch ahead of the training step.")
    dataset = OnlineHiddenStatesDataset(
        ShardDataset(data_path, tokens_only=True),
        model_args.hidden_states_servers,
        layer_ids,
        hidden_size,
        max_in_flight=model_args.hidden_states_max_in_flight,
        num_workers=args.dataloader_num_workers,
        timeout=model_args.hidden_states_timeout,
        rank=args.process_index,
        api_key=model_args.hidden_states_api_key,
    )
    if source == "hybrid" and model_args.hidden_states_cache_dir:
        dataset.use_cache(model_args.hidden_states_cache_dir, hybrid_cache_meta(data_path, dataset))
    servers, key = model_args.hidden_states_servers, model_args.hidden_states_api_key
    HiddenStatesClient(servers, timeout=model_args.hidden_states_timeout, api_key=key).wait_for_servers()
    return dataset


def hybrid_cache_meta(data_path: Path, dataset: OnlineHiddenStatesDataset) -> dict:
    """What a hybrid cache must match: the data's fingerprint, layer ids and hidden size."""
    fingerprint = None
    for name in ("data_config.json", "index.json"):
        record = read_json_if_exists(data_path / name, fix="rerun datagen with the same flags")
        if record is not None:
            fingerprint = record.get("fingerprint")
            break
    return {"data_fingerprint": fingerprint, "layer_ids": dataset.layer_ids, "hidden_size": dataset.hidden_shape[1]}


def attach_hybrid_cache(model_args: Eagle3ModelArguments, dataset, run) -> None:
    """Hybrid mode without --hidden-states-cache-dir: the cache is `<save-path>/hidden_states_cache`, an entry of the
    run (attached after the claim, which may have deleted an earlier run's)."""
    if model_args.hidden_states_source == "hybrid" and not model_args.hidden_states_cache_dir:
        folder = run.path(HYBRID_CACHE)
        folder.mkdir(exist_ok=True)  # an entry of the run from now on (a finished run holds every entry)
        dataset.use_cache(folder, hybrid_cache_meta(Path(model_args.data_path), dataset))


def mask_token_id(model_args: Eagle3ModelArguments, verifier_config) -> int:
    """`--mask-token-id`, else the verifier's pad id, else its (first) EOS id: the mask slots' token (its embedding is
    the verifier's, frozen; `mask_hidden` and the positions tell the slots apart, so any id serves)."""
    text = verifier_config.get_text_config()
    vocab = text.vocab_size
    if model_args.mask_token_id is not None:
        if not 0 <= model_args.mask_token_id < vocab:
            raise UserError(f"--mask-token-id {model_args.mask_token_id}: expected an id in [0, {vocab}).")
        return model_args.mask_token_id
    for candidate in (getattr(text, "pad_token_id", None), getattr(text, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if isinstance(candidate, int) and 0 <= candidate < vocab:
            return candidate
    raise UserError("The verifier's config names no pad or EOS token id: pass --mask-token-id.")


def build_draft(
    model_args: Eagle3ModelArguments,
    train_dataset: PackedDataset,
    layer_ids: list[int] | None = None,
    seed: int = 42,
    ttt_steps: int | None = None,
) -> Eagle3DraftModel:
    """A new draft for the verifier (initialised with `seed`), checked against the data; flex attention on CUDA,
    sdpa elsewhere. A parallel draft is served with the `ttt_steps` tokens it was trained to propose."""
    verifier_config = pretrained_config(
        model_args.verifier_name_or_path, "--verifier-name-or-path", trust_remote_code=model_args.trust_remote_code
    )
    n = verifier_config.get_text_config().num_hidden_layers
    _check_hidden_size(train_dataset.dataset, model_args, verifier_config)
    aux_ids = resolve_aux_layer_ids(model_args, layer_ids, n)
    _check_data(train_dataset.dataset, model_args, verifier_config, aux_ids)
    if model_args.from_pretrained:
        model = warm_start_draft(model_args, verifier_config, aux_ids)
        model.set_attn_implementation("flex_attention" if torch.cuda.is_available() else "sdpa")
        return model
    mapping = resolve_vocab_mapping(model_args)
    if mapping is not None:
        validate_vocab_mapping(*mapping, len(mapping[0]), verifier_config.get_text_config().vocab_size)
    d2t, t2d = mapping if mapping is not None else (None, None)
    parallel = {}
    if model_args.parallel_drafting:
        parallel = dict(parallel_drafting=True, mask_token_id=mask_token_id(model_args, verifier_config))
        if ttt_steps is not None:  # its mask slots beyond the trained ones would be untrained
            parallel["speculative_tokens"] = ttt_steps
    set_seed(seed)
    shape = dict(
        hidden_size=model_args.draft_hidden_size,
        intermediate_size=model_args.draft_intermediate_size,
        sliding_window=model_args.draft_sliding_window,
    )
    model = Eagle3DraftModel.from_verifier(
        model_args.verifier_name_or_path,
        d2t,
        t2d,
        hub_id=model_args.verifier_hub_id,
        num_hidden_layers=model_args.num_layers,
        aux_layer_ids=aux_ids,
        norm_before_fc=model_args.norm_before_fc,
        norm_output=model_args.norm_output,
        fc_norm=model_args.fc_norm,
        draft_layer_type=model_args.draft_layer_type,
        train_lm_head=model_args.train_lm_head,
        trust_remote_code=model_args.trust_remote_code,
        **{k: v for k, v in shape.items() if v is not None},
        **parallel,
    )
    model.set_attn_implementation("flex_attention" if torch.cuda.is_available() else "sdpa")
    return model


# ------------------------------------------------------------------------------------------------- warm start

# Shape flags and the config fields they set: at their defaults they follow the pretrained draft, else must equal it
SHAPE_FLAGS = {
    "num_layers": ("--num-layers", "num_hidden_layers"),
    "draft_hidden_size": ("--draft-hidden-size", "hidden_size"),
    "draft_intermediate_size": ("--draft-intermediate-size", "intermediate_size"),
    "draft_sliding_window": ("--draft-sliding-window", "sliding_window"),
    "draft_layer_type": ("--draft-layer-type", "draft_layer_type"),
    "norm_before_fc": ("--norm-before-fc", "norm_before_fc"),
    "fc_norm": ("--fc-norm", "fc_norm"),
    "norm_output": ("--norm-output", "norm_output"),
}


def warm_start_draft(model_args: Eagle3ModelArguments, verifier_config, aux_ids: list[int]) -> Eagle3DraftModel:
    """The published draft `--from-pretrained` names, checked against the verifier, the data and the flags (one line
    each, before a weight is read), with its own vocabulary mapping (`_check_warm_start_vocab`) and the verifier's
    head for targets."""
    label = f"--from-pretrained {model_args.from_pretrained}"
    folder = resolve_draft_folder(model_args.from_pretrained)
    layout = draft_layout(folder)
    text = verifier_config.get_text_config()
    verifier, n = model_args.verifier_name_or_path, text.num_hidden_layers
    recorded = recorded_fields(folder)
    width = recorded.get("target_hidden_size") or recorded.get("hidden_size")
    if width != text.hidden_size:
        raise UserError(
            f"{label} reads verifier hidden states of size {width}; verifier {verifier} has hidden_size "
            f"{text.hidden_size}: the draft was trained for another verifier."
        )
    if recorded.get("vocab_size") != text.vocab_size:
        raise UserError(
            f"{label} has a verifier vocabulary of {recorded.get('vocab_size')} tokens; verifier {verifier} has "
            f"{text.vocab_size}: the draft was trained for another tokenizer."
        )
    draft_ids = list(recorded.get("eagle_aux_hidden_state_layer_ids") or default_aux_layer_ids(n))
    if draft_ids != list(aux_ids):
        how = "recorded in its config" if recorded.get("eagle_aux_hidden_state_layer_ids") else "[2, n//2, n-3]"
        raise UserError(
            f"{label} fuses aux layers {draft_ids} ({how}); --data-path {model_args.data_path} holds aux layers "
            f"{list(aux_ids)}: regenerate the data with datagen --layer-ids {draft_ids + [n]}."
        )
    name = model_args.verifier_hub_id or recorded_verifier_name(verifier)
    config = pretrained_draft_config(folder, verifier_config, name, train_lm_head=model_args.train_lm_head)
    defaults = {f.name: f.default for f in dataclasses.fields(Eagle3ModelArguments)}
    for arg, (flag, key) in SHAPE_FLAGS.items():
        value = getattr(model_args, arg)
        if value != defaults[arg] and value != getattr(config, key):
            raise UserError(
                f"{flag} {value}: {label} has {key} {getattr(config, key)} (its weights fix its shape); drop the flag."
            )
    problem = shape_problem(config, checkpoint_shapes(folder))
    if problem:
        raise UserError(f"{label}: the draft's weights do not fit its config: {problem}.")
    model, shared = load_pretrained_draft(folder, config, verifier, verifier_config)
    _check_warm_start_vocab(model, model_args, label)
    model.load_verifier_head(verifier, trust_remote_code=model_args.trust_remote_code)
    Vd = config.draft_vocab_size
    logger.warning(
        "Warm start from %s (%s layout): %d layer(s), hidden %d, draft vocabulary %d, aux layers %s%s.",
        folder,
        layout,
        config.num_hidden_layers,
        config.hidden_size,
        Vd,
        draft_ids,
        "; embedding from the verifier (the draft has none)" if shared else "",
    )
    return model


def _target_ids(d2t: torch.Tensor | None, vocab_size: int) -> set[int]:
    """The verifier ids of a draft vocabulary (`j + d2t[j]`; all of them without a mapping)."""
    if d2t is None:
        return set(range(vocab_size))
    return set((torch.arange(len(d2t)) + d2t.cpu().long()).tolist())


def _check_warm_start_vocab(model: Eagle3DraftModel, model_args: Eagle3ModelArguments, label: str) -> None:
    """A pretrained draft keeps its own vocabulary mapping: its lm_head rows are tied to it. A mapping given with
    --d2t-path that differs is refused; the vocab stage's in --data-path that differs is not used (one warning line,
    with how much of the data's assistant tokens each one holds when datagen's token_freq.pt is there)."""
    V, Vd = model.config.vocab_size, model.config.draft_vocab_size
    if model.d2t is not None:
        try:
            validate_vocab_mapping(model.d2t, model.t2d, Vd, V)
        except UserError as err:
            raise UserError(f"{label}: {err}") from err
    folder = Path(model_args.data_path)
    explicit = model_args.d2t_path is not None or model_args.t2d_path is not None
    if explicit:
        mapping = resolve_vocab_mapping(model_args)
    elif (folder / "d2t.npy").exists() and (folder / "t2d.npy").exists():
        mapping = load_vocab_mapping(folder / "d2t.npy", folder / "t2d.npy", flags=(None, None))
    else:
        return
    ours, theirs = _target_ids(model.d2t, V), _target_ids(mapping[0], V)
    if ours == theirs:
        return
    common = len(ours & theirs)
    if explicit:
        raise UserError(
            f"--d2t-path {model_args.d2t_path}: a draft vocabulary of {len(theirs)} ids, {common} of them in the "
            f"{Vd} of {label} (its lm_head rows are tied to its own mapping): drop --d2t-path/--t2d-path."
        )
    coverage = ""
    if (folder / "token_freq.pt").exists():
        freq = load_token_freq(folder / "token_freq.pt")
        total = sum(freq.values()) or 1
        share = [sum(c for t, c in freq.items() if t in ids) / total for ids in (ours, theirs)]
        coverage = f"; of the data's assistant tokens the draft's holds {share[0]:.1%}, the vocab stage's "
        coverage += f"{share[1]:.1%}"
    logger.warning(
        "%s keeps its own vocabulary mapping (%d ids: its lm_head rows are tied to it), not %s from the vocab stage "
        "(%d ids, %d in common)%s.",
        label,
        Vd,
        folder / "d2t.npy",
        len(theirs),
        common,
        coverage,
    )
